"""Budgets: parse a target ("macs=0.5", "latency_ms=5"), cost any cut, search the ratio that meets it.

The cost of each trial ratio is computed from the kept widths on the dense graph, so the
search cuts nothing; a latency budget is then checked on a cut copy and the search repeated
until the measured copy meets it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch import nn

from ..errors import InvalidArgument
from ..latency import latency_table
from ..measure import graph_bytes, graph_macs, latency_ms, tensor_bytes
from .apply import GRAPH_COSTS, chosen_shapes, cut_model
from .plan import StructuredPlan
from .units import (
    Scored,
    aligned,
    first_units,
    global_order,
    group_quanta,
    per_group,
    protect_members,
    select_units,
)


@dataclass(frozen=True)
class Budget:
    """A structured pruning budget: the model's `key` cost brought to at most `value`."""

    key: str                      # a key of BUDGETS: "macs", "params", "bytes" or "latency_ms"
    value: float                  # a fraction of the dense model's cost; milliseconds for latency_ms
    threads: int | None = None    # latency_ms: CPU threads it is timed at (None: torch's current count)

    def __str__(self) -> str:
        return f"{self.key}={self.value:.10g}" + (f",threads={self.threads}" if self.threads else "")


TARGET_FORMS = ("'macs=0.5', 'params=0.3' or 'bytes=0.5' (a fraction of the dense model's, in (0, 1]), "
                "or 'latency_ms=5' (milliseconds on this machine; ',threads=2' fixes the thread count)")


def parse_target(target: str) -> Budget:
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
        return Budget(key, value)
    name, _, count = option.strip().partition("=")
    if not kind.absolute or name != "threads" or not count.isdigit() or int(count) < 1:
        raise bad
    return Budget(key, value, int(count))


# Bisection steps of the target search: the ratio is found to within 0.95 / 2**16.
SEARCH_STEPS = 16


@dataclass
class Cost:
    """A budget's cost of any cut, as a function of the cut tensor shapes, and the dense model's."""

    of: Callable[[dict[int, tuple[int, ...]]], float | None]
    dense: float
    details: dict[str, Any] = field(default_factory=dict)   # recorded in the plan's budget
    threads: int = 1


def graph_cost(key: str, dense: Callable[[Scored], float]) -> Callable[..., Cost]:
    def build(model: nn.Module, example_inputs: Any, scored: Scored, target: Budget) -> Cost:
        return Cost(lambda shapes: GRAPH_COSTS[key](scored.graph, shapes), dense(scored))
    return build


def latency_cost(model: nn.Module, example_inputs: Any, scored: Scored, target: Budget) -> Cost:
    """Predicted milliseconds from the model's per-op latency table (`secateurs.latency`)."""
    table = latency_table(model, example_inputs, threads=target.threads, graph=scored.graph, analysis=scored.analysis)
    details = {"threads": table.threads, "remainder_ms": table.remainder_ms,
               "table": str(table.path) if table.path else None}
    return Cost(table.predict, table.dense_ms, details, table.threads)


@dataclass(frozen=True)
class BudgetKind:
    """How a target key is costed while searching, and measured on the cut model."""

    cost: Callable[[nn.Module, Any, Scored, Budget], Cost]
    measure: Callable[[nn.Module, Any, StructuredPlan, Cost], float]
    absolute: bool = False        # the value is in the cost's own unit, not a fraction of the dense cost
    unit: str = ""


BUDGETS: dict[str, BudgetKind] = {
    "macs": BudgetKind(graph_cost("macs", lambda s: s.macs), lambda m, x, plan, cost: plan.macs_after),
    "params": BudgetKind(graph_cost("params", lambda s: s.params), lambda m, x, plan, cost: plan.params_after),
    "bytes": BudgetKind(graph_cost("bytes", lambda s: graph_bytes(s.graph)),
                         lambda m, x, plan, cost: tensor_bytes(m), unit=" bytes"),
    "latency_ms": BudgetKind(latency_cost, lambda m, x, plan, cost: latency_ms(m, x, threads=cost.threads),
                              absolute=True, unit=" ms"),
}


def budget_record(model: nn.Module, example_inputs: Any, scored: Scored, chosen: dict[int, list[int]],
                   plan: StructuredPlan, target: Budget, cost: Cost) -> dict[str, Any]:
    """The plan's budget entry: the target, the dense cost, the predicted and the measured cost of the cut."""
    kind = BUDGETS[target.key]
    limit = target.value if kind.absolute else target.value * cost.dense
    return {"target": str(target), "key": target.key, "limit": limit, "dense": cost.dense,
            "predicted": cost.of(chosen_shapes(scored, chosen)),
            "measured": kind.measure(model, example_inputs, plan, cost), **cost.details}


