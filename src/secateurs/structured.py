"""Structured pruning: remove whole channels, neurons and heads, physically.

`prune_structured` traces the model, groups coupled channels (`graph.groups`), scores
each unit by summing a criterion's element scores over every parameter slice of the
unit, removes the lowest units of each group (or globally), and cuts the layers with
`surgery`. The result is an ordinary, smaller nn.Module with the same output shapes.

A ratio is a fraction of each group's *units* (channels or heads). Cutting 50% of the
channels of a layer that is pruned on both its input and output side leaves about 25%
of its weights: say "remove half the channels", not "half the parameters". Use a
`target` such as "macs=0.5" to ask for a cost instead.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import surgery
from .criteria import Calibration, Criterion, get_criterion
from .criteria.base import LossFn
from .errors import IncompatibleLayer, InvalidArgument
from .graph import trace
from .graph.groups import Analysis, Group, analyze_graph
from .measure import count_macs, count_parameters
from .select import select_targets

_CONV_LIKE = (nn.Linear, nn.modules.conv._ConvNd)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.PReLU)
UNIT_KINDS = ("channel", "head")


@dataclass
class GroupPlan:
    index: int
    kind: str
    members: list[str]
    units: int
    removed: list[int]          # positions (in group unit order) that were cut


@dataclass
class StructuredPlan:
    """What was removed: per group, which units; with costs before and after."""

    method: str
    ratio: float
    groups: list[GroupPlan] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    keeps: dict[str, list[int]] = field(default_factory=dict)            # "param:dim" -> kept positions
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> changed int attributes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module | None]:
    module_name, _, local = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    parent_name = module_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if module_name else None
    return module, local, parent


def _element_scores(model: nn.Module, criterion: Criterion, calibration: Calibration) -> dict[str, torch.Tensor]:
    targets = select_targets(model, prune_last=True, types=None)
    return criterion(model, targets, calibration)


def _unit_scores(analysis: Analysis, group: Group, scores: dict[str, torch.Tensor],
                 model: nn.Module) -> np.ndarray:
    """Sum of element scores of each unit over every scored member slice (falls back to w^2)."""
    position = {u: i for i, u in enumerate(group.units)}
    total = np.zeros(len(group.units))
    scored_members = [m for m in group.members if m[0] in scores] or group.members
    for name, dim in scored_members:
        tensor = scores[name] if name in scores else model.get_parameter(name).detach().float().pow(2)
        per_position = tensor.transpose(0, dim).reshape(tensor.shape[dim], -1).sum(1).cpu().numpy()
        units = analysis.unit_of[(name, dim)]
        np.add.at(total, [position[u] for u in units.tolist()], per_position)
    return total


def _ignored(group: Group, ignore: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rpartition(".")[0], p)
               for name, _ in group.members for p in ignore)


def _removal(counts: int, prunable: list[int], ratio: float, round_to: int | None) -> int:
    """How many of a group's units to cut: never all of them, kept widths rounded up to `round_to`."""
    remove = int(ratio * counts)
    if round_to:
        keep = min(counts, -(-(counts - remove) // round_to) * round_to)
        remove = counts - keep
    limit = len(prunable) - 1 if len(prunable) == counts else len(prunable)
    return max(0, min(remove, limit))


def _choose(analysis: Analysis, groups: list[Group], unit_scores: dict[int, np.ndarray],
            ratio: float, scope: str, round_to: int | None) -> dict[int, list[int]]:
    """Group index -> positions of the units to remove."""
    chosen: dict[int, list[int]] = {}
    if scope == "local":
        for g in groups:
            ok = [i for i, p in enumerate(g.prunable) if p]
            count = _removal(g.size, ok, ratio, round_to)
            order = sorted(ok, key=lambda i: unit_scores[g.index][i])
            chosen[g.index] = order[:count]
        return chosen
    # global: rank units normalised by their group's mean score, at most max 90% of a group
    pool = []
    for g in groups:
        s = unit_scores[g.index]
        mean = s.mean() if s.size and s.mean() > 0 else 1.0
        pool += [(s[i] / mean, g.index, i) for i, p in enumerate(g.prunable) if p]
    budget = int(ratio * sum(g.size for g in groups))
    cap = {g.index: _removal(g.size, [i for i, p in enumerate(g.prunable) if p], 0.9, round_to) for g in groups}
    for _, gi, i in sorted(pool):
        if budget <= 0:
            break
        if len(chosen.setdefault(gi, [])) < cap[gi]:
            chosen[gi].append(i)
            budget -= 1
    return chosen


def _protect_members(analysis: Analysis, groups: dict[int, Group], chosen: dict[int, list[int]],
                     unit_scores: dict[int, np.ndarray]) -> None:
    """Spare the best unit of any member that would lose every position (a concat input, say)."""
    for gi, positions in chosen.items():
        group = groups[gi]
        for member in group.members:
            units = set(analysis.unit_of[member].tolist())
            removed = {group.units[i] for i in positions}
            if units <= removed:
                candidates = [i for i in positions if group.units[i] in units]
                positions.remove(max(candidates, key=lambda i: unit_scores[gi][i]))


def _keeps(analysis: Analysis, groups: dict[int, Group], chosen: dict[int, list[int]]) -> dict[tuple[str, int], torch.Tensor]:
    removed_units = {groups[gi].units[i] for gi, positions in chosen.items() for i in positions}
    keeps = {}
    for g in groups.values():
        if not chosen.get(g.index):
            continue
        for member in g.members:
            units = analysis.unit_of[member]
            keep = np.nonzero(~np.isin(units, list(removed_units)))[0]
            if len(keep) < len(units):
                keeps[member] = torch.as_tensor(keep, dtype=torch.long)
    return keeps


def _role(module: nn.Module, local: str, dim: int) -> str | None:
    """"out" / "in" for the standard layers' weights and biases, None for free parameters."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and local in ("weight", "bias"):
        return "out" if local == "bias" or dim == 1 else "in"
    if isinstance(module, _CONV_LIKE) and local in ("weight", "bias"):
        return "out" if local == "bias" or dim == 0 else "in"
    if isinstance(module, _NORMS) and local in ("weight", "bias"):
        return "out"
    if isinstance(module, nn.Embedding) and local == "weight":
        return "out" if dim == 1 else None
    return None


def apply_keeps(model: nn.Module, keeps: dict[tuple[str, int], torch.Tensor]) -> None:
    """Cut every (parameter, dim) down to its kept positions, module by module."""
    calls: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = {}
    heads: dict[int, tuple[nn.MultiheadAttention, torch.Tensor]] = {}
    free = []
    for (name, dim), keep in keeps.items():
        module, local, parent = _owner(model, name)
        if isinstance(module, nn.MultiheadAttention) and local in ("in_proj_weight", "in_proj_bias") and dim == 0:
            head_dim = module.head_dim
            rows = keep[keep < module.embed_dim]
            heads[id(module)] = (module, torch.unique(rows // head_dim))
            continue
        if isinstance(module, nn.MultiheadAttention) and local == "in_proj_weight":
            calls[(id(module), "in")] = (module, "in", keep)
            continue
        if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
            if dim == 0 or local == "bias":
                calls[(id(parent), "out")] = (parent, "out", keep)
            continue  # out_proj columns follow the heads
        role = _role(module, local, dim)
        if role is None:
            free.append((module, local, dim, keep))
        else:
            calls[(id(module), role)] = (module, role, keep)
    for module, kept in heads.values():
        surgery.keep_heads(module, kept)
    for module, role, keep in calls.values():
        (surgery.keep_out if role == "out" else surgery.keep_in)(module, keep)
    for module, local, dim, keep in free:
        surgery.keep_param_dim(module, local, dim, keep)
    surgery.turn_off_nested_tensors(model)


# Integer attributes hand-written attention modules keep for their head counts.
HEAD_COUNT_ATTRIBUTES = ("num_heads", "heads", "n_heads", "n_head", "num_attention_heads", "num_key_value_heads",
                         "n_kv_heads", "kv_heads", "num_kv_heads", "all_head_size", "inner_dim")


def _update_head_counts(model: nn.Module, cut: list[tuple[Group, int]]) -> dict[str, dict[str, int]]:
    """Scale the head-count attributes of the attention module that owns each cut head group.

    A module that reshapes with `self.num_heads` would break after its projections lose
    heads; nn.MultiheadAttention is handled by surgery itself. Returns what changed.
    """
    changed: dict[str, dict[str, int]] = {}
    for group, removed in cut:
        names = [n.rpartition(".")[0] for n, _ in group.members]
        prefix = names[0]
        while prefix and not all(n == prefix or n.startswith(prefix + ".") for n in names):
            prefix = prefix.rpartition(".")[0]
        owner = model.get_submodule(prefix) if prefix else model
        if isinstance(owner, nn.MultiheadAttention):
            continue
        kept = group.size - removed
        for attribute in HEAD_COUNT_ATTRIBUTES:
            value = getattr(owner, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool) and value % group.size == 0:
                setattr(owner, attribute, value // group.size * kept)
                changed.setdefault(prefix, {})[attribute] = value // group.size * kept
    return changed


def _output_shapes(graph) -> list[tuple[int, ...]]:
    return [graph.tensors[i].shape for i in graph.outputs]


def prune_structured(
    model: nn.Module,
    example_inputs: Any,
    ratio: float | None = None,
    *,
    target: str | None = None,
    method: str | Criterion = "l2",
    scope: str = "local",
    units: Sequence[str] = UNIT_KINDS,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    round_to: int | None = None,
    ignore: Sequence[str] = (),
    seed: int = 0,
) -> StructuredPlan:
    """Remove the least important channels / heads of `model` in place; returns the plan.

    `ratio` is the fraction of units removed from each prunable group (scope "local")
    or in total, ranked after dividing by each group's mean score (scope "global", at
    most 90% of any group). `target="macs=0.5"` or `"params=0.3"` instead searches the
    global ratio that brings that cost to the given fraction of today's.
    """
    if (ratio is None) == (target is None):
        raise InvalidArgument("give exactly one of ratio (a fraction of units) or target (e.g. 'macs=0.5')")
    if scope not in ("local", "global"):
        raise InvalidArgument(f"unknown scope {scope!r}; expected 'local' or 'global'")
    bad = [u for u in units if u not in UNIT_KINDS]
    if bad:
        raise InvalidArgument(f"unknown unit kind {bad[0]!r}; expected some of {UNIT_KINDS}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise InvalidArgument(f"round_to must be a positive integer, got {round_to!r}")
    criterion = get_criterion(method, seed=seed)
    if target is not None:
        return _prune_to_target(model, example_inputs, target, method=criterion, units=units, data=data,
                                loss_fn=loss_fn, round_to=round_to, ignore=ignore)
    if not 0.0 <= ratio < 1.0:
        raise InvalidArgument(f"ratio must be in [0, 1), got {ratio}")
    graph = trace(model, example_inputs)  # one trace serves the analysis and the shape check
    shapes = _output_shapes(graph)
    params_before, _ = count_parameters(model)
    macs_before, _ = count_macs(model, example_inputs)
    analysis = analyze_graph(graph)
    groups = [g for g in analysis.groups if g.kind in units and g.prunable_units and not _ignored(g, ignore)]
    scores = _element_scores(model, criterion, Calibration(data, loss_fn))
    unit_scores = {g.index: _unit_scores(analysis, g, scores, model) for g in groups}
    chosen = _choose(analysis, groups, unit_scores, ratio, scope, round_to)
    by_index = {g.index: g for g in groups}
    _protect_members(analysis, by_index, chosen, unit_scores)
    keeps = _keeps(analysis, by_index, chosen)
    apply_keeps(model, keeps)
    attributes = _update_head_counts(model, [(by_index[gi], len(p)) for gi, p in chosen.items()
                                             if p and by_index[gi].kind == "head"])
    after = _output_shapes(trace(model, example_inputs))
    if after != shapes:
        raise IncompatibleLayer(f"pruning changed the output shapes {shapes} -> {after}; please report this model")
    plan = StructuredPlan(criterion.name, float(ratio), params_before=params_before, macs_before=macs_before,
                          keeps={f"{n}:{d}": k.tolist() for (n, d), k in keeps.items()}, attributes=attributes)
    plan.groups = [GroupPlan(g.index, g.kind, [f"{n}:{d}" for n, d in g.members], g.size, sorted(chosen.get(g.index, [])))
                   for g in groups]
    plan.params_after, _ = count_parameters(model)
    plan.macs_after, _ = count_macs(model, example_inputs)
    return plan


def parse_target(target: str) -> tuple[str, float]:
    key, _, value = target.partition("=")
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if key not in ("macs", "params") or not 0.0 < fraction <= 1.0:
        raise InvalidArgument(f"target must look like 'macs=0.5' or 'params=0.3' (a fraction in (0, 1]), got {target!r}")
    return key, fraction


def _prune_to_target(model: nn.Module, example_inputs: Any, target: str, **kwargs: Any) -> StructuredPlan:
    """Bisect the global ratio on copies until the cost is at most the target fraction."""
    key, fraction = parse_target(target)
    cost = (lambda m: count_macs(m, example_inputs)[0]) if key == "macs" else (lambda m: count_parameters(m)[0])
    base = cost(model)
    low, high = 0.0, 0.95
    for _ in range(10):
        mid = (low + high) / 2
        trial = copy.deepcopy(model)
        prune_structured(trial, example_inputs, mid, scope="global", **kwargs)
        if cost(trial) / base > fraction:
            low = mid
        else:
            high = mid
    return prune_structured(model, example_inputs, high, scope="global", **kwargs)


def replay(model: nn.Module, plan: StructuredPlan | dict[str, Any]) -> nn.Module:
    """Cut a fresh `model` exactly as `plan` records, so saved weights load into it."""
    record = plan.to_dict() if isinstance(plan, StructuredPlan) else plan
    keeps = {}
    for key, kept in record.get("keeps", {}).items():
        name, _, dim = key.rpartition(":")
        keeps[(name, int(dim))] = torch.as_tensor(kept, dtype=torch.long)
    apply_keeps(model, keeps)
    for module_name, changes in record.get("attributes", {}).items():
        owner = model.get_submodule(module_name) if module_name else model
        for attribute, value in changes.items():
            setattr(owner, attribute, value)
    return model
