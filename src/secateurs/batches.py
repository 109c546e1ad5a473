"""Batches and the calibration plumbing every stage shares: split, move, run, no side effects.

A batch is a Tensor (inputs only), a tuple ``(inputs, targets)`` where inputs may be a
tuple of tensors, or a dict of keyword inputs (targets under "labels").
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .errors import InvalidArgument, MissingData

LossFn = Callable[[Any, Any], torch.Tensor]
# The losses a recipe or the command line names: (model output, targets) -> scalar.
LOSSES: dict[str, LossFn] = {"cross_entropy": torch.nn.functional.cross_entropy,
                             "mse": torch.nn.functional.mse_loss}
Scores = dict[str, torch.Tensor]


@dataclass
class Calibration:
    """Data for data-aware criteria: an iterable of batches and, for gradients, a loss."""

    data: Iterable[Any] | None = None
    loss_fn: LossFn | None = None
    max_batches: int | None = None

    def batches(self, device: torch.device) -> Iterator[tuple[tuple, dict, Any]]:
        """Yield (args, kwargs, targets) moved to `device`, at most `max_batches`."""
        if self.data is None:
            return
        for i, batch in enumerate(self.data):
            if self.max_batches is not None and i >= self.max_batches:
                return
            yield split_batch(to_device(batch, device))


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def split_batch(batch: Any) -> tuple[tuple, dict, Any]:
    """(positional inputs, keyword inputs, targets) of one batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, dict):
        return (), dict(batch), batch.get("labels")
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return (batch[0],), {}, None
        if len(batch) == 2:
            inputs, targets = batch
            args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            return args, {}, targets
    raise InvalidArgument(
        "a calibration batch must be a Tensor, (inputs, targets) or a dict of inputs; "
        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode (no BN statistics updates, no dropout), then restore each flag."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def requiring_grad(params: Iterable[torch.Tensor]):
    """Let autograd differentiate `params` even where the user froze them, then refreeze."""
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@contextlib.contextmanager
def forward_hooks(hooks: dict[nn.Module, Callable]):
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_batches(model: nn.Module, calibration: Calibration) -> int:
    """Forward every calibration batch without gradients; returns how many ran."""
    count = 0
    with torch.no_grad(), eval_mode(model):
        for args, kwargs, _ in calibration.batches(model_device(model)):
            model(*args, **kwargs)
            count += 1
    if count == 0:
        raise MissingData("the calibration data yielded no batches")
    return count


def mean_loss(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, max_batches: int | None = None) -> float:
    """The loss averaged over samples, without gradients, in eval mode.

    The one definition of "mean loss": a batch weighs as many samples as it holds (the
    batch dimension of its targets), so a short last batch does not count as a full one.
    """
    total, count = 0.0, 0
    device = model_device(model)
    with torch.no_grad(), eval_mode(model):
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            args, kwargs, targets = split_batch(to_device(batch, device))
            if targets is None:
                raise MissingData("the loss needs targets: batches must be (inputs, targets) or carry 'labels'")
            n = len(targets) if getattr(targets, "dim", lambda: 0)() > 0 else 1
            total += float(loss_fn(model(*args, **kwargs), targets)) * n
            count += n
    if count == 0:
        raise MissingData("the data yielded no batches to measure the loss on")
    return total / count


def check_data_tensors(source: str, inputs: torch.Tensor, targets: torch.Tensor | None) -> None:
    """Refuse data a run cannot learn or score from: no examples, 0-d tensors, label counts that
    differ from the inputs', labels that are neither class indices nor float targets."""
    if inputs.dim() == 0:
        raise InvalidArgument(f"{source}: 'inputs' is a single number (0-d); it needs a batch dimension")
    if len(inputs) == 0:
        raise MissingData(f"{source} holds no examples (its 'inputs' tensor is empty)")
    if targets is None:
        return
    if targets.dim() == 0:
        raise InvalidArgument(f"{source}: 'targets' is a single number (0-d); it needs one label per input")
    if len(targets) != len(inputs):
        raise InvalidArgument(f"{source}: {len(inputs)} inputs but {len(targets)} targets")
    if not (targets.is_floating_point() and targets.isfinite().all()) and targets.dtype not in _INDEX_DTYPES:
        raise InvalidArgument(f"{source}: 'targets' of dtype {targets.dtype} are neither class indices (integers) "
                              "nor finite float targets")
    if inputs.is_floating_point() and not inputs.isfinite().all():
        raise InvalidArgument(f"{source}: 'inputs' hold NaN or infinite values")


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_class_labels(source: str, targets: torch.Tensor, outputs: torch.Tensor) -> None:
    """Class-index labels (for cross-entropy) must be integers in [0, classes) for the model's `outputs`."""
    if targets.is_floating_point() and targets.shape == outputs.shape:
        return   # class probabilities
    if targets.is_floating_point():
        raise InvalidArgument(f"{source}: cross-entropy needs integer class labels, got float targets of shape "
                              f"{tuple(targets.shape)} (cast them to int64, or pass class probabilities shaped like "
                              f"the model's output {tuple(outputs.shape)})")
    classes = outputs.shape[1] if outputs.dim() > 1 else 0
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= classes:
        raise InvalidArgument(f"{source}: labels must be class indices in [0, {classes}) for this model's "
                              f"{classes} outputs, found {low}..{high}")
