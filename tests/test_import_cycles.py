"""No import cycle between matquant's modules: the graph of module-level imports (every `import` / `from … import`
statement outside a function body, in every file of src/matquant) has no cycle. Imports inside functions are
deliberate lazy imports (a heavy optional dependency, a later layer's module) and are not part of the graph."""
import ast
from pathlib import Path

import matquant

SRC = Path(matquant.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("matquant",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.AST, inside_functions: bool = False):
    """Import nodes that run when the module is imported: everywhere but inside function bodies (with
    inside_functions, every import: a lazy import is still a dependency)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not inside_functions:
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def import_graph(inside_functions: bool = False) -> dict[str, set[str]]:
    """{module: the matquant modules it imports at module level (with inside_functions: anywhere)}."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _top_level_imports(ast.parse(path.read_text()), inside_functions):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub when there is one, else names from pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            graph[mod] |= {t for t in targets if t in files and t != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [m0, m1, …, m0], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    assert "matquant.algorithms.gptq" in graph and "matquant.quant.minmax" in graph["matquant.algorithms.gptq"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_even_through_lazy_imports():
    """A function-level import is a deferred dependency, not a way around a cycle (gptq <-> slice_params was one)."""
    cycle = find_cycle(import_graph(inside_functions=True))
    assert cycle is None, " -> ".join(cycle)

