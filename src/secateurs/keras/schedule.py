"""Gradual pruning during `model.fit`: TF-MOT's schedules and a Keras callback.

`PolynomialDecay` and `ConstantSparsity` take TF-MOT's arguments and mean the same
(`PolynomialDecay` with power 3 is Zhu & Gupta's AGP), with one fix: the last pruning
step is `end_step` itself, so the final sparsity is always reached; TF-MOT prunes only
when `(step - begin_step) % frequency == 0` and stops short of `final_sparsity` when
`end_step - begin_step` is not a multiple of `frequency`. `GradualPruning` is the
callback (TF-MOT needs a wrapped model plus `UpdatePruningStep`; here the model stays a
plain Keras model and any criterion, scope or N:M pattern can drive the schedule).
"""
from __future__ import annotations

from typing import Any

from ..api import Plan, check_ratio
from ..errors import InvalidArgument
from ..sparsity import parse_pattern
import numpy as np

from ._backend import backend, keras, to_numpy
from .masks import IN_FIT, apply_masks, mask_of, masked_variables, set_mask, sync_for_edit
from .prune import prune
from .targets import select_targets


class PruningSchedule:
    """When to prune and to what sparsity, by optimizer step (0 before the first batch)."""

    begin_step: int
    end_step: int
    frequency: int

    def sparsity_at(self, step: int) -> float:
        raise NotImplementedError

    def due(self, step: int) -> bool:
        if step < self.begin_step or (self.end_step >= 0 and step > self.end_step):
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step

    def __call__(self, step: int) -> tuple[bool, float]:
        """(prune now?, sparsity): TF-MOT's schedule interface."""
        return self.due(step), self.sparsity_at(step)


def _check_steps(begin_step: int, end_step: int, frequency: int, open_end: bool) -> None:
    for name, value in (("begin_step", begin_step), ("end_step", end_step), ("frequency", frequency)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{name} must be an integer, got {value!r}")
    if begin_step < 0:
        raise InvalidArgument(f"begin_step must be >= 0, got {begin_step}")
    if frequency < 1:
        raise InvalidArgument(f"frequency must be at least 1, got {frequency}")
    if not (open_end and end_step == -1) and end_step <= begin_step:
        raise InvalidArgument(f"end_step ({end_step}) must be after begin_step ({begin_step})"
                              + (" or -1 for no end" if open_end else ""))


class PolynomialDecay(PruningSchedule):
    """s(t) = final + (initial - final) * (1 - (t - begin) / (end - begin)) ** power, pruned every
    `frequency` steps from `begin_step` to `end_step` (both included). power=3 is AGP."""

    def __init__(self, initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
                 power: float = 3, frequency: int = 100):
        _check_steps(begin_step, end_step, frequency, open_end=False)
        self.initial_sparsity = check_ratio("initial_sparsity", initial_sparsity)
        self.final_sparsity = check_ratio("final_sparsity", final_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise InvalidArgument(f"initial_sparsity {initial_sparsity} is above final_sparsity {final_sparsity}")
        if not power > 0:
            raise InvalidArgument(f"power must be positive, got {power}")
        self.begin_step, self.end_step, self.power, self.frequency = begin_step, end_step, power, frequency

    def sparsity_at(self, step: int) -> float:
        progress = min(1.0, max(0.0, (step - self.begin_step) / (self.end_step - self.begin_step)))
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** self.power


class ConstantSparsity(PruningSchedule):
    """`target_sparsity` at `begin_step`, then again every `frequency` steps up to `end_step` (-1: no end)."""

    def __init__(self, target_sparsity: float, begin_step: int, end_step: int = -1, frequency: int = 100):
        _check_steps(begin_step, end_step, frequency, open_end=True)
        self.target_sparsity = check_ratio("target_sparsity", target_sparsity)
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency

    def sparsity_at(self, step: int) -> float:
        return self.target_sparsity


class GradualPruning(keras.callbacks.Callback):
    """A callback that prunes `model` on `schedule` while it trains: `model.fit(..., callbacks=[this])`.

    Before each batch whose step the schedule marks, the model is pruned to the scheduled
    sparsity with `secateurs.keras.prune` (keyword arguments such as `method`, `scope`,
    `pattern`, `data`, `ignore` pass through; masks only grow). The step is the
    optimizer's iteration count, so several `fit` calls continue one schedule. With
    `pattern="2:4"` the pattern is applied at the first due step. Every epoch's logs get
    `sparsity`, the fraction of zeros over the masked kernels; `plans` holds every prune.

    At the start of `fit` every kernel the schedule will prune gets a mask (all kept), so
    the traced train step holds every constraint from the first step and a prune never
    re-traces it: TensorFlow reads the masks live, PyTorch runs eagerly, and on JAX,
    whose compiled step holds the masks it was traced with, the weights are masked again
    after each step once a prune has happened during this `fit`.
    """

    _SELECTION = ("types", "include", "ignore", "prune_last")

    def __init__(self, schedule: PruningSchedule, method: str = "magnitude", **prune_kwargs: Any):
        super().__init__()
        if not isinstance(schedule, PruningSchedule):
            raise InvalidArgument(f"schedule must be a PolynomialDecay or ConstantSparsity, got {schedule!r}")
        if "sparsity" in prune_kwargs:
            raise InvalidArgument("the schedule sets the sparsity; do not pass sparsity= as well")
        self.schedule, self.method, self.prune_kwargs = schedule, method, prune_kwargs
        self.plans: list[Plan] = []
        self.step = 0
        self._remask = False

    def on_train_begin(self, logs: dict | None = None) -> None:
        # counted here from then on: inside fit the JAX trainer keeps `iterations` in its own state
        optimizer = getattr(self.model, "optimizer", None)
        self.step = int(to_numpy(optimizer.iterations)) if optimizer is not None else 0
        selection = {k: v for k, v in self.prune_kwargs.items() if k in self._SELECTION}
        width = parse_pattern(self.prune_kwargs["pattern"])[1] if "pattern" in self.prune_kwargs else 1
        for t in select_targets(self.model, **selection):
            if mask_of(t.variable) is None and t.in_width % width == 0:
                set_mask(t.variable, np.ones(t.shape, dtype=bool))
        IN_FIT.add(id(self.model))
        self._remask = False
        if getattr(self.model, "train_function", None) is not None:
            self.model.make_train_function(force=True)     # traced lazily, at the first step: with the masks

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        step = self.step
        if not self.schedule.due(step):
            return
        target = self.schedule.sparsity_at(step)
        if target <= 0.0 and "pattern" not in self.prune_kwargs:
            return
        if "pattern" in self.prune_kwargs and self.plans:
            return
        sync_for_edit(self.model)
        kwargs = dict(self.prune_kwargs)
        if "pattern" not in kwargs:
            kwargs["sparsity"] = target
        self.plans.append(prune(self.model, self.method, **kwargs))
        self._remask = backend() == "jax"

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += 1
        if self._remask:
            sync_for_edit(self.model)
            apply_masks(self.model)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["sparsity"] = overall_sparsity(self.model)

    def on_train_end(self, logs: dict | None = None) -> None:
        IN_FIT.discard(id(self.model))
        sync_for_edit(self.model)
        apply_masks(self.model)


def overall_sparsity(model: Any) -> float:
    """Fraction of zeros over every masked kernel of `model` (0.0 when none is masked)."""
    total = zeros = 0
    for v in masked_variables(model):
        mask = mask_of(v).mask
        total += mask.size
        zeros += int((~mask).sum())
    return zeros / total if total else 0.0
