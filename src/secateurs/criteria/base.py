"""The criterion interface, and the channel helpers the criteria share.

A criterion returns element-wise importance scores shaped like each weight (higher
means keep). Granularities reduce them: single weights use them as they are, N:M
compares them inside blocks, channel groups sum them over the group.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..batches import (  # noqa: F401  re-exported
    LOSSES,
    Calibration,
    LossFn,
    eval_mode,
    forward_hooks,
    model_device,
    requiring_grad,
    run_batches,
    split_batch,
    to_device,
)
from ..errors import InvalidArgument, MissingData
from ..select import Target

Scores = dict[str, torch.Tensor]


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
