"""Sensitivity analysis per group, and the allocation that spends a cost budget where it hurts least.

`sensitivity` measures, for each prunable group of coupled channels or heads, the
evaluation metric with only that group pruned at each ratio of a grid, with no recovery
(the layer-by-layer sensitivity analysis of Li et al., "Pruning Filters for Efficient
ConvNets", ICLR 2017, applied to groups). A point costs one evaluation: the group's
lowest-scored units are zeroed in place and restored afterwards, since removing a unit
equals zeroing every parameter slice of it (`mode="cut"` prunes a copy instead, for
groups that pass through a normalisation over channels, where the two differ). The
curves are cached in a JSON file keyed by the weights, the grid, the criterion and a
caller's key for the data.

`allocate` / `prune_by_sensitivity` turn the curves into one ratio per group that meets a
MACs or parameter budget: greedily, the step with the least predicted metric loss per
unit of cost saved, each candidate costed from the traced graph without cutting
anything. The predicted loss of an allocation is the sum of its groups' losses.

    curves = sensitivity(model, x, lambda m: evaluate_accuracy(m, held_out), data_key="held-out-v1",
                         cache_dir="~/.cache/secateurs/sensitivity")
    plan = prune_by_sensitivity(model, x, curves, "macs=0.25")
"""
from __future__ import annotations

import bisect
import dataclasses
import contextlib
import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .batches import LossFn
from .batches import mean_loss
from .criteria import Calibration, Criterion, get_criterion
from .errors import IncompatibleLayer, InvalidArgument
from .graph import trace
from .graph.groups import analyze_graph
from .measure import graph_macs, total_parameters
from .recover.finetune import evaluate_accuracy
from .structured import BUDGETS, GRAPH_COSTS, SEARCH_STEPS, UNIT_KINDS, Budget, StructuredPlan, parse_target
from .structured.apply import chosen_shapes, cut_model
from .structured.options import check_options, resolve_round_to
from .structured.units import Scored, choose_units, dense_macs, gemm_width, group_quanta, keeps_of, protect_members, score_model

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Bump when the cached record's meaning changes, so old files are recomputed rather than misread.
CACHE_VERSION = 1
BUDGET_KEYS = ("macs", "params", "bytes")   # the costs the graph gives without cutting

Evaluate = Callable[[nn.Module], float]


@dataclass
class GroupCurve:
    """One group's metric at each ratio of the grid, and the order its units are removed in."""

    index: int               # the group's index in `graph.groups.analyze`
    label: str               # its first layer's name (unique within one Sensitivity)
    kind: str                # "channel" or "head"
    units: int
    members: list[str]       # "parameter:dim", as StructuredPlan writes them
    order: list[int]         # prunable positions, least important first: what a ratio removes
    removed: list[int]       # units removed at each ratio
    metric: list[float]      # the metric at each ratio


@dataclass
class Sensitivity:
    """Per-group sensitivity curves of one model, with what they were measured with."""

    ratios: list[float]
    baseline: float                     # the metric of the unpruned model
    higher_is_better: bool
    metric_name: str
    method: str
    mode: str
    round_to: int | None
    key: str                            # the cache key: weights, grid, criterion, data key
    curves: list[GroupCurve] = field(default_factory=list)
    seconds: float = 0.0                # time to measure them (not to read them from the cache)
    cached: bool = False                # True when read from the cache

    def loss(self, curve: GroupCurve, ratio: float) -> float:
        """Predicted metric loss of pruning `curve`'s group at `ratio` (linear between grid points)."""
        xs, ys = [0.0] + self.ratios, [0.0] + [self._loss(m) for m in curve.metric]
        if ratio >= xs[-1]:
            return ys[-1]
        upper = bisect.bisect_right(xs, ratio)
        if xs[upper - 1] == ratio:
            return ys[upper - 1]
        low, high = ys[upper - 1], ys[upper]
        if math.isinf(low) or math.isinf(high):     # a failed (non-finite) metric on either side
            return math.inf
        return low + (high - low) * (ratio - xs[upper - 1]) / (xs[upper] - xs[upper - 1])

    def _loss(self, metric: float) -> float:
        if not math.isfinite(metric):
            return math.inf
        return self.baseline - metric if self.higher_is_better else metric - self.baseline

    def report_curves(self) -> dict[str, list[list[float]]]:
        """{group label: [[ratio, metric], ...]} from ratio 0 (the baseline): what a run's metrics.json holds."""
        return {c.label: [[0.0, self.baseline]] + [[r, m] for r, m in zip(self.ratios, c.metric)]
                for c in self.curves}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Sensitivity:
        fields = {k: v for k, v in record.items() if k != "curves"}
        return cls(**fields, curves=[GroupCurve(**c) for c in record["curves"]])


