"""When to prune: one-shot, iterative with recovery in between, and gradual AGP."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .api import Plan, check_ratio, prune
from .errors import InvalidArgument


def iterative_sparsities(sparsity: float, steps: int) -> list[float]:
    """Sparsity after each of `steps` rounds, removing the same share of what is left each time."""
    if not isinstance(steps, int) or steps < 1:
        raise InvalidArgument(f"steps must be a positive integer, got {steps!r}")
    sparsity = check_ratio("sparsity", sparsity)
    return [1.0 - (1.0 - sparsity) ** ((i + 1) / steps) for i in range(steps)]


def iterative_prune(model: nn.Module, sparsity: float, steps: int,
                    recover: Callable[[nn.Module, int], Any] | None = None, **prune_kwargs: Any) -> list[Plan]:
    """Prune to `sparsity` in `steps` rounds, calling `recover(model, round)` after each."""
    plans = []
    for i, target in enumerate(iterative_sparsities(sparsity, steps)):
        plans.append(prune(model, sparsity=target, **prune_kwargs))
        if recover is not None:
            recover(model, i)
    return plans


def agp_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017) cubic schedule: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3."""
    if step <= start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


class AGP:
    """Gradual magnitude-style pruning driven from your own training loop.

    Call `step()` once after every optimizer step (and `keep_sparse(optimizer, model)`
    once, so zeros stay zero between prunings). Every `frequency` steps between
    `start_step` and `end_step` the model is pruned to the scheduled sparsity.
    Extra keyword arguments go to `secateurs.prune` (method, scope, data, ...).
    """

    def __init__(self, model: nn.Module, final_sparsity: float, *, end_step: int, start_step: int = 0,
                 frequency: int = 1, initial_sparsity: float = 0.0, **prune_kwargs: Any):
        if not 0 <= start_step < end_step:
            raise InvalidArgument(f"AGP needs 0 <= start_step < end_step, got {start_step} and {end_step}")
        if frequency < 1:
            raise InvalidArgument(f"frequency must be at least 1, got {frequency}")
        if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
            raise InvalidArgument(
                f"AGP needs 0 <= initial_sparsity <= final_sparsity < 1, got {initial_sparsity} and {final_sparsity}")
        self.model = model
        self.initial, self.final = initial_sparsity, final_sparsity
        self.start, self.end, self.frequency = start_step, end_step, frequency
        self.prune_kwargs = prune_kwargs
        self.current_step = 0
        self.plans: list[Plan] = []

    def sparsity_at(self, step: int) -> float:
        return agp_sparsity(step, self.initial, self.final, self.start, self.end)

    def step(self, *_: Any) -> Plan | None:
        """Advance one training step; prune when the schedule says so."""
        # step t is the t-th optimizer step done, so end_step steps end at the final sparsity
        self.current_step += 1
        t = self.current_step
        due = self.start <= t <= self.end and ((t - self.start) % self.frequency == 0 or t == self.end)
        if not due:
            return None
        target = self.sparsity_at(t)
        if target <= 0.0:
            return None
        plan = prune(self.model, sparsity=target, **self.prune_kwargs)
        self.plans.append(plan)
        return plan
