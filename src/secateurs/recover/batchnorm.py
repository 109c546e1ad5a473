"""BatchNorm recalibration: running statistics that describe the pruned network.

Pruning changes what reaches every BatchNorm layer, so the running mean and variance
learned by the dense model no longer fit, and accuracy drops for that reason alone.
Re-estimating them on a few batches, with no training, often wins most of it back.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..batches import model_device, split_batch, to_device
from ..errors import InvalidArgument, MissingData

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of `model` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def recalibrate_bn(model: nn.Module, data: Iterable[Any], batches: int | None = None) -> int:
    """Re-estimate every BatchNorm layer's running statistics on `data`; returns the batches used.

    The statistics are reset and rebuilt as the plain average over the batches of each
    batch's mean and unbiased variance (momentum=None, torch's cumulative average), so
    every batch counts the same. Only the BatchNorm layers run in train mode: dropout
    and the rest stay in eval mode, so the layers see the activations they will see at
    inference. No gradients are computed. Every module's mode and every BatchNorm
    momentum are restored afterwards; at most `batches` batches are read.
    """
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise InvalidArgument(f"batches must be a positive integer or None (all of data), got {batches!r}")
    layers = batchnorm_layers(model)
    if not layers:
        raise InvalidArgument("the model has no BatchNorm layer with running statistics to recalibrate")
    modes = {m: m.training for m in model.modules()}
    saved = {bn: (bn.momentum, {k: v.clone() for k, v in bn.state_dict().items()}) for bn in layers}
    device = model_device(model)
    used, finished = 0, False
    try:
        model.eval()
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for batch in data:
                if batches is not None and used >= batches:
                    break
                args, kwargs, _ = split_batch(to_device(batch, device))
                model(*args, **{k: v for k, v in kwargs.items() if k != "labels"})
                used += 1
        finished = used > 0
    finally:
        for module, flag in modes.items():
            module.training = flag
        for bn, (momentum, state) in saved.items():
            bn.momentum = momentum
            if not finished:  # no batch, or a failing one: keep the old statistics, not half-built ones
                bn.load_state_dict(state)
    if used == 0:
        raise MissingData("recalibrate_bn got no batches in data; pass an iterable of input batches")
    return used


__all__ = ["batchnorm_layers", "recalibrate_bn"]
