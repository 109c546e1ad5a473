"""`prune_structured`, the front door: validate, score once, choose (or search a budget), cut, compensate."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterable, Sequence

from torch import nn

from .. import compensate as bias_compensation
from ..batches import LossFn
from ..criteria import Calibration, Criterion, get_criterion
from ..errors import InvalidArgument, MissingData
from ..hf_config import is_hf_model, update_config
from ..measure import total_parameters
from ..model_checks import check_example, check_model
from .apply import cut_model
from .budget import BUDGETS, Budget, Cost, budget_record, check_latency, search_ratio
from .plan import StructuredPlan, remember
from .options import check_options, resolve_round_to
from .rehearse import Rehearsal
from .units import UNIT_KINDS, Scored, score_model, select_units


def prune_structured(
    model: nn.Module,
    example_inputs: Any,
    ratio: float | dict[str, float] | None = None,
    *,
    target: str | None = None,
    method: str | Criterion = "l2",
    scope: str | None = None,
    units: Sequence[str] = UNIT_KINDS,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    round_to: int | str | None = "auto",
    ignore: Sequence[str] = (),
    max_ratio: float | dict[str, float] | None = None,
    compensate: bool = False,
    seed: int = 0,
) -> StructuredPlan:
    """Remove the least important channels / heads of `model` in place; returns the plan.

    `ratio` is the fraction of units removed from each prunable group (scope "local", the
    default for a ratio) or in total, ranked after dividing by each group's mean score
    (scope "global", at most 90% of any group). A `target` searches the ratio that meets
    it: by default one ratio for every group (scope "local": uniform widths, which run
    faster per MAC than a global ranking's uneven ones), or a global ratio with
    `scope="global"` (often less accuracy lost before recovery); a `latency_ms` target
    is global by default, its latency table pricing each group's cut. `target="macs=0.5"` or `"params=0.3"` instead searches the
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
    check_model(model)
    check_example(model, example_inputs)
    scope = scope or _default_scope(target)
    budget = check_options(ratio=ratio, target=target, scope=scope, units=units, round_to=round_to,
                           max_ratio=max_ratio, method=method)
    if compensate and data is None:
        raise MissingData("compensate=True needs calibration data (data=...) for the mean inputs it folds in")
    criterion = get_criterion(method, seed=seed)
    round_to = resolve_round_to(round_to, model)
    # One trace, one analysis and one scoring serve the ratio search and the cut alike.
    scored = score_model(model, example_inputs, criterion, Calibration(data, loss_fn), units, ignore)
    checks: list[dict[str, float]] = []
    verdict, cost, free = None, None, scored
    if target is not None:
        cost = BUDGETS[budget.key].cost(model, example_inputs, scored, budget)
        ratio, chosen, checks, verdict, free = _search_free_groups(model, example_inputs, scored, budget, cost,
                                                                  round_to, max_ratio, scope)
    else:
        chosen = select_units(scored, ratio, scope, round_to, max_ratio)
    dense = bias_compensation.snapshot(model, Calibration(data, loss_fn)) if compensate else None
    plan = cut_model(model, example_inputs, scored, chosen, criterion.name, ratio, verdict=verdict)
    if dense is not None:
        _compensate(model, dense, plan)
    if target is not None:
        plan.budget = budget_record(model, example_inputs, free, chosen, plan, budget, cost)
        if checks:
            plan.budget["checks"] = checks
        if plan.frozen:
            _say_how_close(plan, budget)
    remember(model, plan)
    return plan


def _default_scope(target: Any) -> str:
    """Local for a ratio and for a cost fraction (one ratio for every group: uniform widths, which run
    faster per MAC than a global ranking's uneven ones, BENCHMARKS.md); global for a latency budget,
    whose latency table already prices each group's cut."""
    if isinstance(target, str) and target.partition("=")[0].strip() in BUDGETS \
            and BUDGETS[target.partition("=")[0].strip()].absolute:
        return "global"
    return "local"


def _search_free_groups(model: nn.Module, example_inputs: Any, scored: Scored, budget: Budget, cost: Cost,
                        round_to: int | None, max_ratio: float | dict[str, float] | None, scope: str):
    """The target search over the groups the cut can take: groups the rehearsal freezes leave the
    search, which runs again on the rest; a target those cannot meet gets their largest cut."""
    rehearsal = Rehearsal(model, example_inputs, scored)
    frozen: list[dict[str, Any]] = []
    free = scored
    for _ in range(SETTLE_ROUNDS):
        try:
            ratio = search_ratio(model, example_inputs, free, budget, cost, round_to, max_ratio, scope)
        except InvalidArgument:
            if not frozen:
                raise
            ratio = LARGEST_RATIO     # as close as the free groups allow; the plan says how close
        checks: list[dict[str, float]] = []
        if budget.key == "latency_ms":
            ratio, checks = check_latency(model, example_inputs, free, budget, cost, ratio, round_to, max_ratio,
                                          scope)
        chosen = select_units(free, ratio, scope, round_to, max_ratio)
        verdict = rehearsal.settle(chosen)
        if not verdict.frozen or not verdict.chosen:
            break
        frozen.extend(verdict.frozen)
        gone = {f["group"] for f in verdict.frozen}
        free = without_groups(free, gone)
    verdict.frozen = frozen + [f for f in verdict.frozen if f not in frozen]
    return ratio, {gi: p for gi, p in chosen.items() if gi in verdict.chosen}, checks, verdict, free


# Rounds of search -> rehearse -> freeze for a target; the largest global ratio a target search tries.
SETTLE_ROUNDS = 5
LARGEST_RATIO = 0.95


def without_groups(scored: Scored, gone: set[int]) -> Scored:
    """`scored` with the groups `gone` left out (frozen: the cut keeps them whole)."""
    return dataclasses.replace(scored, groups=[g for g in scored.groups if g.index not in gone],
                               unit_scores={i: s for i, s in scored.unit_scores.items() if i not in gone},
                               unit_ids={i: u for i, u in scored.unit_ids.items() if i not in gone})


def _say_how_close(plan: StructuredPlan, budget: Budget) -> None:
    """Record and warn how close to the target a cut with frozen groups came."""
    record = plan.budget
    met = record["measured"] <= record["limit"] * (1 + 1e-9)
    share = record["measured"] / record["dense"] if record["dense"] else float("nan")
    record["reached"] = share
    record["note"] = (f"{len(plan.frozen)} group(s) frozen; target {'met' if met else 'missed'}: "
                      f"{budget.key} at {share:.1%} of the dense model's")
    if not met:
        warnings.warn(f"secateurs: target {budget} not reached: {budget.key} is at {share:.1%} of the dense "
                      f"model's, as close as the {len(plan.frozen)} frozen group(s) allow (see plan.frozen)",
                      stacklevel=3)


def _compensate(model: nn.Module, dense: bias_compensation.Snapshot, plan: StructuredPlan) -> None:
    """Fold the removed inputs' means into the biases and record it in `plan` (so replay adds the biases)."""
    had_bias = {name for name, m in model.named_modules() if getattr(m, "bias", None) is not None}
    plan.compensated = bias_compensation.compensate(model, dense, plan.keeps)
    plan.added_biases = [name for name in plan.compensated if name not in had_bias]
    plan.params_after = total_parameters(model)
    if is_hf_model(model):
        update_config(model)


__all__ = ["prune_structured"]
