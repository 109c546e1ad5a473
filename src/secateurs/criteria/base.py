"""The criterion interface and the calibration plumbing the data-aware ones share.

A criterion returns element-wise importance scores shaped like each weight (higher
means keep). Granularities reduce them: single weights use them as they are, N:M
compares them inside blocks, channel groups sum them over the group.

A batch is a Tensor (inputs only), a tuple ``(inputs, targets)`` where inputs may be a
tuple of tensors, or a dict of keyword inputs (targets under "labels").
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn

from ..errors import InvalidArgument, MissingData
from ..select import Target

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


class Criterion:
    """Scores every weight of the targets; subclasses set the flags and `compute`."""

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False
    needs_loss: ClassVar[bool] = False
    scores_norms: ClassVar[bool] = False   # scores norm scales (channel pruning only), not the targets
    summary: ClassVar[str] = ""

    def __call__(self, model: nn.Module, targets: list[Target],
                 calibration: Calibration | None = None) -> Scores:
        calibration = calibration or Calibration()
        self.check(calibration)
        self.check_targets(targets)
        scores = self.compute(model, targets, calibration)
        return {name: s.detach().float() for name, s in scores.items()}

    def check(self, calibration: Calibration) -> None:
        if self.needs_data and calibration.data is None:
            hint = " and loss_fn=..." if self.needs_loss else ""
            raise MissingData(
                f"criterion {self.name!r} needs calibration data: pass data=<iterable of batches>{hint} "
                f"(CLI: --calib FILE)")
        if self.needs_loss and calibration.loss_fn is None:
            raise MissingData(f"criterion {self.name!r} needs a loss function: pass loss_fn=...")

    def check_targets(self, targets: list[Target]) -> None:
        """Raise IncompatibleLayer for a target this criterion cannot score."""

    def compute(self, model: nn.Module, targets: list[Target], calibration: Calibration) -> Scores:
        raise NotImplementedError


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


def channel_axis(target: Target, output: torch.Tensor) -> int:
    """Axis of a layer's output that indexes its output channels."""
    if isinstance(target.module, nn.Linear):
        return output.dim() - 1
    return 1 if output.dim() > 1 else 0


def broadcast_channels(channel_scores: torch.Tensor, target: Target) -> torch.Tensor:
    """Spread one score per output channel over every weight of that channel."""
    weight = target.param
    shape = [1] * weight.dim()
    shape[target.out_dim] = -1
    if isinstance(target.module, nn.modules.conv._ConvTransposeNd) and target.module.groups > 1:
        raise InvalidArgument(f"{target.name}: grouped transposed conv is not supported here")
    return channel_scores.to(weight.device).reshape(shape).expand_as(weight).clone()
