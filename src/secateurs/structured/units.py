"""Units and their choice: score each channel / head of a group, pick the ones to cut.

A unit is one channel or head of a coupled group (`graph.groups`); its score is the sum
of a criterion's element scores over every parameter slice of the unit. The choice is
local (a fraction of each group) or global (one ranking of every group's units, each
normalised by its group's mean score, capped per group). Kept widths are rounded up to
`round_to`. Nothing here touches the model.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..api import check_ratio
from ..criteria import Calibration, Criterion
from ..errors import InvalidArgument
from ..graph import trace
from ..graph.groups import Analysis, Group, analyze_graph
from ..graph.trace import Graph
from ..layers import is_conv1d
from ..measure import count_macs, graph_macs, total_parameters
from ..select import select_targets

UNIT_KINDS = ("channel", "head")
_GEMM_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.Embedding)


@dataclass
class Scored:
    """What pruning needs from the dense model: its graph and groups, unit scores and costs."""

    graph: Graph
    analysis: Analysis
    groups: list[Group]
    unit_scores: dict[int, np.ndarray]
    macs: int
    params: int
    unit_ids: dict[int, np.ndarray] = field(default_factory=dict)   # group index -> its units, as an array
    unit_widths: dict[int, int] = field(default_factory=dict)       # group index -> positions per unit (`group_quanta`)


def element_scores(model: nn.Module, criterion: Criterion, calibration: Calibration) -> dict[str, torch.Tensor]:
    targets = select_targets(model, prune_last=True, types=None)
    return criterion(model, targets, calibration)


def group_unit_scores(analysis: Analysis, group: Group, scores: dict[str, torch.Tensor],
                 model: nn.Module) -> np.ndarray:
    """Sum of element scores of each unit over every scored member slice (falls back to w^2)."""
    units = np.asarray(group.units, dtype=np.int64)
    position = np.zeros(int(units.max()) + 1 if units.size else 0, dtype=np.int64)
    position[units] = np.arange(len(units))
    total = np.zeros(len(units))
    scored_members = [m for m in group.members if m[0] in scores] or group.members
    for name, dim in scored_members:
        tensor = scores[name] if name in scores else model.get_parameter(name).detach().float().pow(2)
        per_position = _sum_but(tensor, dim).cpu().numpy()
        total += np.bincount(position[analysis.unit_of[(name, dim)]], weights=per_position, minlength=len(units))
    return total


def _sum_but(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """`tensor` summed over every dim but `dim`: the trailing dims first, as one contiguous run,
    then the leading ones (twice as fast as one strided multi-dim sum, and no transposed copy)."""
    if tensor.dim() == 0:
        return tensor.reshape(1)
    if dim < tensor.dim() - 1:
        tensor = tensor.reshape(*tensor.shape[:dim + 1], -1).sum(-1)
    return tensor.reshape(-1, tensor.shape[dim]).sum(0) if dim > 0 else tensor


def is_ignored(group: Group, ignore: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rpartition(".")[0], p)
               for name, _ in group.members for p in ignore)


def removal_count(counts: int, prunable: list[int], ratio: float, quantum: int = 1) -> int:
    """How many of a group's units to cut: never all of them, the kept count a multiple of `quantum`
    (rounded up: never more removed than asked; a quantum of 0 leaves the group whole)."""
    if quantum < 1:
        return 0
    limit = len(prunable) - 1 if len(prunable) == counts else len(prunable)
    remove = max(0, min(int(ratio * counts), limit))
    return counts - min(counts, -(-(counts - remove) // quantum) * quantum)


def gemm_width(model: nn.Module, analysis: Analysis, group: Group) -> int:
    """Positions per unit in the group's matrix-multiplying members (1 for a channel, head_dim for a head).

    Only weights of Linear / conv / attention layers count: a per-head bias table holds one
    position per head, but the widths that run on the hardware are the projections'.
    """
    widths = []
    for name, dim in group.members:
        module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if not isinstance(module, _GEMM_LAYERS) and not is_conv1d(module):
            continue
        if model.get_parameter(name).dim() < 2:
            continue
        positions = analysis.unit_of[(name, dim)]
        widths.append(len(positions) // max(1, len(np.unique(positions))))
    return min(widths) if widths else 1


def group_quanta(scored: Scored, round_to: int | None) -> dict[int, int]:
    """Group index -> the multiple its kept unit count must be so that every kept layer width is a
    multiple of `round_to`; 0 where the group's width was not such a multiple (left as it was)."""
    quanta = {}
    for g in scored.groups:
        if not round_to or round_to == 1:
            quanta[g.index] = 1
            continue
        quantum = round_to // math.gcd(round_to, scored.unit_widths.get(g.index, 1))
        quanta[g.index] = quantum if g.size % quantum == 0 and g.size > quantum else 0
    return quanta


