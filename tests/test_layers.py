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


# measured numbers as they were written into comments and help texts: a ratio to fp32 ("1.057x", "5.36×"), a
# throughput ("12.3 tok/s"), a timing in ms/µs ("41 µs") or seconds ("309 s"), a speed claim ("3x faster")
MEASURED = re.compile(r"\d\.\d+\s?[×x](?![A-Za-z0-9_(])"  # 1.057x, 5.36×
                      r"|\d\s?tok/s\b|\d\s?(?:µs|ms)\b"  # 12.3 tok/s, 41 µs
                      r"|\b\d+(?:\.\d+)?\s(?:s|min|seconds|minutes)\b"  # 309 s
                      r"|\b\d+(?:\.\d+)?\s?[×x]\s(?:faster|slower)\b")  # 3x faster


def _comments_and_strings(path: Path):
    """(line, text) of every comment and string literal (docstrings and help texts included) of one source file."""
    import io
    import tokenize

    kinds = {tokenize.COMMENT, tokenize.STRING} | ({tokenize.FSTRING_MIDDLE} if hasattr(tokenize, "FSTRING_MIDDLE")
                                                   else set())
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in kinds:
            for i, text in enumerate(tok.string.splitlines()):
                yield tok.start[0] + i, text


def test_no_measured_numbers_in_code():
    """Measurements live in docs/ (docs/results.md, docs/benchmarks.md): a comment or help text may point there, but
    carries no measured ratio, throughput or timing of its own."""
    found = [f"{p.relative_to(SRC)}:{line}: {text.strip()[:100]}" for p in sorted(SRC.rglob("*.py"))
             for line, text in _comments_and_strings(p) if MEASURED.search(text)]
    assert not found, "\n".join(found)
