"""Activation-based criteria: a neuron that rarely fires carries little.

- activation: mean |a| of each output channel over the calibration data.
- apoz: 1 - APoZ, the Average Percentage of Zeros after a ReLU-family nonlinearity
  (Hu et al. 2016); channels that are almost always zero score lowest.

The activation of a layer is read after the normalisation and nonlinearity modules
that directly consume its output (conv -> BatchNorm -> ReLU), followed by tensor
identity so nothing is guessed. Where the nonlinearity is functional, APoZ counts the
values <= 0, which is what a ReLU zeroes. A channel's score is given to every weight
of that channel, so at weight granularity these criteria remove whole neurons first.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import IncompatibleLayer
from ..select import Target
from .base import (
    Calibration,
    Criterion,
    Scores,
    broadcast_channels,
    channel_axis,
    forward_hooks,
    run_batches,
)

_FOLLOWERS = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Hardswish, nn.Mish,
)
_SCORABLE = (nn.Linear, nn.modules.conv._ConvNd)


class _ChannelStatistic(Criterion):
    needs_data = True

    def check_targets(self, targets: list[Target]) -> None:
        for t in targets:
            if not isinstance(t.module, _SCORABLE) or t.param_name != "weight":
                raise IncompatibleLayer(
                    f"criterion {self.name!r} scores Linear and conv layers only, not {t.name} "
                    f"({t.kind}); leave it out with ignore=[...] or pick a weight criterion")

    def statistic(self, activation: torch.Tensor, axis: int) -> torch.Tensor:
        """Per-channel sum of the statistic over the positions of one batch."""
        raise NotImplementedError

    def compute(self, model: nn.Module, targets: list[Target], calibration: Calibration) -> Scores:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        # id(latest tensor of a chain) -> (target, statistic, positions counted, tensor).
        # The statistic is taken when each hook fires, so a later in-place op cannot skew
        # it; the tensor is held only so that its id cannot be reused before the flush.
        pending: dict[int, tuple[Target, torch.Tensor, int, torch.Tensor]] = {}

        def measure(target: Target, activation: torch.Tensor) -> tuple[Target, torch.Tensor, int, torch.Tensor]:
            axis = channel_axis(target, activation)
            stat = self.statistic(activation.detach().float(), axis)
            return target, stat, activation.numel() // activation.shape[axis], activation

        def on_target(target):
            def hook(module, inputs, output):
                pending[id(output)] = measure(target, output)
            return hook

        def on_follower(module, inputs, output):
            if inputs and id(inputs[0]) in pending and isinstance(output, torch.Tensor):
                target = pending.pop(id(inputs[0]))[0]
                pending[id(output)] = measure(target, output)

        def flush(module, inputs, output):
            for target, stat, count, _ in pending.values():
                sums[target.name] = sums.get(target.name, 0) + stat
                counts[target.name] = counts.get(target.name, 0) + count
            pending.clear()

        hooks = {t.module: on_target(t) for t in targets}
        hooks.update({m: on_follower for m in model.modules() if isinstance(m, _FOLLOWERS) and m not in hooks})
        with forward_hooks(hooks):
            handle = model.register_forward_hook(flush)
            try:
                run_batches(model, calibration)
            finally:
                handle.remove()
        missing = [t.name for t in targets if t.name not in sums]
        if missing:
            raise IncompatibleLayer(f"criterion {self.name!r}: these layers never ran on the calibration data: {missing}")
        return {t.name: broadcast_channels(self.finish(sums[t.name] / counts[t.name]), t) for t in targets}

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        return mean


def _reduce_except(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.transpose(0, axis).reshape(x.shape[axis], -1).sum(1)


class MeanActivation(_ChannelStatistic):
    name = "activation"
    summary = "mean |activation| of the output channel"

    def statistic(self, activation: torch.Tensor, axis: int) -> torch.Tensor:
        return _reduce_except(activation.abs(), axis)


class APoZ(_ChannelStatistic):
    name = "apoz"
    summary = "1 - average percentage of zeros after ReLU"

    def statistic(self, activation: torch.Tensor, axis: int) -> torch.Tensor:
        return _reduce_except((activation <= 0).float(), axis)

    def finish(self, mean: torch.Tensor) -> torch.Tensor:
        return 1.0 - mean
