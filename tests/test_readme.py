"""What README.md states is true of the code: each recipe's options are what algorithms/recipes.py sets, and every
`matquant COMMAND` it shows is a registered command (the layer order is checked by tests/test_layers.py)."""
import re
from pathlib import Path

import matquant
from matquant.algorithms.recipes import DEFAULT_RECIPE, RECIPES
from matquant.cli import build_parser

README = Path(matquant.__file__).parent.parent.parent / "README.md"
# "- `quality` (the default): `--method matgptq --clip weighted --slice-params own`"
RECIPE_LINE = re.compile(r"^- `(\w+)`( \(the default\))?: `(--[^`]*)`\s*$", re.M)


def _code(text: str) -> str:
    """Every code block and inline code span of the README."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    rest = re.sub(r"```.*?```", "", text, flags=re.S)
    return "\n".join(blocks + re.findall(r"`([^`\n]+)`", rest))


def _options(flags: str) -> dict:
    """'--method matgptq --clip-lambdas 4096,16,4,1' -> {'method': 'matgptq', 'clip_lambdas': (4096, 16, 4, 1)}."""
    words = flags.split()
    out = {}
    for flag, value in zip(words[::2], words[1::2]):
        assert flag.startswith("--"), flags
        out[flag[2:].replace("-", "_")] = tuple(int(v) for v in value.split(",")) if "," in value else value
    return out


def test_readme_states_what_each_recipe_sets():
    found = RECIPE_LINE.findall(README.read_text())
    assert {name for name, _, _ in found} == set(RECIPES), found
    for name, default, flags in found:
        want = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in RECIPES[name].items()}
        assert _options(flags) == want, (name, flags, RECIPES[name])
        assert bool(default) == (name == DEFAULT_RECIPE), name


def test_every_command_the_readme_shows_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    shown = set(re.findall(r"(?<![\w.\-/])matquant ([a-z][\w-]*)", _code(README.read_text())))
    assert shown, "the README shows no matquant command"
    assert shown <= set(sub.choices), sorted(shown - set(sub.choices))


def test_the_first_two_code_blocks_are_the_install_commands():
    """.ci/run runs exactly the second; the first is the demo."""
    blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(), re.S)
    assert blocks[0].endswith("&& matquant demo") and blocks[1].endswith("&& python -m pytest -q")
    ci = README.parent / ".ci" / "run"
    if ci.is_file():
        assert blocks[1] in ci.read_text()
