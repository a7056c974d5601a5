"""The package's import graph: no cycles, and the layering that issue 15 asks for.

The graph is read with ``ast`` from the source files, so it sees every import statement that can run: module-level
ones and those inside functions and methods (lazy imports). Imports under ``if TYPE_CHECKING:`` are left out: they
never run (annotations are strings under ``from __future__ import annotations``). Importing ``duodiff.a.b`` also
runs the package ``duodiff/a/__init__.py``, so it counts as an import of ``duodiff.a`` too, unless the importer is
inside ``duodiff.a`` itself (then that package is already being imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "duodiff"


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package)}`` of every module under the package folder ``root``."""
    out = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (file, is_package)
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(node: ast.AST, package: list[str], modules: dict) -> list[tuple[str, list[str]]]:
    """``[(module, [names taken from it])]`` of one import statement (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [(alias.name, []) for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = package[: len(package) - node.level + 1] if node.level else []
    module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
    out = []
    for alias in node.names:  # `from . import keys` imports the submodule duodiff.keys
        sub = f"{module}.{alias.name}"
        out.append((sub, []) if sub in modules else (module, [alias.name]))
    return out


def import_graph(root: Path = SRC) -> tuple[dict[str, set[str]], dict[str, set[tuple[str, str]]]]:
    """``(edges, names)``: module -> modules of the package it imports when run, and -> ``(module, name)`` pairs
    it takes with ``from module import name``."""
    modules = _modules(root)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    names: dict[str, set[tuple[str, str]]] = {m: set() for m in modules}
    for mod, (file, is_package) in modules.items():
        package = mod.split(".") if is_package else mod.split(".")[:-1]
        ancestors = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)} | ({mod} if is_package
                                                                                          else set())
        todo: list[ast.AST] = [ast.parse(file.read_text(), filename=str(file))]
        while todo:
            node = todo.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    todo.extend(child.orelse)
                    continue
                todo.append(child)
                for target, taken in _imported_names(child, package, modules):
                    while target not in modules and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target not in modules or target == mod:
                        continue
                    parts = target.split(".")
                    for i in range(1, len(parts) + 1):  # the packages above the target run first
                        dotted = ".".join(parts[:i])
                        if dotted in modules and dotted not in ancestors and dotted != mod:
                            edges[mod].add(dotted)
                    names[mod].update((target, n) for n in taken)
    return edges, names


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``edges``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.fixture(scope="module")
def graph():
    return import_graph()


# ---------------------------------------------------------------------------------------------- the checker itself
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, cycle", [
    ({"a.py": "from .b import x\n", "b.py": "from .a import y\n"}, ["pkg.a", "pkg.b", "pkg.a"]),
    ({"a.py": "def f():\n    from . import b\n", "b.py": "import pkg.a\n"}, ["pkg.a", "pkg.b", "pkg.a"]),
    ({"a.py": "from .sub.c import z\n", "sub/__init__.py": "from ..a import x\n", "sub/c.py": ""},
     ["pkg.a", "pkg.sub", "pkg.a"]),
])
def test_checker_finds_module_level_lazy_and_package_cycles(tmp_path, files, cycle):
    assert find_cycle(import_graph(_package(tmp_path, files))[0]) == cycle


def test_checker_ignores_type_checking_imports_and_the_own_package(tmp_path):
    root = _package(tmp_path, {
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "b.py": "from .a import x\nfrom . import c\n",
        "c.py": "from . import a\n",  # the package pkg itself is already being imported: no edge to it
    })
    edges, _ = import_graph(root)
    assert edges["pkg.a"] == set() and find_cycle(edges) is None


# ---------------------------------------------------------------------------------------------- duodiff
def test_no_import_cycle_in_duodiff(graph):
    edges, _ = graph
    assert len(edges) > 40  # the package was really read
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", ["duodiff.hub", "duodiff.serialization", "duodiff.dtypes", "duodiff.fingerprint"])
def test_save_load_and_dtypes_never_import_the_pipeline(graph, module):
    """The hub mixin does the I/O for any pipeline; the pipeline imports it, never the other way round."""
    edges, _ = graph
    assert "duodiff.hub" in edges["duodiff.pipeline"]
    assert "duodiff.pipeline" not in reachable(edges, module)


def test_metrics_import_no_training_code_and_no_private_helpers(graph):
    edges, names = graph
    metrics = [m for m in edges if m == "duodiff.metrics" or m.startswith("duodiff.metrics.")]
    for mod in metrics:
        assert not {e for e in edges[mod] if e == "duodiff.train" or e.startswith("duodiff.train.")}, mod
        private = {(m, n) for m, n in names[mod] if n.startswith("_") and not m.startswith("duodiff.metrics")}
        assert not private, f"{mod} imports private helpers {sorted(private)}"


def test_only_the_dtypes_module_names_dtypes():
    """One table of dtype names (``duodiff.dtypes.DTYPES``); no other module keeps its own."""
    offenders = [str(f.relative_to(SRC)) for f in SRC.rglob("*.py")
                 if f.name != "dtypes.py" and '"bfloat16": torch.bfloat16' in f.read_text()]
    assert offenders == []
