"""`prune_structured`, the front door: validate, score once, choose (or search a budget), cut, compensate."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from torch import nn

from .. import compensate as bias_compensation
from ..batches import LossFn
from ..criteria import Calibration, Criterion, get_criterion
from ..errors import MissingData
from ..hf_config import is_hf_model, update_config
from ..measure import total_parameters
from ..model_checks import check_example, check_model
from .apply import cut_model
from .budget import BUDGETS, budget_record, check_latency, search_ratio
from .plan import StructuredPlan, remember
from .options import check_options, resolve_round_to
from .units import UNIT_KINDS, score_model, select_units


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
    if target is not None:
        cost = BUDGETS[budget.key].cost(model, example_inputs, scored, budget)
        ratio = search_ratio(model, example_inputs, scored, budget, cost, round_to, max_ratio, scope)
        if budget.key == "latency_ms":
            ratio, checks = check_latency(model, example_inputs, scored, budget, cost, ratio, round_to, max_ratio,
                                          scope)
    chosen = select_units(scored, ratio, scope, round_to, max_ratio)
    dense = bias_compensation.snapshot(model, Calibration(data, loss_fn)) if compensate else None
    plan = cut_model(model, example_inputs, scored, chosen, criterion.name, ratio)
    if dense is not None:
        _compensate(model, dense, plan)
    if target is not None:
        plan.budget = budget_record(model, example_inputs, scored, chosen, plan, budget, cost)
        if checks:
            plan.budget["checks"] = checks
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


def _compensate(model: nn.Module, dense: bias_compensation.Snapshot, plan: StructuredPlan) -> None:
    """Fold the removed inputs' means into the biases and record it in `plan` (so replay adds the biases)."""
    had_bias = {name for name, m in model.named_modules() if getattr(m, "bias", None) is not None}
    plan.compensated = bias_compensation.compensate(model, dense, plan.keeps)
    plan.added_biases = [name for name in plan.compensated if name not in had_bias]
    plan.params_after = total_parameters(model)
    if is_hf_model(model):
        update_config(model)


__all__ = ["prune_structured"]