def trial_cost(model: nn.Module, example_inputs: Any, scored: Scored, key: str,
                chosen: dict[int, list[int]]) -> int:
    """The cost measured on a pruned copy: for graphs whose MACs the graph alone cannot give."""
    trial = copy.deepcopy(model)
    plan = cut_model(trial, example_inputs, scored, chosen, "trial", 0.0, check=False)
    return plan.macs_after if key == "macs" else plan.params_after


def search_ratio(model: nn.Module, example_inputs: Any, scored: Scored, target: Budget, cost: Cost,
                 round_to: int | None, max_ratio: float | dict[str, float] | None, scope: str = "global") -> float:
    """The smallest ratio (to SEARCH_STEPS bisections) whose cost meets `target`: a global ratio,
    or with scope "local" the one ratio every group loses.

    The cost of each trial ratio is computed from the kept widths on the dense graph, so
    the search cuts nothing and costs a fraction of one prune; graphs holding an opaque
    module (an RNN) fall back to measuring a pruned copy per trial. A target that even
    the largest cut the caps allow misses is refused with what that cut would cost.
    """
    kind = BUDGETS[target.key]
    opaque = target.key == "macs" and graph_macs(scored.graph) is None
    scale = 1.0 if kind.absolute else cost.dense
    # the ranking does not depend on the ratio: rank once, and each trial takes a prefix
    quanta = group_quanta(scored, round_to)
    order = global_order(scored.groups, scored.unit_scores, per_group(scored.groups, max_ratio, 0.9), quanta)
    total = sum(g.size for g in scored.groups)
    by_index = {g.index: g for g in scored.groups}

    def trial(ratio: float) -> float:
        if scope == "local":
            chosen = select_units(scored, ratio, "local", round_to, max_ratio)
        else:   # as select_units(scored, ratio, "global", ...) chooses
            chosen = aligned(first_units(*order, int(ratio * total)), scored.groups, quanta)
            protect_members(scored.analysis, by_index, chosen, scored.unit_scores, scored.unit_ids)
        if opaque:
            return trial_cost(model, example_inputs, scored, target.key, chosen)
        return cost.of(chosen_shapes(scored, chosen))

    low, high = 0.0, 0.95
    most = trial(high)
    if most / scale > target.value:
        share = "" if kind.absolute else f", {most / cost.dense:.1%} of the dense model's"
        aligned_to = f" with kept widths multiples of round_to={round_to}" if round_to and round_to > 1 else ""
        raise InvalidArgument(f"target {target} cannot be met: the largest cut max_ratio allows (default 0.9 of "
                              f"each group){aligned_to} leaves {target.key} at {most:.4g}{kind.unit}{share}")
    for _ in range(SEARCH_STEPS if not opaque else 10):
        mid = (low + high) / 2
        if trial(mid) / scale > target.value:
            low = mid
        else:
            high = mid
    return high


# A latency cut is measured on a copy before the model is touched, and the search repeated
# with the budget scaled by measured / predicted, at most this many times.
LATENCY_CHECKS = 3


def check_latency(model: nn.Module, example_inputs: Any, scored: Scored, budget: Budget, cost: Cost,
                  ratio: float, round_to: int | None, max_ratio: float | dict[str, float] | None,
                  scope: str = "global") -> tuple[float, list[dict[str, float]]]:
    """The searched ratio, cut further until a cut copy measures within the budget; and each check.

    The table predicts the sum of ops timed alone; the model as a whole can run a few
    percent slower or faster. Where the measured cut misses the budget, the search runs
    again for the budget times predicted / measured. A budget the largest allowed cut
    cannot meet on that corrected scale keeps the last cut (its check says so).
    """
    checks = []
    limit = budget.value
    for _ in range(LATENCY_CHECKS):
        chosen = select_units(scored, ratio, scope, round_to, max_ratio)
        trial = copy.deepcopy(model)
        cut_model(trial, example_inputs, scored, chosen, "check", ratio, check=False)
        predicted = cost.of(chosen_shapes(scored, chosen))
        measured = latency_ms(trial, example_inputs, threads=cost.threads)
        checks.append({"ratio": ratio, "predicted": predicted, "measured": measured})
        if measured <= budget.value:
            break
        limit *= predicted / measured
        try:
            ratio = search_ratio(model, example_inputs, scored, Budget(budget.key, limit, budget.threads), cost,
                                 round_to, max_ratio, scope)
        except InvalidArgument:
            break   # even the largest cut misses the corrected budget: keep the last one
    return ratio, checks


__all__ = ["BUDGETS", "LATENCY_CHECKS", "SEARCH_STEPS", "TARGET_FORMS", "Budget", "BudgetKind", "Cost", "budget_record", "check_latency", "parse_target", "search_ratio"]
