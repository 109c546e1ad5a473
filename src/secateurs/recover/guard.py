"""Guard rails: prune -> recover -> evaluate in steps, and undo the step that went too far.

Each step starts from a deep copy of the model (structured pruning replaces layers, so
a state_dict alone could not restore it). When a step leaves the metric more than
`tolerance` below the dense model's, the model is put back, in place, exactly as it
was before that step, and no further step runs.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from ..errors import InvalidArgument

Step = float | str   # a ratio (0.3) or a target ("macs=0.5"), handed to prune_step as it is


@dataclass
class GuardStep:
    """One prune -> recover -> evaluate round."""

    index: int
    step: Step
    metric: float
    drop: float                 # how far the metric is below the dense one (worse is positive)
    accepted: bool
    plan: Any = None            # what prune_step returned


@dataclass
class GuardReport:
    """The dense metric, every round that ran, and where (if anywhere) the guard stopped."""

    dense_metric: float
    tolerance: float
    higher_is_better: bool
    steps: list[GuardStep] = field(default_factory=list)

    @property
    def accepted(self) -> list[GuardStep]:
        return [s for s in self.steps if s.accepted]

    @property
    def rolled_back(self) -> GuardStep | None:
        """The step that crossed the tolerance and was undone, if one did."""
        return next((s for s in self.steps if not s.accepted), None)

    @property
    def final_metric(self) -> float:
        """The metric of the model as it is left: the last accepted step's, or the dense one."""
        accepted = self.accepted
        return accepted[-1].metric if accepted else self.dense_metric


def _check_steps(steps: Sequence[Step]) -> list[Step]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, (list, tuple)) or not steps:
        raise InvalidArgument(f"steps must be a non-empty list of ratios or targets, got {steps!r}")
    for step in steps:
        ratio_ok = isinstance(step, (int, float)) and not isinstance(step, bool) and 0.0 <= step < 1.0
        if not (ratio_ok or (isinstance(step, str) and step)):
            raise InvalidArgument(f"each step must be a ratio in [0, 1) or a target string like 'macs=0.5', "
                                  f"got {step!r}")
    return list(steps)


def _check_callables(**functions: Any) -> None:
    for name, function in functions.items():
        if function is not None and not callable(function):
            raise InvalidArgument(f"{name} must be callable, got {type(function).__name__}")


def _metric(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"evaluate must return a number, got {value!r}")
    return float(value)


def restore(model: nn.Module, snapshot: nn.Module) -> None:
    """Make `model` (the same object) exactly `snapshot`: its layers, weights, buffers and attributes."""
    model.__dict__.clear()
    model.__dict__.update(snapshot.__dict__)


def guarded_prune(
    model: nn.Module,
    steps: Sequence[Step],
    prune_step: Callable[[nn.Module, Step], Any],
    recover_step: Callable[[nn.Module, Step], Any] | None,
    evaluate: Callable[[nn.Module], float],
    tolerance: float,
    *,
    higher_is_better: bool = True,
    dense_metric: float | None = None,
) -> GuardReport:
    """Run `prune_step(model, step)`, `recover_step(model, step)`, `evaluate(model)` per step; returns the report.

    Stops at the first step whose metric falls more than `tolerance` (in the metric's
    units) below the dense metric (above it when `higher_is_better=False`, for a loss or
    a perplexity), or is not a finite number, and restores the model as it was before that
    step (also when a step raises). `dense_metric` skips the first evaluation when known.
    """
    steps = _check_steps(steps)
    _check_callables(prune_step=prune_step, recover_step=recover_step, evaluate=evaluate)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise InvalidArgument(f"tolerance must be a number >= 0 (in the metric's units), got {tolerance!r}")
    dense = _metric(evaluate(model) if dense_metric is None else dense_metric)
    report = GuardReport(dense, float(tolerance), higher_is_better)
    for index, step in enumerate(steps):
        snapshot = copy.deepcopy(model)
        try:
            plan = prune_step(model, step)
            if recover_step is not None:
                recover_step(model, step)
            metric = _metric(evaluate(model))
        except BaseException:
            restore(model, snapshot)  # a failed step leaves no half-pruned model behind
            raise
        drop = dense - metric if higher_is_better else metric - dense
        accepted = math.isfinite(metric) and drop <= tolerance
        report.steps.append(GuardStep(index, step, metric, drop, accepted, plan))
        if not accepted:
            restore(model, snapshot)
            break
    return report


__all__ = ["GuardReport", "GuardStep", "guarded_prune", "restore"]
