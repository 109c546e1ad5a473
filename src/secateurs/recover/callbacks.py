"""Callbacks: let any training loop drive gradual pruning.

A `PruningCallback` holds a schedule (step -> target sparsity, or None when no pruning
is due) and the arguments of `secateurs.prune`. Call `on_step_end(step)` after every
optimizer step of your own loop, or pass it as `on_step=` to `finetune` / `distill`:
when the schedule says so it prunes (masks) the model to the scheduled sparsity, and
on every step it masks the weights again, so pruned weights stay zero whatever the
optimizer does. Under torchrun or `accelerate launch` (DDP) every rank prunes and then
adopts rank 0's masks, so the replicas never drift apart. Masks, not surgery, because a training loop's optimizer holds the
parameter tensors: cutting them mid-training would leave it updating stale ones.

`trainer_callback(callback)` wraps one for the transformers Trainer (an optional
extra: `pip install 'secateurs[trainer]'`), `lightning_callback(callback)` for a
Lightning `Trainer` (`pip install 'secateurs[lightning]'`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from torch import nn

from ..api import Plan, check_ratio, prune
from ..errors import InvalidArgument, SecateursError
from ..schedule import agp_sparsity, iterative_sparsities
from ..sparsity import apply_masks
from .distributed import is_sharded, sync_masks, unwrap


@runtime_checkable
class Callback(Protocol):
    """What a training loop calls: once before training, after every optimizer step, once after."""

    def on_train_begin(self) -> None: ...

    def on_step_end(self, step: int) -> None: ...

    def on_train_end(self) -> None: ...


def _check_step(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{name} must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class AGPSchedule:
    """Zhu & Gupta's cubic ramp (see `agp_sparsity`), pruning every `frequency` steps from start to end."""

    final_sparsity: float
    end_step: int
    start_step: int = 0
    frequency: int = 1
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        _check_step("start_step", self.start_step)
        if _check_step("end_step", self.end_step) <= self.start_step:
            raise InvalidArgument(f"AGP needs start_step < end_step, got {self.start_step} and {self.end_step}")
        if _check_step("frequency", self.frequency) < 1:
            raise InvalidArgument(f"frequency must be at least 1, got {self.frequency}")
        check_ratio("final_sparsity", self.final_sparsity)
        check_ratio("initial_sparsity", self.initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise InvalidArgument(f"initial_sparsity {self.initial_sparsity} must not exceed "
                                  f"final_sparsity {self.final_sparsity}")

    def __call__(self, step: int) -> float | None:
        due = self.start_step <= step <= self.end_step and (
            (step - self.start_step) % self.frequency == 0 or step == self.end_step)
        if not due:
            return None
        return agp_sparsity(step, self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step)


@dataclass(frozen=True)
class IterativeSchedule:
    """`rounds` prunings `every` steps apart after `start_step`, each removing the same share of what is left."""

    sparsity: float
    rounds: int
    every: int
    start_step: int = 0

    def __post_init__(self) -> None:
        iterative_sparsities(self.sparsity, self.rounds)  # validates both
        if _check_step("every", self.every) < 1:
            raise InvalidArgument(f"every must be at least 1 step, got {self.every}")
        _check_step("start_step", self.start_step)

    def __call__(self, step: int) -> float | None:
        elapsed = step - self.start_step
        if elapsed <= 0 or elapsed % self.every or elapsed // self.every > self.rounds:
            return None
        return iterative_sparsities(self.sparsity, self.rounds)[elapsed // self.every - 1]


Schedule = Callable[[int], "float | None"]


@dataclass
class PruningCallback:
    """Prune `model` (masks) to `schedule(step)` after each optimizer step where it is due.

    `prune_kwargs` go to `secateurs.prune` (method, scope, data, loss_fn, ignore, ...).
    `plans` holds the plan of every pruning, with the step it ran at.
    """

    model: nn.Module = field(repr=False)
    schedule: Schedule
    prune_kwargs: dict[str, Any] = field(default_factory=dict)
    plans: list[tuple[int, Plan]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise InvalidArgument(f"model must be an nn.Module, got {type(self.model).__name__}")
        if not callable(self.schedule):
            raise InvalidArgument(f"schedule must be AGPSchedule, IterativeSchedule or a function step -> "
                                  f"sparsity, got {type(self.schedule).__name__}")
        if "sparsity" in self.prune_kwargs:
            raise InvalidArgument("prune_kwargs must not set 'sparsity': the schedule decides it")

    def on_train_begin(self) -> None:
        """Apply the schedule's step-0 sparsity, if it has one."""
        self._prune_if_due(0)

    def on_step_end(self, step: int) -> None:
        """After optimizer step `step` (counted from 1): prune if due, and keep pruned weights at zero."""
        _check_step("step", step)
        self._prune_if_due(step)
        apply_masks(self.model)  # the optimizer may have moved pruned weights (momentum, weight decay)

    def on_train_end(self) -> None:
        apply_masks(self.model)

    def _prune_if_due(self, step: int) -> None:
        target = self.schedule(step)
        if target is not None and target > 0.0:
            if is_sharded(self.model):
                raise InvalidArgument("gradual pruning needs whole weights and this model is sharded (FSDP2 "
                                      "fully_shard): prune before sharding, or train with DDP")
            self.plans.append((step, prune(unwrap(self.model), sparsity=target, **self.prune_kwargs)))
            sync_masks(self.model)   # under torchrun every rank keeps rank 0's masks


# ------------------------------------------------------------------------ transformers Trainer

@functools.cache
def _trainer_callback_class() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise SecateursError("the Trainer callback needs transformers and accelerate: "
                             "pip install 'secateurs[trainer]'") from None

    class SecateursTrainerCallback(TrainerCallback):
        """Forwards the Trainer's events to a secateurs callback (global_step is the step)."""

        def __init__(self, callback: Callback):
            self.callback = callback

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.callback.on_train_begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.callback.on_step_end(state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.callback.on_train_end()

    return SecateursTrainerCallback


def _check_callback(callback: Any) -> None:
    if not isinstance(callback, Callback):
        raise InvalidArgument(f"callback must have on_train_begin, on_step_end and on_train_end "
                              f"(a PruningCallback), got {type(callback).__name__}")


def trainer_callback(callback: Callback) -> Any:
    """A `transformers.TrainerCallback` that drives `callback`; pass it in `Trainer(callbacks=[...])`."""
    _check_callback(callback)
    return _trainer_callback_class()(callback)


# ------------------------------------------------------------------------ Lightning

@functools.cache
def _lightning_callback_class() -> type:
    try:
        from lightning.pytorch import Callback as LightningCallback
    except ImportError:
        try:
            from pytorch_lightning import Callback as LightningCallback
        except ImportError:
            raise SecateursError("the Lightning callback needs Lightning: pip install 'secateurs[lightning]'") from None

    class SecateursLightningCallback(LightningCallback):
        """Forwards a Lightning Trainer's events to a secateurs callback (global_step is the step).

        Lightning counts `global_step` in optimizer steps, and `on_train_batch_end` comes
        after the batch's optimizer step, as `on_step_end` expects.
        """

        def __init__(self, callback: Callback):
            self.callback = callback
            self._last_step = 0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._last_step = int(trainer.global_step)   # a second fit (or a resumed one) starts here
            self.callback.on_train_begin()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            step = int(trainer.global_step)
            if step > self._last_step:   # gradient accumulation: no optimizer step on this batch
                self._last_step = step
                self.callback.on_step_end(step)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.callback.on_train_end()

    return SecateursLightningCallback


def lightning_callback(callback: Callback) -> Any:
    """A Lightning `Callback` that drives `callback`; pass it in `lightning.Trainer(callbacks=[...])`."""
    _check_callback(callback)
    return _lightning_callback_class()(callback)


__all__ = ["AGPSchedule", "Callback", "IterativeSchedule", "PruningCallback", "lightning_callback",
           "trainer_callback"]