@dataclass
class Allocation:
    """Per-group ratios that meet a budget, their predicted metric loss and estimated cost."""

    allocation: str
    target: str
    ratios: dict[int, float]            # group index -> fraction of its units removed
    labels: dict[int, str]              # group index -> its label in the curves
    predicted_loss: float
    cost_fraction: float                # estimated cost after the cut / before, from the graph

    def by_label(self) -> dict[str, float]:
        return {self.labels[i]: r for i, r in self.ratios.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"allocation": self.allocation, "target": self.target, "ratios": self.by_label(),
                "predicted_loss": self.predicted_loss, "cost_fraction": self.cost_fraction}


# ------------------------------------------------------------------------ evaluation helpers

def mean_loss_metric(batches: Iterable[Any], loss_fn: LossFn) -> Evaluate:
    """An evaluate function: the mean of `loss_fn(model(inputs), targets)` over (inputs, targets) batches."""
    batches = list(batches)

    return lambda model: mean_loss(model, batches, loss_fn)


def top1_accuracy(batches: Iterable[Any], loss_fn: LossFn | None = None) -> Evaluate:
    """An evaluate function: top-1 accuracy over (inputs, labels) batches (`loss_fn` is unused)."""
    batches = list(batches)
    return lambda model: evaluate_accuracy(model, batches)


# Metric name -> (evaluate-function factory over batches and a loss, whether higher is better).
METRICS: dict[str, tuple[Callable[[Iterable[Any], LossFn], Evaluate], bool]] = {
    "loss": (mean_loss_metric, False),
    "accuracy": (top1_accuracy, True),
}


def data_digest(batches: Iterable[Any]) -> str:
    """sha256 of every tensor in `batches`: a data key for the cache when the data are tensors."""
    digest = hashlib.sha256()
    for batch in batches:
        for tensor in (batch if isinstance(batch, (tuple, list)) else (batch,)):
            if isinstance(tensor, torch.Tensor):
                digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
                digest.update(_bytes(tensor))
    return digest.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(_bytes(tensor))
    return digest.hexdigest()


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------------ measuring one point

@contextlib.contextmanager
def _zeroed(model: nn.Module, example_inputs: Any, scored: Scored,
            chosen: dict[int, list[int]]) -> Iterator[nn.Module]:
    """`model` with the chosen units' parameter slices zeroed; the weights are restored on exit."""
    keeps = keeps_of(scored.analysis, {g.index: g for g in scored.groups}, chosen)
    saved = []
    with torch.no_grad():
        try:
            for (name, dim), keep in keeps.items():
                param = model.get_parameter(name)
                drop = torch.ones(param.shape[dim], dtype=torch.bool)
                drop[keep] = False
                drop = drop.nonzero().flatten().to(param.device)
                saved.append((param, dim, drop, param.index_select(dim, drop)))
                param.index_fill_(dim, drop, 0.0)
            yield model
        finally:
            for param, dim, drop, values in reversed(saved):
                param.index_copy_(dim, drop, values)


