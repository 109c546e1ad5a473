"""The LLM path and the unstructured path share one implementation: one rounding rule, one
Wanda score, one magnitude score; and the LLM modules import one way (no cycle)."""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.llm import METHODS, prune_llm

PACKAGE = Path(sc.__file__).parent
VOCAB = 32


class Block(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, inner), nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Tiny(nn.Module):
    """One block at the known path `layers`: rows of `width` (up) and of `inner` (down) inputs."""

    def __init__(self, width: int, inner: int):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, width)
        self.layers = nn.ModuleList([Block(width, inner)])
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(n)]


def zeros(model: Tiny) -> dict[str, torch.Tensor]:
    return {n: (m.weight == 0) for n, m in model.layers[0].named_children()}


def both_paths(width: int, inner: int, method: str, sparsity: float, scope: str) -> tuple[Tiny, Tiny]:
    """The same dense model pruned by sc.prune and by prune_llm with the same method and grouping."""
    dense = Tiny(width, inner)
    unstructured, llm = copy.deepcopy(dense), copy.deepcopy(dense)
    data = batches()
    sc.prune(unstructured, "l1" if method == "magnitude" else method, sparsity, scope=scope,
             include=["layers.*"], data=data if method == "wanda" else None)
    prune_llm(llm, data, method=method, sparsity=sparsity, compare=scope)
    return unstructured, llm


@pytest.mark.parametrize("width, inner", [(7, 5), (9, 11), (13, 3)])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.7])
def test_both_paths_prune_floor_of_the_ratio_in_every_row(width, inner, sparsity):
    unstructured, llm = both_paths(width, inner, "magnitude", sparsity, "row")
    for name, size in (("up", width), ("down", inner)):
        expected = int(sparsity * size + 1e-9)  # floor: rows of 7 at 50% lose 3, not 4
        assert (zeros(unstructured)[name].sum(1) == expected).all(), name
        assert (zeros(llm)[name].sum(1) == expected).all(), name


def test_rows_of_seven_at_half_lose_three_on_both_paths():
    unstructured, llm = both_paths(7, 5, "magnitude", 0.5, "row")
    assert zeros(unstructured)["up"].sum(1).tolist() == [3] * 5 == zeros(llm)["up"].sum(1).tolist()


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("scope", ["row", "layer"])
def test_both_paths_choose_the_same_weights(method, scope):
    # one block, statistics from the dense model on both paths: same score, same allocation, same mask
    unstructured, llm = both_paths(9, 11, method, 0.5, scope)
    for name, where in zeros(unstructured).items():
        assert torch.equal(where, zeros(llm)[name]), name
    if scope == "layer":
        assert int(zeros(llm)["up"].sum()) == int(0.5 * 9 * 11)  # 49 of 99: floor per layer too


def test_the_methods_registered_themselves():
    assert {"magnitude", "wanda", "sparsegpt"} <= set(METHODS)
    assert METHODS["magnitude"].statistic is None and METHODS["sparsegpt"].statistic == "hessian"


# ------------------------------------------------------------------ imports run one way

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The secateurs modules `path` imports anywhere in it (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from . import wanda` imports a module
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, name, set(paths)) for name, path in paths.items()}


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A path start -> ... -> goal, or None."""
    stack, seen = [[start]], {start}
    while stack:
        path = stack.pop()
        for nxt in graph[path[-1]]:
            if nxt == goal:
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append(path + [nxt])
    return None


MINE = ["secateurs.llm", "secateurs.criteria.wanda", "secateurs.criteria.magnitude", "secateurs.allocate",
        "secateurs.sparsity"]


def test_no_import_cycle_through_the_llm_modules_or_the_shared_scores():
    graph = import_graph()
    checked = [m for m in graph if any(m == p or m.startswith(p + ".") for p in MINE)]
    assert "secateurs.llm.engine" in checked and "secateurs.llm.wanda" in checked
    cycles = {m: cycle for m in checked if (cycle := _reaches(graph, m, m))}
    assert not cycles, cycles


def test_the_engine_imports_no_method():
    graph = import_graph()
    methods = {"secateurs.llm.magnitude", "secateurs.llm.wanda", "secateurs.llm.sparsegpt", "secateurs.llm.owl"}
    assert not graph["secateurs.llm.engine"] & methods
    assert "secateurs.llm.engine" in graph["secateurs.llm.wanda"]  # they register with it
