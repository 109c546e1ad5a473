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

import contextlib
import copy
import fnmatch
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from . import compensate as bias_compensation
from . import hf, surgery
from .api import check_ratio
from .batches import LossFn
from .criteria import Calibration, Criterion, get_criterion
from .errors import IncompatibleLayer, InvalidArgument, MissingData, WeightsMismatch
from .graph import trace
from .graph.groups import Analysis, Group, analyze_graph
from .graph.trace import Graph, _leaves, _split_inputs
from .layers import is_conv1d
from .measure import (
    count_macs,
    graph_bytes,
    graph_macs,
    graph_params,
    latency_ms,
    macs_and_output,
    tensor_bytes,
    total_parameters,
)
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
    ratio: float | dict[str, float]         # a dict: glob on member names -> fraction (scope "local")
    groups: list[GroupPlan] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    keeps: dict[str, list[int]] = field(default_factory=dict)            # "param:dim" -> kept positions
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> changed int attributes
    compensated: list[str] = field(default_factory=list)   # linear layers whose bias absorbed removed inputs
    added_biases: list[str] = field(default_factory=list)  # of those, the ones that had no bias before
    budget: dict[str, Any] = field(default_factory=dict)   # a target search: the target, predicted and measured cost

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
    units = np.asarray(group.units, dtype=np.int64)
    position = np.zeros(int(units.max()) + 1 if units.size else 0, dtype=np.int64)
    position[units] = np.arange(len(units))
    total = np.zeros(len(units))
    scored_members = [m for m in group.members if m[0] in scores] or group.members
    for name, dim in scored_members:
        tensor = scores[name] if name in scores else model.get_parameter(name).detach().float().pow(2)
        others = [d for d in range(tensor.dim()) if d != dim]
        per_position = (tensor.sum(others) if others else tensor).cpu().numpy()  # no transposed copy
        total += np.bincount(position[analysis.unit_of[(name, dim)]], weights=per_position, minlength=len(units))
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


def _check_spec(name: str, value: Any, upper_inclusive: bool) -> None:
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


def _per_group(groups: list[Group], spec: float | dict[str, float] | None, default: float) -> dict[int, float]:
    """Group index -> fraction: a float for all, or the first dict pattern matching a member (else `default`)."""
    if spec is None or not isinstance(spec, dict):
        return {g.index: default if spec is None else float(spec) for g in groups}
    return {g.index: next((float(f) for p, f in spec.items() if _ignored(g, (p,))), default) for g in groups}


def _choose(analysis: Analysis, groups: list[Group], unit_scores: dict[int, np.ndarray],
            ratio: float | dict[int, float], scope: str, round_to: int | None,
            caps: dict[int, float] | None = None) -> dict[int, list[int]]:
    """Group index -> positions of the units to remove.

    `ratio` is one fraction or, for scope "local", one per group index; `caps` bounds
    the fraction of each group's units removed (default: none locally, 0.9 globally).
    """
    chosen: dict[int, list[int]] = {}
    caps = caps or {}
    if scope == "local":
        for g in groups:
            ok = [i for i, p in enumerate(g.prunable) if p]
            group_ratio = ratio[g.index] if isinstance(ratio, dict) else ratio
            count = _removal(g.size, ok, min(group_ratio, caps.get(g.index, 1.0)), round_to)
            order = sorted(ok, key=lambda i: unit_scores[g.index][i])
            chosen[g.index] = order[:count]
        return chosen
    # global: one ranking of every group's units, each normalised by its group's mean score
    budget = int(ratio * sum(g.size for g in groups))
    return _first(*_global_order(groups, unit_scores, caps, round_to), budget)


def _global_order(groups: list[Group], unit_scores: dict[int, np.ndarray], caps: dict[int, float],
                  round_to: int | None) -> tuple[np.ndarray, np.ndarray]:
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
        cap[g.index] = _removal(g.size, ok.tolist(), caps.get(g.index, 0.9), round_to)
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


def _first(group_of: np.ndarray, position: np.ndarray, budget: int) -> dict[int, list[int]]:
    """Group index -> positions of the first `budget` units of a global order."""
    group_of, position = group_of[:max(budget, 0)], position[:max(budget, 0)]
    by_group = np.argsort(group_of, kind="stable")
    indices, starts = np.unique(group_of[by_group], return_index=True)
    return {gi: part.tolist() for gi, part in zip(indices.tolist(), np.split(position[by_group], starts[1:]))}


def _protect_members(analysis: Analysis, groups: dict[int, Group], chosen: dict[int, list[int]],
                     unit_scores: dict[int, np.ndarray], unit_ids: dict[int, np.ndarray] | None = None) -> None:
    """Spare the best unit of any member that would lose every position (a concat input, say)."""
    gone = _cut_units(analysis, _removed_ids(groups, chosen, unit_ids))
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