@contextlib.contextmanager
def _cut_copy(model: nn.Module, example_inputs: Any, scored: Scored,
              chosen: dict[int, list[int]]) -> Iterator[nn.Module]:
    """A copy of `model` with the chosen units physically removed."""
    trial = copy.deepcopy(model)
    cut_model(trial, example_inputs, scored, chosen, "sensitivity", 0.0, check=False)
    yield trial.eval()


# How a point is measured: zero the units in place (fast, exact for conv / linear chains) or cut a copy.
MODES: dict[str, Callable[..., contextlib.AbstractContextManager[nn.Module]]] = {"zero": _zeroed, "cut": _cut_copy}


def _chosen(scored: Scored, ratios: dict[int, float], round_to: int | None) -> dict[int, list[int]]:
    """Group index -> positions removed when each group in `ratios` loses that fraction, as the cut chooses."""
    groups = [g for g in scored.groups if ratios.get(g.index, 0.0) > 0.0]
    chosen = choose_units(scored.analysis, groups, scored.unit_scores, ratios, "local", group_quanta(scored, round_to))
    protect_members(scored.analysis, {g.index: g for g in groups}, chosen, scored.unit_scores, scored.unit_ids)
    return chosen


def _ranked(scored: Scored) -> tuple[Scored, dict[int, list[int]]]:
    """`scored` with each group's unit scores replaced by their removal rank, and those orders."""
    orders, ranks = {}, {}
    for g in scored.groups:
        order = sorted(np.flatnonzero(g.prunable).tolist(), key=lambda i: scored.unit_scores[g.index][i])
        orders[g.index], ranks[g.index] = order, _rank_scores(order, g.size)
    return _replace_scores(scored, ranks), orders


def _rank_scores(order: list[int], size: int) -> np.ndarray:
    scores = np.full(size, float(size))
    scores[np.asarray(order, dtype=np.int64)] = np.arange(len(order), dtype=float)
    return scores


def _replace_scores(scored: Scored, unit_scores: dict[int, np.ndarray]) -> Scored:
    return dataclasses.replace(scored, unit_scores=unit_scores)


def _metric(evaluate: Evaluate, model: nn.Module) -> float:
    with torch.no_grad():
        value = evaluate(model)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"evaluate must return a number (the metric), got {type(value).__name__}: {value!r}")
    return float(value)


def _labels(scored: Scored) -> dict[int, str]:
    """Group index -> its first member's layer name, with '#index' where two groups would share one."""
    names = {g.index: g.members[0][0].rpartition(".")[0] or g.members[0][0] for g in scored.groups}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {i: name if counts[name] == 1 else f"{name}#{i}" for i, name in names.items()}


def _curve(model: nn.Module, example_inputs: Any, scored: Scored, index: int, order: list[int], label: str,
           grid: list[float], evaluate: Evaluate, baseline: float, mode: str, round_to: int | None,
           on_point: Callable[[], Any] | None) -> GroupCurve:
    """The metric with only group `index` pruned, at each ratio of `grid`."""
    group = next(g for g in scored.groups if g.index == index)
    removed, metric = [], []
    for ratio in grid:
        chosen = _chosen(scored, {index: ratio}, round_to)
        count = len(chosen.get(index, []))
        if count == 0:
            value = baseline
        elif removed and count == removed[-1]:    # the same units as the ratio before: the same metric
            value = metric[-1]
        else:
            with MODES[mode](model, example_inputs, scored, chosen) as pruned:
                value = _metric(evaluate, pruned)
        removed.append(count)
        metric.append(value)
        if on_point is not None:
            on_point()
    return GroupCurve(index, label, group.kind, group.size, [f"{n}:{d}" for n, d in group.members], order,
                      removed, metric)


# ------------------------------------------------------------------------ the cache

