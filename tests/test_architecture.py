"""The package's layering: no import cycle between modules, imports inside functions counted."""
from __future__ import annotations

import ast
from pathlib import Path

import secateurs

ROOT = Path(secateurs.__file__).parent
PACKAGE = "secateurs"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (functions included)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _package_edges_removed(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ re-exports its children; the child importing a sibling through
    the package is what matters, so edges *into* a package __init__ from its own children
    are kept and edges from an __init__ to its own children are dropped."""
    return {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}


def test_no_import_cycles():
    cycles = _cycles(_package_edges_removed(import_graph()))
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _defined_names(path: Path) -> set[str]:
    """Top-level functions and classes a module defines itself (not what it imports)."""
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


# secateurs.keras mirrors the PyTorch front door for Keras 3 models on purpose (keras.prune is
# secateurs.prune for a Keras model): the same verb, the same meaning, another framework.
MIRRORS = "secateurs.keras"


def test_one_meaning_per_name():
    """A function or class name is defined in one module only: two things never share a name."""
    seen: dict[str, list[str]] = {}
    for path in ROOT.rglob("*.py"):
        if _module_name(path).startswith(MIRRORS):
            continue
        for name in _defined_names(path):
            if not name.startswith("_"):
                seen.setdefault(name, []).append(_module_name(path))
    clashes = {name: sorted(where) for name, where in seen.items() if len(where) > 1}
    assert clashes == {}, clashes


# Tables of rules and reference networks may be long; every other module reads top to bottom.
LONG_ALLOWED = {"secateurs.graph.rules", "secateurs.surgery", "secateurs.examples.zoo"}
MAX_LINES = 650


def test_modules_fit_in_a_sitting():
    long = {_module_name(p): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES and _module_name(p) not in LONG_ALLOWED}
    assert long == {}, long


def test_moved_names_keep_working():
    import pytest

    import secateurs.io
    from secateurs import checkpoint, hf

    with pytest.warns(DeprecationWarning, match="moved to secateurs.checkpoint"):
        assert secateurs.io.load is checkpoint.load and secateurs.io.save is checkpoint.save
    assert secateurs.load is checkpoint.load
    assert hf.fit_config is not None and hf.update_config is not None   # re-exported from hf_config