def _removed_ids(groups: dict[int, Group], chosen: dict[int, list[int]],
                 unit_ids: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Unit (component) ids of the positions `chosen` cuts (`unit_ids`: each group's units, as arrays)."""
    unit_ids = unit_ids or {}
    parts = [unit_ids[gi][positions] if gi in unit_ids else np.asarray(groups[gi].units)[positions]
             for gi, positions in chosen.items() if positions]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _cut_units(analysis: Analysis, removed: np.ndarray | Sequence[int]) -> np.ndarray:
    """Per unit (component id): True where the unit is cut; a lookup table, not a search."""
    gone = np.zeros(int(analysis.component.max()) + 1 if analysis.component.size else 0, dtype=bool)
    gone[np.asarray(removed, dtype=np.int64)] = True
    return gone


def _keeps(analysis: Analysis, groups: dict[int, Group], chosen: dict[int, list[int]]) -> dict[tuple[str, int], torch.Tensor]:
    gone = _cut_units(analysis, _removed_ids(groups, chosen))
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


# Layer class -> (parameter name, dim) -> "out" / "in" / None, for a user's layers outside torch.nn
# (transformers' Conv1D is known natively: `layers.is_conv1d`).
ROLES: dict[type, Callable[[str, int], str | None]] = {}


def _role(module: nn.Module, local: str, dim: int) -> str | None:
    """"out" / "in" for the standard layers' weights and biases, None for free parameters."""
    for cls in type(module).__mro__:
        if cls in ROLES:
            return ROLES[cls](local, dim)
    if is_conv1d(module) and local in ("weight", "bias"):   # weight [in, out]
        return "out" if local == "bias" or dim == 1 else "in"
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and local in ("weight", "bias"):
        return "out" if local == "bias" or dim == 1 else "in"
    if isinstance(module, _CONV_LIKE) and local in ("weight", "bias"):
        return "out" if local == "bias" or dim == 0 else "in"
    if isinstance(module, _NORMS) and local in ("weight", "bias"):
        return "out"
    if isinstance(module, nn.Embedding) and local == "weight":
        return "out" if dim == 1 else None
    return None


def _rnn_implied_keeps(rnn: nn.RNNBase, units: dict[tuple[int, str], torch.Tensor],
                       inputs: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """Every (parameter, dim) keep of an RNN that its hidden units per (layer, direction) and
    its layer-0 input features imply: gate rows, recurrent columns, next-layer columns."""
    size = rnn.hidden_size
    gates = rnn.weight_ih_l0.shape[0] // size
    directions = ("", "_reverse") if rnn.bidirectional else ("",)
    implied = {}
    for (layer, suffix), kept in units.items():
        tag = f"l{layer}{suffix}"
        rows = (torch.arange(gates)[:, None] * size + kept).flatten()
        for name in (f"weight_ih_{tag}", f"weight_hh_{tag}", f"bias_ih_{tag}", f"bias_hh_{tag}"):
            implied[(name, 0)] = rows
        implied[(f"weight_hh_{tag}", 1)] = kept
        below = [units[(layer - 1, s)] + i * size for i, s in enumerate(directions)] if layer else [inputs]
        implied[(f"weight_ih_{tag}", 1)] = torch.cat(below)
    return implied


def _cut_rnn(rnn: nn.RNNBase, keeps: dict[tuple[str, int], torch.Tensor]) -> None:
    """Cut an nn.RNN / LSTM / GRU from its (local parameter, dim) keeps.

    Hidden units are read from weight_hh's columns and cut with surgery.keep_hidden_all,
    layer 0's input features from weight_ih_l0's columns; every other keep must be the one
    those imply, or the plan does not describe this RNN and nothing is cut.
    """
    name = type(rnn).__name__
    if rnn.proj_size:
        raise IncompatibleLayer(f"{name} with proj_size={rnn.proj_size}: projected hidden units cannot be pruned")
    directions = ("", "_reverse") if rnn.bidirectional else ("",)
    every = torch.arange(rnn.hidden_size)
    units = {(k, s): keeps.get((f"weight_hh_l{k}{s}", 1), every) for k in range(rnn.num_layers) for s in directions}
    inputs = keeps.get(("weight_ih_l0", 1), torch.arange(rnn.input_size))
    implied = _rnn_implied_keeps(rnn, units, inputs)
    for (local, dim), keep in keeps.items():
        expected = implied.get((local, dim))
        if expected is None or not torch.equal(expected, keep.to(expected.dtype)):
            raise IncompatibleLayer(f"{name}: the keep for {local}:{dim} does not match the hidden units and "
                                    "the input features kept (the columns of weight_hh and weight_ih_l0)")
    if any((f"weight_hh_l{k}{s}", 1) in keeps for k, s in units):
        forward = [units[(k, "")] for k in range(rnn.num_layers)]
        reverse = [units[(k, "_reverse")] for k in range(rnn.num_layers)] if rnn.bidirectional else None
        surgery.keep_hidden_all(rnn, forward, reverse)
    if ("weight_ih_l0", 1) in keeps:
        surgery.keep_in(rnn, inputs)


def apply_keeps(model: nn.Module, keeps: dict[tuple[str, int], torch.Tensor]) -> None:
    """Cut every (parameter, dim) down to its kept positions, module by module."""
    tied = _tied_parameters(model)
    calls: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = {}
    heads: dict[int, tuple[nn.MultiheadAttention, torch.Tensor]] = {}
    recurrent: dict[int, tuple[nn.RNNBase, dict[tuple[str, int], torch.Tensor]]] = {}
    free = []
    for (name, dim), keep in keeps.items():
        module, local, parent = _owner(model, name)
        if isinstance(module, nn.RNNBase):
            recurrent.setdefault(id(module), (module, {}))[1][(local, dim)] = keep
            continue
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
    for module, module_keeps in recurrent.values():
        _cut_rnn(module, module_keeps)
    _retie(model, tied)
    surgery.turn_off_nested_tensors(model)


def _tied_parameters(model: nn.Module) -> list[tuple[list[str], nn.Parameter]]:
    """Parameters shared under two or more names (an LM head tied to its embedding)."""
    shared: dict[int, tuple[list[str], nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), ([], p))[0].append(name)
    return [entry for entry in shared.values() if len(entry[0]) > 1]


def _retie(model: nn.Module, tied: list[tuple[list[str], nn.Parameter]]) -> None:
    """Share again a tied parameter that surgery replaced under one of its names."""
    for names, original in tied:
        owners = [_owner(model, n)[:2] for n in names]
        source = next((getattr(m, local) for m, local in owners if getattr(m, local) is not original), None)
        if source is None:
            continue
        for module, local in owners:
            setattr(module, local, source)
            if isinstance(module, nn.Linear) and local == "weight":
                module.out_features, module.in_features = source.shape
            elif isinstance(module, nn.Embedding) and local == "weight":
                module.num_embeddings, module.embedding_dim = source.shape


# Integer attributes hand-written attention modules keep for their head counts.
HEAD_COUNT_ATTRIBUTES = ("num_heads", "heads", "n_heads", "n_head", "num_attention_heads", "num_key_value_heads",
                         "n_kv_heads", "kv_heads", "num_kv_heads", "all_head_size", "inner_dim",
                         "split_size")


def _update_head_counts(model: nn.Module, cut: list[tuple[Group, int]]) -> dict[str, dict[str, int]]:
    """Scale the head-count attributes of the attention module that owns each cut head group.

    A module that reshapes with `self.num_heads` would break after its projections lose
    heads; nn.MultiheadAttention is handled by surgery itself. Returns what changed.
    """
    changed: dict[str, dict[str, int]] = {}
    for group, removed in cut:
        kept = group.size - removed
        for prefix in _head_owners(group):
            owner = model.get_submodule(prefix) if prefix else model
            if isinstance(owner, (nn.MultiheadAttention, nn.ModuleList, nn.Sequential)):
                continue
            for attribute in HEAD_COUNT_ATTRIBUTES:
                value = getattr(owner, attribute, None)
                if isinstance(value, int) and not isinstance(value, bool) and value % group.size == 0:
                    setattr(owner, attribute, value // group.size * kept)
                    changed.setdefault(prefix, {})[attribute] = value // group.size * kept
    return changed


def _head_owners(group: Group) -> list[str]:
    """The modules that may count a head group's heads: the members' common ancestor and
    each projection's parent (a head group can span layers that share a per-head bias)."""
    names = [n.rpartition(".")[0] for n, _ in group.members]
    prefix = names[0]
    while prefix and not all(n == prefix or n.startswith(prefix + ".") for n in names):
        prefix = prefix.rpartition(".")[0]
    return list(dict.fromkeys([prefix] + [n.rpartition(".")[0] for n in names if n]))


def _output_shapes(graph) -> list[tuple[int, ...]]:
    return [graph.tensors[i].shape for i in graph.outputs]


def prune_structured(
    model: nn.Module,
    example_inputs: Any,
    ratio: float | dict[str, float] | None = None,
    *,
    target: str | None = None,
    method: str | Criterion = "l2",
    scope: str = "local",
    units: Sequence[str] = UNIT_KINDS,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    round_to: int | None = None,
    ignore: Sequence[str] = (),
    max_ratio: float | dict[str, float] | None = None,
    compensate: bool = False,
    seed: int = 0,
) -> StructuredPlan:
    """Remove the least important channels / heads of `model` in place; returns the plan.

    `ratio` is the fraction of units removed from each prunable group (scope "local")
    or in total, ranked after dividing by each group's mean score (scope "global", at
    most 90% of any group). `target="macs=0.5"` or `"params=0.3"` instead searches the
    global ratio that brings that cost to the given fraction of today's; the search
    costs each trial ratio from the traced graph, so it takes about as long as one prune.

    A dict `{glob: fraction}` (matched against member parameter and module names, first
    matching pattern wins) gives per-group ratios (scope "local"; unmatched groups keep
    all units). `max_ratio`, a fraction or such a dict, caps the fraction of each
    group's units removed under every scope and target search (default: no cap
    locally, 0.9 globally).

    `compensate=True` (needs `data`) folds the mean contribution of every removed input
    of a linear layer into that layer's bias (FLAP's bias compensation; a bias is added
    where there was none): a cheap, training-free repair that matters most for
    transformers pruned without recovery. Conv layers are not compensated.
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
    if max_ratio is not None:
        _check_spec("max_ratio", max_ratio, upper_inclusive=True)
    if compensate and data is None:
        raise MissingData("compensate=True needs calibration data (data=...) for the mean inputs it folds in")
    criterion = get_criterion(method, seed=seed)
    if target is not None:
        budget = parse_target(target)
        scope = "global"
    else:
        _check_spec("ratio", ratio, upper_inclusive=False)
        if isinstance(ratio, dict) and scope != "local":
            raise InvalidArgument(f"a per-group ratio dict needs scope='local', got scope={scope!r}")
    # One trace, one analysis and one scoring serve the ratio search and the cut alike.
    scored = _score(model, example_inputs, criterion, Calibration(data, loss_fn), units, ignore)
    checks: list[dict[str, float]] = []
    if target is not None:
        cost = BUDGETS[budget.key].cost(model, example_inputs, scored, budget)
        ratio = _search_ratio(model, example_inputs, scored, budget, cost, round_to, max_ratio)
        if budget.key == "latency_ms":
            ratio, checks = _check_latency(model, example_inputs, scored, budget, cost, ratio, round_to, max_ratio)
    chosen = _selection(scored, ratio, scope, round_to, max_ratio)
    dense = bias_compensation.snapshot(model, Calibration(data, loss_fn)) if compensate else None
    plan = _cut(model, example_inputs, scored, chosen, criterion.name, ratio)
    if dense is not None:
        _compensate(model, dense, plan)
    if target is not None:
        plan.budget = _budget_record(model, example_inputs, scored, chosen, plan, budget, cost)
        if checks:
            plan.budget["checks"] = checks
    _remember(model, plan)
    return plan


# A latency cut is measured on a copy before the model is touched, and the search repeated
# with the budget scaled by measured / predicted, at most this many times.
LATENCY_CHECKS = 3


def _check_latency(model: nn.Module, example_inputs: Any, scored: _Scored, budget: Target, cost: _Cost,
                   ratio: float, round_to: int | None,
                   max_ratio: float | dict[str, float] | None) -> tuple[float, list[dict[str, float]]]:
    """The searched ratio, cut further until a cut copy measures within the budget; and each check.

    The table predicts the sum of ops timed alone; the model as a whole can run a few
    percent slower or faster. Where the measured cut misses the budget, the search runs
    again for the budget times predicted / measured. A budget the largest allowed cut
    cannot meet on that corrected scale keeps the last cut (its check says so).
    """
    checks = []
    limit = budget.value
    for _ in range(LATENCY_CHECKS):
        chosen = _selection(scored, ratio, "global", round_to, max_ratio)
        trial = copy.deepcopy(model)
        _cut(trial, example_inputs, scored, chosen, "check", ratio, check=False)
        predicted = cost.of(_chosen_shapes(scored, chosen))
        measured = latency_ms(trial, example_inputs, threads=cost.threads)
        checks.append({"ratio": ratio, "predicted": predicted, "measured": measured})
        if measured <= budget.value:
            break
        limit *= predicted / measured
        try:
            ratio = _search_ratio(model, example_inputs, scored, Target(budget.key, limit, budget.threads), cost,
                                  round_to, max_ratio)
        except InvalidArgument:
            break   # even the largest cut misses the corrected budget: keep the last one
    return ratio, checks


def _compensate(model: nn.Module, dense: bias_compensation.Snapshot, plan: StructuredPlan) -> None:
    """Fold the removed inputs' means into the biases and record it in `plan` (so replay adds the biases)."""
    had_bias = {name for name, m in model.named_modules() if getattr(m, "bias", None) is not None}
    plan.compensated = bias_compensation.compensate(model, dense, plan.keeps)
    plan.added_biases = [name for name in plan.compensated if name not in had_bias]
    plan.params_after = total_parameters(model)
    if hf.is_hf_model(model):
        hf.update_config(model)


@dataclass
class _Scored:
    """What pruning needs from the dense model: its graph and groups, unit scores and costs."""

    graph: Graph
    analysis: Analysis
    groups: list[Group]
    unit_scores: dict[int, np.ndarray]
    macs: int
    params: int
    unit_ids: dict[int, np.ndarray] = field(default_factory=dict)   # group index -> its units, as an array


def _macs(graph: Graph, model: nn.Module, example_inputs: Any) -> int:
    """MACs from the traced graph; a real forward only where the graph cannot tell (an RNN run as one op)."""
    macs = graph_macs(graph)
    return count_macs(model, example_inputs)[0] if macs is None else macs


def _score(model: nn.Module, example_inputs: Any, criterion: Criterion, calibration: Calibration,
           units: Sequence[str], ignore: Sequence[str]) -> _Scored:
    """Trace, group and score `model` once: all that the ratio search and the cut read."""
    graph = trace(model, example_inputs)
    analysis = analyze_graph(graph)
    groups = [g for g in analysis.groups if g.kind in units and g.prunable_units and not _ignored(g, ignore)]
    scores = _element_scores(model, criterion, calibration)
    unit_scores = {g.index: _unit_scores(analysis, g, scores, model) for g in groups}
    return _Scored(graph, analysis, groups, unit_scores, _macs(graph, model, example_inputs), total_parameters(model),
                   {g.index: np.asarray(g.units, dtype=np.int64) for g in groups})


def _selection(scored: _Scored, ratio: float | dict[str, float], scope: str, round_to: int | None,
               max_ratio: float | dict[str, float] | None) -> dict[int, list[int]]:
    """Group index -> positions of the units to cut, members that would lose everything spared."""
    ratios = _per_group(scored.groups, ratio, 0.0) if isinstance(ratio, dict) else ratio
    caps = _per_group(scored.groups, max_ratio, 1.0 if scope == "local" else 0.9)
    chosen = _choose(scored.analysis, scored.groups, scored.unit_scores, ratios, scope, round_to, caps)
    _protect_members(scored.analysis, {g.index: g for g in scored.groups}, chosen, scored.unit_scores, scored.unit_ids)
    return chosen


def _cut(model: nn.Module, example_inputs: Any, scored: _Scored, chosen: dict[int, list[int]],
         method: str, ratio: float | dict[str, float], check: bool = True) -> StructuredPlan:
    """Remove the chosen units from `model`, check its output shapes, and return the plan.

    With `check`, the cut is first rehearsed on a copy without data (`_rehearse`): a
    model the cut would break is refused before it is touched.
    """
    by_index = {g.index: g for g in scored.groups}
    keeps = _keeps(scored.analysis, by_index, chosen)
    heads = [(by_index[gi], len(p)) for gi, p in chosen.items() if p and by_index[gi].kind == "head"]
    shapes = _output_shapes(scored.graph)
    if check and keeps:
        _rehearse(model, example_inputs, keeps, heads, shapes, fake=scored.graph.fake)
    attributes = _apply(model, keeps, heads)
    if check and scored.graph.fake and graph_macs(scored.graph) is not None:
        # the rehearsal checked the output shapes; the graph gives the MACs of the cut widths
        macs = _estimated_cost(scored, "macs", chosen)
    else:
        # one real forward, fed and read as the tracer does, checks the output shapes and
        # counts the MACs (an RNN run as one op needs it): cheaper than tracing again
        args, kwargs = _split_inputs(model, example_inputs)
        macs, output = macs_and_output(model, lambda: model(*args, **kwargs))
        after = [tuple(v.shape) for v in _leaves(output) if isinstance(v, torch.Tensor)]
        if after != shapes:
            raise IncompatibleLayer(f"pruning changed the output shapes {shapes} -> {after}; please report this model")
    plan = StructuredPlan(method, dict(ratio) if isinstance(ratio, dict) else float(ratio),
                          params_before=scored.params, macs_before=scored.macs,
                          keeps={f"{n}:{d}": k.tolist() for (n, d), k in keeps.items()}, attributes=attributes)
    plan.groups = [GroupPlan(g.index, g.kind, [f"{n}:{d}" for n, d in g.members], g.size,
                             sorted(chosen.get(g.index, []))) for g in scored.groups]
    plan.params_after = total_parameters(model)
    plan.macs_after = macs
    return plan


def _apply(model: nn.Module, keeps: dict[tuple[str, int], torch.Tensor],
           heads: list[tuple[Group, int]]) -> dict[str, dict[str, int]]:
    """Cut `model` to `keeps`, update its head counts and, for a Hugging Face model, its config."""
    apply_keeps(model, keeps)
    attributes = _update_head_counts(model, heads)
    if hf.is_hf_model(model):
        hf.update_config(model)
    return attributes


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device (no memory, no data)."""
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _rehearse(model: nn.Module, example_inputs: Any, keeps: dict[tuple[str, int], torch.Tensor],
              heads: list[tuple[Group, int]], shapes: list[tuple[int, ...]], fake: bool) -> None:
    """Cut a data-free copy of `model` and run it on fake tensors; raise if the cut would break it.

    A model can hold widths the graph does not show (Phi-3 slices its fused q/k/v
    projection with bounds read from its config): such a model fails here, while the
    user's model is still whole. Models the tracer could only run for real (data-
    dependent control flow) are rehearsed on a real copy instead.
    """
    devices = {n: t.device for n, t in list(model.named_parameters(remove_duplicate=False))
               + list(model.named_buffers(remove_duplicate=False))}
    rehearsal = _skeleton(model) if fake else copy.deepcopy(model)
    try:
        _apply(rehearsal, keeps, heads)
        args, kwargs = _split_inputs(rehearsal, example_inputs)
        if fake:
            after = _fake_output_shapes(rehearsal, devices, args, kwargs)
        else:
            with torch.no_grad():
                after = [tuple(v.shape) for v in _leaves(rehearsal.eval()(*args, **kwargs))
                         if isinstance(v, torch.Tensor)]
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IncompatibleLayer(f"the cut would break this model ({first}); it was left unchanged: "
                                "leave the failing layers out with ignore=[...]") from None
    if after != shapes:
        raise IncompatibleLayer(f"the cut would change the output shapes {shapes} -> {after}; "
                                "the model was left unchanged: please report it")


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Silence FakeTensorMode's traceback log: a failing rehearsal is reported as one line instead."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _fake_output_shapes(model: nn.Module, devices: dict[str, torch.device], args: tuple,
                        kwargs: dict) -> list[tuple[int, ...]]:
    """Output shapes of `model` run under FakeTensorMode, its tensors stood in for by fakes of their shapes."""
    with _quiet_fake_tensor_log(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        state = {n: torch.empty(t.shape, dtype=t.dtype, device=devices[n])
                 for n, t in list(model.named_parameters(remove_duplicate=False))
                 + list(model.named_buffers(remove_duplicate=False))}
        flat, spec = pytree.tree_flatten((args, kwargs))
        flat = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in flat]
        args, kwargs = pytree.tree_unflatten(flat, spec)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = torch.func.functional_call(model, state, args, kwargs, tie_weights=False, strict=False)
        finally:
            model.train(was_training)
    return [tuple(v.shape) for v in _leaves(output) if isinstance(v, torch.Tensor)]


@dataclass(frozen=True)
class Target:
    """A structured pruning budget: the model's `key` cost brought to at most `value`."""

    key: str                      # a key of BUDGETS: "macs", "params", "bytes" or "latency_ms"
    value: float                  # a fraction of the dense model's cost; milliseconds for latency_ms
    threads: int | None = None    # latency_ms: CPU threads it is timed at (None: torch's current count)

    def __str__(self) -> str:
        return f"{self.key}={self.value:.10g}" + (f",threads={self.threads}" if self.threads else "")


TARGET_FORMS = ("'macs=0.5', 'params=0.3' or 'bytes=0.5' (a fraction of the dense model's, in (0, 1]), "
                "or 'latency_ms=5' (milliseconds on this machine; ',threads=2' fixes the thread count)")


def parse_target(target: str) -> Target:
    """The budget that `target` ("macs=0.5", "latency_ms=5,threads=2", ...) names; InvalidArgument if none."""
    bad = InvalidArgument(f"target must look like {TARGET_FORMS}, got {target!r}")
    if not isinstance(target, str):
        raise bad
    head, _, option = target.partition(",")
    key, _, text = head.strip().partition("=")
    try:
        value = float(text)
    except ValueError:
        raise bad from None
    kind = BUDGETS.get(key)
    if kind is None or not (value > 0 if kind.absolute else 0.0 < value <= 1.0) or not np.isfinite(value):
        raise bad
    if not option:
        return Target(key, value)
    name, _, count = option.strip().partition("=")
    if not kind.absolute or name != "threads" or not count.isdigit() or int(count) < 1:
        raise bad
    return Target(key, value, int(count))


# Bisection steps of the target search: the ratio is found to within 0.95 / 2**16.
SEARCH_STEPS = 16


def cut_shapes(analysis: Analysis, removed: np.ndarray | Sequence[int]) -> dict[int, tuple[int, ...]]:
    """Tensor node -> its shape once the units (component ids) `removed` are cut, for every node."""
    table = analysis.dims
    kept = np.concatenate([[0], np.cumsum(~_cut_units(analysis, removed)[analysis.component])])
    sizes = kept[table.offsets[1:]] - kept[table.offsets[:-1]]
    return {t.index: tuple(int(sizes[table.ids[(t.index, d)]]) for d in range(len(t.shape)))
            for t in analysis.graph.tensors}


# Costs the dense graph gives for any cut, from the cut tensor shapes (node -> shape) alone.
GRAPH_COSTS: dict[str, Callable[[Graph, dict[int, tuple[int, ...]]], int | None]] = {
    "macs": graph_macs, "params": graph_params, "bytes": graph_bytes,
}


def _estimated_cost(scored: _Scored, key: str, chosen: dict[int, list[int]]) -> int:
    """MACs, parameters or bytes the model would have with `chosen` cut, computed from the graph alone."""
    return GRAPH_COSTS[key](scored.graph, _chosen_shapes(scored, chosen))


def _chosen_shapes(scored: _Scored, chosen: dict[int, list[int]]) -> dict[int, tuple[int, ...]]:
    return cut_shapes(scored.analysis, _removed_ids({g.index: g for g in scored.groups}, chosen, scored.unit_ids))


@dataclass
class _Cost:
    """A budget's cost of any cut, as a function of the cut tensor shapes, and the dense model's."""

    of: Callable[[dict[int, tuple[int, ...]]], float | None]
    dense: float
    details: dict[str, Any] = field(default_factory=dict)   # recorded in the plan's budget
    threads: int = 1


def _graph_cost(key: str, dense: Callable[[_Scored], float]) -> Callable[..., _Cost]:
    def build(model: nn.Module, example_inputs: Any, scored: _Scored, target: Target) -> _Cost:
        return _Cost(lambda shapes: GRAPH_COSTS[key](scored.graph, shapes), dense(scored))
    return build


def _latency_cost(model: nn.Module, example_inputs: Any, scored: _Scored, target: Target) -> _Cost:
    """Predicted milliseconds from the model's per-op latency table (`secateurs.latency`)."""
    from .latency import latency_table

    table = latency_table(model, example_inputs, threads=target.threads, graph=scored.graph, analysis=scored.analysis)
    details = {"threads": table.threads, "remainder_ms": table.remainder_ms,
               "table": str(table.path) if table.path else None}
    return _Cost(table.predict, table.dense_ms, details, table.threads)


@dataclass(frozen=True)
class _BudgetKind:
    """How a target key is costed while searching, and measured on the cut model."""

    cost: Callable[[nn.Module, Any, _Scored, Target], _Cost]
    measure: Callable[[nn.Module, Any, StructuredPlan, _Cost], float]
    absolute: bool = False        # the value is in the cost's own unit, not a fraction of the dense cost
    unit: str = ""


BUDGETS: dict[str, _BudgetKind] = {
    "macs": _BudgetKind(_graph_cost("macs", lambda s: s.macs), lambda m, x, plan, cost: plan.macs_after),
    "params": _BudgetKind(_graph_cost("params", lambda s: s.params), lambda m, x, plan, cost: plan.params_after),
    "bytes": _BudgetKind(_graph_cost("bytes", lambda s: graph_bytes(s.graph)),
                         lambda m, x, plan, cost: tensor_bytes(m), unit=" bytes"),
    "latency_ms": _BudgetKind(_latency_cost, lambda m, x, plan, cost: latency_ms(m, x, threads=cost.threads),
                              absolute=True, unit=" ms"),
}


def _budget_record(model: nn.Module, example_inputs: Any, scored: _Scored, chosen: dict[int, list[int]],
                   plan: StructuredPlan, target: Target, cost: _Cost) -> dict[str, Any]:
    """The plan's budget entry: the target, the dense cost, the predicted and the measured cost of the cut."""
    kind = BUDGETS[target.key]
    limit = target.value if kind.absolute else target.value * cost.dense
    return {"target": str(target), "key": target.key, "limit": limit, "dense": cost.dense,
            "predicted": cost.of(_chosen_shapes(scored, chosen)),
            "measured": kind.measure(model, example_inputs, plan, cost), **cost.details}


def _trial_cost(model: nn.Module, example_inputs: Any, scored: _Scored, key: str,
                chosen: dict[int, list[int]]) -> int:
    """The cost measured on a pruned copy: for graphs whose MACs the graph alone cannot give."""
    trial = copy.deepcopy(model)
    plan = _cut(trial, example_inputs, scored, chosen, "trial", 0.0, check=False)
    return plan.macs_after if key == "macs" else plan.params_after


def _search_ratio(model: nn.Module, example_inputs: Any, scored: _Scored, target: Target, cost: _Cost,
                  round_to: int | None, max_ratio: float | dict[str, float] | None) -> float:
    """The smallest global ratio (to SEARCH_STEPS bisections) whose cost meets `target`.

    The cost of each trial ratio is computed from the kept widths on the dense graph, so
    the search cuts nothing and costs a fraction of one prune; graphs holding an opaque
    module (an RNN) fall back to measuring a pruned copy per trial. A target that even
    the largest cut the caps allow misses is refused with what that cut would cost.
    """
    kind = BUDGETS[target.key]
    opaque = target.key == "macs" and graph_macs(scored.graph) is None
    scale = 1.0 if kind.absolute else cost.dense
    # the ranking does not depend on the ratio: rank once, and each trial takes a prefix
    order = _global_order(scored.groups, scored.unit_scores, _per_group(scored.groups, max_ratio, 0.9), round_to)
    total = sum(g.size for g in scored.groups)
    by_index = {g.index: g for g in scored.groups}

    def trial(ratio: float) -> float:
        chosen = _first(*order, int(ratio * total))   # as _selection(scored, ratio, "global", ...) chooses
        _protect_members(scored.analysis, by_index, chosen, scored.unit_scores, scored.unit_ids)
        if opaque:
            return _trial_cost(model, example_inputs, scored, target.key, chosen)
        return cost.of(_chosen_shapes(scored, chosen))

    low, high = 0.0, 0.95
    most = trial(high)
    if most / scale > target.value:
        share = "" if kind.absolute else f", {most / cost.dense:.1%} of the dense model's"
        raise InvalidArgument(f"target {target} cannot be met: the largest cut max_ratio allows (default 0.9 of "
                              f"each group) leaves {target.key} at {most:.4g}{kind.unit}{share}")
    for _ in range(SEARCH_STEPS if not opaque else 10):
        mid = (low + high) / 2
        if trial(mid) / scale > target.value:
            low = mid
        else:
            high = mid
    return high


# A model's own record of the structured plans cut into it, in order (a plain attribute, so
# copies carry it): `io.save` given only the last plan still writes every one.
PLANS_ATTRIBUTE = "_secateurs_structured_plans"


def applied_plans(model: nn.Module) -> list[StructuredPlan | dict[str, Any]]:
    """The structured plans pruned or replayed into `model`, oldest first."""
    return list(model.__dict__.get(PLANS_ATTRIBUTE, []))


def _remember(model: nn.Module, plan: StructuredPlan | dict[str, Any]) -> None:
    model.__dict__.setdefault(PLANS_ATTRIBUTE, []).append(plan)


def replay(model: nn.Module, plan: StructuredPlan | dict[str, Any]) -> nn.Module:
    """Cut a fresh `model` exactly as `plan` records, so saved weights load into it.

    A plan.json of several cuts ("steps", as `io.save` writes a list) is replayed in order.
    Raises WeightsMismatch when the plan was made on a model of another size (one of
    several cuts saved alone).
    """
    record = plan.to_dict() if isinstance(plan, StructuredPlan) else plan
    if "steps" in record:
        for step in record["steps"]:
            if step.get("keeps"):
                replay(model, step)
        return model
    before, params = record.get("params_before"), total_parameters(model)
    if before and record.get("keeps") and before != params:
        raise WeightsMismatch(f"the plan cuts a model of {before:,} parameters but this one has {params:,}: was it "
                              "pruned more than once? save every plan, in order: save(model, dir, [first, second])")
    keeps = {}
    for key, kept in record.get("keeps", {}).items():
        name, _, dim = key.rpartition(":")
        keeps[(name, int(dim))] = torch.as_tensor(kept, dtype=torch.long)
    apply_keeps(model, keeps)
    for module_name, changes in record.get("attributes", {}).items():
        owner = model.get_submodule(module_name) if module_name else model
        for attribute, value in changes.items():
            setattr(owner, attribute, value)
    for name in record.get("added_biases", []):
        # compensation created these biases: zeros here, their values come with the weights
        module = model.get_submodule(name)
        bias_compensation.add_bias(module, torch.zeros(bias_compensation.out_in(module).shape[0]))
    if hf.is_hf_model(model):
        hf.update_config(model)
    _remember(model, record)
    return model