def _cache_key(model: nn.Module, grid: list[float], criterion: str, units: Sequence[str], ignore: Sequence[str],
               mode: str, round_to: int | None, higher_is_better: bool, data_key: str | None) -> str:
    record = {"version": CACHE_VERSION, "weights": weights_digest(model), "ratios": grid, "criterion": criterion,
              "units": sorted(units), "ignore": list(ignore), "mode": mode, "round_to": round_to,
              "higher_is_better": higher_is_better, "data": data_key}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _cache_file(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir).expanduser() / f"sensitivity-{key[:24]}.json"


def _read_cache(path: Path, key: str) -> Sensitivity | None:
    """The cached curves for `key`, or None (no file, another key, or an unreadable one: recompute)."""
    try:
        record = json.loads(path.read_text())
        if record.get("key") != key:
            return None
        found = Sensitivity.from_dict(record)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    found.cached = True
    return found


def _write_cache(path: Path, curves: Sensitivity) -> None:
    """Write atomically: a crash leaves no half-written cache file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(curves.to_dict(), indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------------ the analysis

def _check_grid(ratios: Sequence[float]) -> list[float]:
    """The ratios, sorted; InvalidArgument unless a non-empty list of fractions in (0, 1)."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or len(ratios) == 0:
        raise InvalidArgument(f"ratios must be a non-empty list of fractions in (0, 1), got {ratios!r}")
    for i, ratio in enumerate(ratios):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
            raise InvalidArgument(f"ratios[{i}] must be a fraction in (0, 1), got {ratio!r}")
    return sorted({float(r) for r in ratios})