def check_spec(name: str, value: Any, upper_inclusive: bool) -> None:
    """Raise InvalidArgument unless `value` is a fraction or a {glob: fraction} dict."""
    if not isinstance(value, dict):
        check_ratio(name, value, upper_inclusive)
        return
    if not value:
        raise InvalidArgument(f"{name} is an empty dict; expected {{glob on parameter names: fraction}}")
    for pattern, fraction in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise InvalidArgument(f"{name} keys must be glob patterns on parameter names, got {pattern!r}")
        check_ratio(f"{name}[{pattern!r}]", fraction, upper_inclusive)


def per_group(groups: list[Group], spec: float | dict[str, float] | None, default: float) -> dict[int, float]:
    """Group index -> fraction: a float for all, or the first dict pattern matching a member (else `default`)."""
    if spec is None or not isinstance(spec, dict):
        return {g.index: default if spec is None else float(spec) for g in groups}
    return {g.index: next((float(f) for p, f in spec.items() if is_ignored(g, (p,))), default) for g in groups}


def choose_units(analysis: Analysis, groups: list[Group], unit_scores: dict[int, np.ndarray],
                 ratio: float | dict[int, float], scope: str, quanta: dict[int, int] | None = None,
                 caps: dict[int, float] | None = None) -> dict[int, list[int]]:
    """Group index -> positions of the units to remove.

    `ratio` is one fraction or, for scope "local", one per group index; `quanta` (from
    `group_quanta`) keeps each group's kept count a multiple, under every scope; `caps`
    bounds the fraction of each group's units removed (default: none locally, 0.9 globally).
    """
    chosen: dict[int, list[int]] = {}
    caps, quanta = caps or {}, quanta or {}
    if scope == "local":
        for g in groups:
            ok = [i for i, p in enumerate(g.prunable) if p]
            group_ratio = ratio[g.index] if isinstance(ratio, dict) else ratio
            count = removal_count(g.size, ok, min(group_ratio, caps.get(g.index, 1.0)), quanta.get(g.index, 1))
            order = sorted(ok, key=lambda i: unit_scores[g.index][i])
            chosen[g.index] = order[:count]
        return chosen
    # global: one ranking of every group's units, each normalised by its group's mean score
    budget = int(ratio * sum(g.size for g in groups))
    return aligned(first_units(*global_order(groups, unit_scores, caps, quanta), budget), groups, quanta)


