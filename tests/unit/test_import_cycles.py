"""The package's import graph, read from the source with ``ast``, has no cycle.

Every import counts: module level, inside functions, and under ``if TYPE_CHECKING:`` (a type-only cycle is
still a layering mistake). Only ``if __name__ == "__main__":`` blocks are left out: they run when a module is a
script, under the name ``__main__``, never when the package imports it. ``from morpho_dist import x`` is an edge
to the submodule ``x`` when there is one, else to the package's ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "morpho_dist"
ROOT = Path(__file__).resolve().parents[2]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PKG).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_main_guard(node: ast.AST) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    sides = [node.test.left, *node.test.comparators]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
        isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
    )


def _imports(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if _is_main_guard(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that module ``name`` (file ``path``) imports."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                here = here[: len(here) - node.level + 1]
                base = ".".join([*here, base] if base else here)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            # names that are not submodules come from the module (or package __init__) itself
            targets = subs if len(subs) == len(node.names) else [*subs, base]
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), plus self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_cycle():
    # the checker itself: a -> b -> c -> a is found, a DAG is clean
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_import_reading(tmp_path):
    src = (
        "import os\nfrom typing import TYPE_CHECKING\nfrom . import b\nfrom .c import thing\n"
        "if TYPE_CHECKING:\n    from p.d import D\n"
        "def f():\n    from p import e\n"
        "if __name__ == '__main__':\n    from p.b import main\n"
    )
    path = tmp_path / "a.py"
    path.write_text(src)
    known = {"p", "p.a", "p.b", "p.c", "p.d", "p.e"}
    assert imported("p.a", path, known) == {"p.b", "p.c", "p.d", "p.e"}


def test_package_has_no_import_cycles():
    edges = graph()
    assert "morpho_dist.engine" in edges and "morpho_dist.kernels.launch" in edges  # the walk sees the package
    found = cycles(edges)
    assert not found, f"import cycles: {found}"


def test_train_is_a_plain_loop_over_the_engine():
    """train.py: no function takes more than five parameters (self included), no private helper takes more than
    one, and the loop drives morpho_dist.Morphogenesis (it builds one and calls its loss and step)."""
    tree = ast.parse((ROOT / PKG / "train.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            assert count <= 5, f"train.{node.name} takes {count} parameters"
            if node.name.startswith("_") and not node.name.startswith("__"):
                assert count <= 1, f"private helper train.{node.name} takes {count} parameters"
    calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    names = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "Morphogenesis" in names and {"loss", "step"} <= calls