def _check_options(evaluate: Any, mode: str, round_to: int | None, units: Sequence[str],
                   cache_dir: Any, data_key: str | None) -> None:
    if not callable(evaluate):
        raise InvalidArgument(f"evaluate must be a function model -> metric, got {type(evaluate).__name__}")
    if mode not in MODES:
        raise InvalidArgument(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    check_options(units=units, round_to=round_to, require_one=False)
    if cache_dir is not None and not (isinstance(data_key, str) and data_key):
        raise InvalidArgument(f"cache_dir needs data_key (a non-empty string naming the evaluation data), got "
                              f"{data_key!r}: without it curves measured on other data could be reused")


def sensitivity(
    model: nn.Module,
    example_inputs: Any,
    evaluate: Evaluate,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    method: str | Criterion = "l2",
    units: Sequence[str] = UNIT_KINDS,
    ignore: Sequence[str] = (),
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    higher_is_better: bool = True,
    metric_name: str = "metric",
    mode: str = "zero",
    round_to: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    data_key: str | None = None,
    seed: int = 0,
    on_point: Callable[[int, int], Any] | None = None,
) -> Sensitivity:
    """Return, for every prunable group, `evaluate(model)` with only that group pruned at each ratio.

    Units are ranked by `method` (with `data` / `loss_fn` for data-aware criteria), as
    `prune_structured` ranks them; the model is left exactly as it was. `evaluate` gets
    the model in eval mode and returns a number (accuracy: `higher_is_better=True`; a
    loss: False). With `cache_dir`, the curves are read from / written to a JSON file
    keyed by the weights, the ratios, the criterion and `data_key` (your name for the
    data `evaluate` and the criterion read: change it when they change).
    `on_point(done, total)` reports progress.
    """
    grid = _check_grid(ratios)
    _check_options(evaluate, mode, round_to, units, cache_dir, data_key)
    round_to = resolve_round_to(round_to, model)
    criterion = get_criterion(method, seed=seed)
    key = _cache_key(model, grid, criterion.name, units, ignore, mode, round_to, higher_is_better, data_key)
    path = _cache_file(cache_dir, key) if cache_dir is not None else None
    found = _read_cache(path, key) if path is not None else None
    if found is not None:
        return found
    started = time.perf_counter()
    scored, orders = _ranked(score_model(model, example_inputs, criterion, Calibration(data, loss_fn), units, ignore))
    labels = _labels(scored)
    total, done = len(scored.groups) * len(grid), [0]

    def point() -> None:
        done[0] += 1
        if on_point is not None:
            on_point(done[0], total)

    was_training = model.training
    model.eval()
    try:
        baseline = _metric(evaluate, model)
        curves = [_curve(model, example_inputs, scored, g.index, orders[g.index], labels[g.index], grid, evaluate,
                         baseline, mode, round_to, point) for g in scored.groups]
    finally:
        model.train(was_training)
    result = Sensitivity(grid, baseline, higher_is_better, metric_name, criterion.name, mode, round_to, key, curves,
                         round(time.perf_counter() - started, 3))
    if path is not None:
        _write_cache(path, result)
    return result


def save_plot(curves: Sensitivity, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write the curves (one line per group, the metric against the ratio) as PNG or SVG, by `path`'s suffix."""
    from .report import plots  # matplotlib only when a plot is asked for

    suffix = Path(path).suffix.lower()
    if suffix not in (".png", ".svg", ".pdf"):
        raise InvalidArgument(f"plot path must end in .png, .svg or .pdf, got {str(path)!r}")
    figure = plots.sensitivity_figure(curves.report_curves(), title or f"sensitivity ({curves.method}, no recovery)",
                                      curves.metric_name)
    return plots.save_figure(figure, path)


# ------------------------------------------------------------------------ allocation

def _budget(target: str, keys: Sequence[str] = (*BUDGET_KEYS, "latency_ms")) -> Budget:
    budget = parse_target(target)
    if budget.key not in keys:
        raise InvalidArgument(f"this meets a {', '.join(keys)} target, got {target!r}")
    return budget


def _traced(model: nn.Module, example_inputs: Any, curves: Sensitivity) -> Scored:
    """The model's graph and groups, with each curve's removal order as its group's unit scores.

    Raises InvalidArgument when a curve's group is not in this model as it was measured.
    """
    graph = trace(model, example_inputs)
    analysis = analyze_graph(graph)
    by_index = {g.index: g for g in analysis.groups}
    groups = []
    for curve in curves.curves:
        group = by_index.get(curve.index)
        if group is None or group.size != curve.units or [f"{n}:{d}" for n, d in group.members] != curve.members:
            raise InvalidArgument(f"the sensitivity curves do not fit this model: group {curve.index} "
                                  f"({curve.label}) differs; measure them on this model")
        groups.append(group)
    unit_scores = {c.index: _rank_scores(c.order, c.units) for c in curves.curves}
    return Scored(graph, analysis, groups, unit_scores, dense_macs(graph, model, example_inputs),
                  total_parameters(model), {g.index: np.asarray(g.units, dtype=np.int64) for g in groups},
                  {g.index: gemm_width(model, analysis, g) for g in groups})


class _Costs:
    """Estimated cost of per-group ratios against the budget, nothing cut: MACs, parameters or bytes
    from the graph, or milliseconds predicted by the model's latency table (`secateurs.latency`)."""

    def __init__(self, model: nn.Module, example_inputs: Any, scored: Scored, budget: Budget,
                 round_to: int | None):
        if budget.key == "macs" and graph_macs(scored.graph) is None:
            raise IncompatibleLayer("the graph cannot count this model's MACs (an RNN runs as one op), so a "
                                    "sensitivity allocation cannot cost its candidates: use target='params=...'")
        self.scored, self.key, self.round_to = scored, budget.key, round_to
        # the target search's own costing: the graph's counts, or the latency table's prediction
        self.of = BUDGETS[budget.key].cost(model, example_inputs, scored, budget).of
        self.base = self({})
        self.budget = budget.value if budget.key == "latency_ms" else budget.value * self.base

    def __call__(self, ratios: dict[int, float]) -> float:
        return self.of(chosen_shapes(self.scored, _chosen(self.scored, ratios, self.round_to)))

    def unreachable(self, target: str, top: float) -> InvalidArgument:
        left = self({g.index: top for g in self.scored.groups}) / self.base if self.base else 1.0
        return InvalidArgument(f"target {target!r} cannot be met: removing {top:.0%} of every group's units "
                               f"leaves {left:.3f} of today's {self.key}; ask for less or add larger ratios")


def _predicted(curves: Sensitivity, ratios: dict[int, float]) -> float:
    by_index = {c.index: c for c in curves.curves}
    return float(sum(curves.loss(by_index[i], r) for i, r in ratios.items()))


def _uniform(curves: Sensitivity, costs: _Costs, target: str) -> dict[int, float]:
    """The same ratio for every group: the smallest (by bisection) whose cost meets the budget."""
    top, indices = max(curves.ratios), [c.index for c in curves.curves]
    if costs(dict.fromkeys(indices, top)) > costs.budget:
        raise costs.unreachable(target, top)
    low, high = 0.0, top
    for _ in range(SEARCH_STEPS):
        mid = (low + high) / 2
        if costs(dict.fromkeys(indices, mid)) > costs.budget:
            low = mid
        else:
            high = mid
    return dict.fromkeys(indices, high)


def _greedy(curves: Sensitivity, costs: _Costs, target: str) -> dict[int, float]:
    """Raise one group's ratio at a time, each time the step (to any higher grid ratio) that loses
    the least predicted metric per unit of cost saved, until the budget is met; the last step is
    then shortened (by bisection) to just meet it."""
    grid = [0.0] + curves.ratios
    losses = {c.index: [curves.loss(c, r) for r in grid] for c in curves.curves}
    level = dict.fromkeys(losses, 0)
    cost, last = costs({}), None
    while cost > costs.budget:
        best = None
        for index in sorted(level):
            current = {i: grid[v] for i, v in level.items()}
            for step in range(level[index] + 1, len(grid)):
                trial = costs({**current, index: grid[step]})
                if trial >= cost:
                    continue
                rate = _difference(losses[index][step], losses[index][level[index]]) / (cost - trial)
                if best is None or rate < best[0]:
                    best = (rate, index, step, trial)
        if best is None:
            raise costs.unreachable(target, grid[-1])
        _, index, step, cost = best
        last = (index, grid[level[index]])
        level[index] = step
    ratios = {i: grid[v] for i, v in level.items()}
    if last is not None:
        index, low = last
        high = ratios[index]
        for _ in range(SEARCH_STEPS):
            mid = (low + high) / 2
            if costs({**ratios, index: mid}) > costs.budget:
                low = mid
            else:
                high = mid
        ratios[index] = high
    return ratios


def _difference(after: float, before: float) -> float:
    """after - before, where an infinite (failed) metric makes every step past it infinitely bad."""
    if math.isinf(after):
        return math.inf
    return after - before


def _least_loss(curves: Sensitivity, costs: _Costs, target: str) -> dict[int, float]:
    """The greedy allocation, or the uniform one where that predicts less loss (the greedy is a heuristic)."""
    candidates = [_greedy(curves, costs, target), _uniform(curves, costs, target)]
    return min(candidates, key=lambda ratios: _predicted(curves, ratios))


# Allocation name -> function (curves, costs, target) -> group index -> ratio.
ALLOCATIONS: dict[str, Callable[[Sensitivity, _Costs, str], dict[int, float]]] = {
    "sensitivity": _least_loss,
    "uniform": _uniform,
}


def _allocation(model: nn.Module, example_inputs: Any, scored: Scored, curves: Sensitivity, target: str,
                allocation: str) -> Allocation:
    if allocation not in ALLOCATIONS:
        raise InvalidArgument(f"unknown allocation {allocation!r}; expected one of {', '.join(ALLOCATIONS)}")
    if not isinstance(curves, Sensitivity):
        raise InvalidArgument(f"curves must be the Sensitivity that sensitivity() returns, got {type(curves).__name__}")
    costs = _Costs(model, example_inputs, scored, _budget(target), curves.round_to)
    ratios = ALLOCATIONS[allocation](curves, costs, target) if curves.curves else {}
    return Allocation(allocation, target, ratios, {c.index: c.label for c in curves.curves},
                      _predicted(curves, ratios), costs(ratios) / costs.base if costs.base else 1.0)


def allocate(model: nn.Module, example_inputs: Any, curves: Sensitivity, target: str,
             allocation: str = "sensitivity") -> Allocation:
    """Per-group ratios that bring the cost to `target` (e.g. "macs=0.25") with the least predicted loss.

    `allocation="uniform"` gives every group the same ratio instead (the baseline to
    compare with). The model is traced, not cut; nothing changes.
    """
    return _allocation(model, example_inputs, _traced(model, example_inputs, curves), curves, target, allocation)


def prune_by_sensitivity(model: nn.Module, example_inputs: Any, curves: Sensitivity, target: str,
                         allocation: str = "sensitivity") -> StructuredPlan:
    """Remove channels / heads of `model` in place with the ratios `allocate` picks; returns the plan.

    Each group loses its lowest-ranked units in the order the curves were measured with;
    `plan.ratio` holds the ratio each group got, by group label.
    """
    scored = _traced(model, example_inputs, curves)
    chosen_allocation = _allocation(model, example_inputs, scored, curves, target, allocation)
    chosen = _chosen(scored, chosen_allocation.ratios, curves.round_to)
    return cut_model(model, example_inputs, scored, chosen, curves.method, chosen_allocation.by_label())


def prune_by_sensitivity_rounds(model: nn.Module, example_inputs: Any, measure: Callable[[nn.Module], Sensitivity],
                                target: str, rounds: int = 3) -> list[StructuredPlan]:
    """Reach `target` in `rounds` cuts, measuring the curves again on the partly pruned model before each.

    One set of curves measures each group alone on the dense model; deep cuts interact,
    and the sum of one-group losses stops predicting the joint loss. Here round r brings
    the cost to `fraction ** (r / rounds)` of the dense model's, allocated with curves
    `measure(model)` takes on the model as the earlier rounds left it (a closure over
    `sensitivity(...)` with your data; its cache keys on the weights, so each round
    measures afresh). Returns the plans, one per round, oldest first.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InvalidArgument(f"rounds must be a positive integer, got {rounds!r}")
    if not callable(measure):
        raise InvalidArgument(f"measure must be a function model -> Sensitivity, got {type(measure).__name__}")
    if rounds == 1:   # one cut: any target prune_by_sensitivity takes, latency included
        return [prune_by_sensitivity(model, example_inputs, measure(model), target)]
    try:
        budget = _budget(target, BUDGET_KEYS)   # a latency budget is not a fraction to split into rounds
    except InvalidArgument:
        raise InvalidArgument(f"rounds > 1 needs a macs, params or bytes target, got {target!r}") from None
    key, fraction = budget.key, budget.value

    def cost() -> float:
        value = GRAPH_COSTS[key](trace(model, example_inputs), {})
        if value is None:
            raise IncompatibleLayer(f"the graph cannot count this model's {key} (an RNN runs as one op): "
                                    "use target='params=...'")
        return value

    dense = cost()
    plans = []
    for r in range(1, rounds + 1):
        now = cost()
        wanted = dense * fraction ** (r / rounds) / now
        if wanted >= 1.0:
            if r < rounds:
                continue   # an earlier round overshot this one's share
            wanted = 1.0   # the last round always cuts (perhaps nothing), so there is a plan
        plans.append(prune_by_sensitivity(model, example_inputs, measure(model), f"{key}={wanted:.10g}"))
    return plans


__all__ = ["ALLOCATIONS", "Allocation", "DEFAULT_RATIOS", "GroupCurve", "METRICS", "MODES", "Sensitivity",
           "allocate", "data_digest", "mean_loss_metric", "prune_by_sensitivity", "prune_by_sensitivity_rounds", "save_plot", "sensitivity", "top1_accuracy",
           "weights_digest"]
