"""The package's layer order (README "Layout"): a module may import only from its own subpackage or an earlier layer.
Every import is checked, function-level ones too (they are still dependencies)."""
import ast
import re
from pathlib import Path

import matquant

SRC = Path(matquant.__file__).parent
README = SRC.parent.parent / "README.md"
# the order the README states; subpackages in one layer are peers and must not import each other
LAYERS = [
    ("quant", "models", "data"),
    ("kernels",),
    ("nn",),
    ("format",),
    ("algorithms", "integrations", "eval", "mixnmatch"),
    ("experiments",),
    ("commands", "api", "cli", "__init__", "__main__"),
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "matquant" \
                else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "matquant" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_every_subpackage_is_placed_in_a_layer():
    units = {_unit(p) for p in SRC.rglob("*.py")}
    assert units <= set(LAYER_OF), sorted(units - set(LAYER_OF))


def test_no_module_imports_a_later_layer_or_a_peer():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        me = _unit(path)
        for line, dep in _imports(path):
            if dep == me or dep not in LAYER_OF:
                continue
            top = LAYER_OF[me] == len(LAYERS) - 1  # the front ends (cli, api, commands) may use each other
            if LAYER_OF[dep] > LAYER_OF[me] or (LAYER_OF[dep] == LAYER_OF[me] and not top):
                bad.append(f"{path.relative_to(SRC)}:{line} ({me}, layer {LAYER_OF[me]}) imports {dep} "
                           f"(layer {LAYER_OF[dep]})")
    assert not bad, "\n".join(bad)


def test_readme_states_this_order():
    text = README.read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[: layout.index("\n## ", 5)] if "\n## " in layout[5:] else layout
    found = [m for m in re.findall(r"`([a-z_]+)/?`", layout)]
    order = [LAYER_OF[u] for u in found if u in LAYER_OF]
    named = {u for u in found if u in LAYER_OF}
    assert {"quant", "kernels", "nn", "format", "algorithms", "integrations", "eval", "mixnmatch",
            "experiments", "commands"} <= named
    assert order == sorted(order), f"README Layout lists the layers out of order: {found}"


def test_no_dated_measurements_in_code():
    """Measurements live in docs/ (with machine and date), not in code comments: no source file carries a date."""
    dated = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\b20\d\d-[01]\d-[0-3]\d\b", line)]
    assert not dated, dated