def aligned(chosen: dict[int, list[int]], groups: list[Group], quanta: dict[int, int]) -> dict[int, list[int]]:
    """A global choice with each group's removals cut back (its best-kept units first) until the kept
    count is a multiple of the group's quantum: a prefix of a ranking respects no multiple by itself."""
    sizes = {g.index: g.size for g in groups}
    out = {}
    for gi, positions in chosen.items():
        quantum = quanta.get(gi, 1)
        if quantum < 1:
            continue
        size = sizes[gi]
        keep = -(-(size - len(positions)) // quantum) * quantum
        out[gi] = positions[:max(0, size - keep)]
    return out


def global_order(groups: list[Group], unit_scores: dict[int, np.ndarray], caps: dict[int, float],
                 quanta: dict[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(group index, position) of the units a global ranking cuts, in the order it cuts them.

    Units rank by score over their group's mean score; a group gives no more units once
    its cap (`caps`, default 90% of it) is reached. Any budget takes a prefix of this order.
    """
    if not groups:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    score, group_of, position = [], [], []
    cap = np.zeros(max(g.index for g in groups) + 1, dtype=np.int64)
    for g in groups:
        s = unit_scores[g.index]
        mean = s.mean() if s.size and s.mean() > 0 else 1.0
        ok = np.flatnonzero(g.prunable)
        score.append(s[ok] / mean)
        group_of.append(np.full(len(ok), g.index))
        position.append(ok)
        cap[g.index] = removal_count(g.size, ok.tolist(), caps.get(g.index, 0.9), (quanta or {}).get(g.index, 1))
    score, group_of, position = np.concatenate(score), np.concatenate(group_of), np.concatenate(position)
    order = np.lexsort((position, group_of, score))   # by score; ties by group, then position
    ranked = group_of[order]
    # walking the ranking, a unit is taken while its group is under its cap, until the budget is spent
    by_group = np.argsort(ranked, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(ranked[by_group]) != 0])
    rank_in_group = np.empty(len(ranked), dtype=np.int64)
    rank_in_group[by_group] = np.arange(len(ranked)) - np.repeat(starts, np.diff(np.r_[starts, len(ranked)]))
    taken = order[rank_in_group < cap[ranked]]
    return group_of[taken], position[taken]


def first_units(group_of: np.ndarray, position: np.ndarray, budget: int) -> dict[int, list[int]]:
    """Group index -> positions of the first `budget` units of a global order."""
    group_of, position = group_of[:max(budget, 0)], position[:max(budget, 0)]
    by_group = np.argsort(group_of, kind="stable")
    indices, starts = np.unique(group_of[by_group], return_index=True)
    return {gi: part.tolist() for gi, part in zip(indices.tolist(), np.split(position[by_group], starts[1:]))}


def protect_members(analysis: Analysis, groups: dict[int, Group], chosen: dict[int, list[int]],
                     unit_scores: dict[int, np.ndarray], unit_ids: dict[int, np.ndarray] | None = None) -> None:
    """Spare the best unit of any member that would lose every position (a concat input, say)."""
    gone = cut_mask(analysis, removed_ids(groups, chosen, unit_ids))
    for gi, positions in chosen.items():
        group = groups[gi]
        for member in group.members:
            units = analysis.unit_of[member]
            if positions and gone[units].all():
                members_units = set(units.tolist())
                candidates = [i for i in positions if group.units[i] in members_units]
                spared = max(candidates, key=lambda i: unit_scores[gi][i])
                positions.remove(spared)
                gone[group.units[spared]] = False


def removed_ids(groups: dict[int, Group], chosen: dict[int, list[int]],
                 unit_ids: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Unit (component) ids of the positions `chosen` cuts (`unit_ids`: each group's units, as arrays)."""
    unit_ids = unit_ids or {}
    parts = [unit_ids[gi][positions] if gi in unit_ids else np.asarray(groups[gi].units)[positions]
             for gi, positions in chosen.items() if positions]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def cut_mask(analysis: Analysis, removed: np.ndarray | Sequence[int]) -> np.ndarray:
    """Per unit (component id): True where the unit is cut; a lookup table, not a search."""
    gone = np.zeros(int(analysis.component.max()) + 1 if analysis.component.size else 0, dtype=bool)
    gone[np.asarray(removed, dtype=np.int64)] = True
    return gone


def keeps_of(analysis: Analysis, groups: dict[int, Group], chosen: dict[int, list[int]]) -> dict[tuple[str, int], torch.Tensor]:
    gone = cut_mask(analysis, removed_ids(groups, chosen))
    keeps = {}
    for g in groups.values():
        if not chosen.get(g.index):
            continue
        for member in g.members:
            units = analysis.unit_of[member]
            keep = np.nonzero(~gone[units])[0]
            if len(keep) < len(units):
                keeps[member] = torch.as_tensor(keep, dtype=torch.long)
    return keeps


def dense_macs(graph: Graph, model: nn.Module, example_inputs: Any) -> int:
    """MACs from the traced graph; a real forward only where the graph cannot tell (an RNN run as one op)."""
    macs = graph_macs(graph)
    return count_macs(model, example_inputs)[0] if macs is None else macs


def score_model(model: nn.Module, example_inputs: Any, criterion: Criterion, calibration: Calibration,
           units: Sequence[str], ignore: Sequence[str]) -> Scored:
    """Trace, group and score `model` once: all that the ratio search and the cut read."""
    graph = trace(model, example_inputs)
    analysis = analyze_graph(graph)
    groups = [g for g in analysis.groups if g.kind in units and g.prunable_units and not is_ignored(g, ignore)]
    scores = element_scores(model, criterion, calibration)
    unit_scores = {g.index: group_unit_scores(analysis, g, scores, model) for g in groups}
    return Scored(graph, analysis, groups, unit_scores, dense_macs(graph, model, example_inputs), total_parameters(model),
                  {g.index: np.asarray(g.units, dtype=np.int64) for g in groups},
                  {g.index: gemm_width(model, analysis, g) for g in groups})


def select_units(scored: Scored, ratio: float | dict[str, float], scope: str, round_to: int | None,
                 max_ratio: float | dict[str, float] | None) -> dict[int, list[int]]:
    """Group index -> positions of the units to cut, members that would lose everything spared."""
    ratios = per_group(scored.groups, ratio, 0.0) if isinstance(ratio, dict) else ratio
    caps = per_group(scored.groups, max_ratio, 1.0 if scope == "local" else 0.9)
    chosen = choose_units(scored.analysis, scored.groups, scored.unit_scores, ratios, scope,
                          group_quanta(scored, round_to), caps)
    protect_members(scored.analysis, {g.index: g for g in scored.groups}, chosen, scored.unit_scores, scored.unit_ids)
    return chosen


__all__ = ["UNIT_KINDS", "Scored", "aligned", "gemm_width", "group_quanta", "check_spec", "choose_units", "cut_mask", "dense_macs", "element_scores", "first_units", "global_order", "is_ignored", "keeps_of", "per_group", "protect_members", "removal_count", "removed_ids", "score_model", "select_units", "group_unit_scores"]
