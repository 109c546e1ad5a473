"""Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2, pruning by weights and activations.

X_j is input feature j over every calibration token. For a conv layer the input
"features" are the columns of its im2col matrix (one per input channel and kernel
offset), taken with the layer's own stride, padding and dilation; for Conv1d/3d the
norm is per input channel. Wanda compares scores within each output row: use
scope="row" for the paper's setting. No weights are updated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IncompatibleLayer
from ..select import Target
from .base import Calibration, Criterion, Scores, forward_hooks, run_batches

_CHUNK = 16  # samples unfolded at a time, to bound im2col memory


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, with `norms` broadcastable to `weight`: the one Wanda score.

    For a [out, in] weight `norms` is the [in] vector of input norms; for a conv, laid out
    like the weight. The unstructured criterion and the LLM engine both call this.
    """
    norms = norms.to(weight.device)
    # in place on the fresh |W| (promoted as `*` would): one weight-sized buffer instead of
    # two, half the time on big layers
    return weight.abs().to(torch.promote_types(weight.dtype, norms.dtype)).mul_(norms)


def _conv2d_column_sumsq(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # Pad as the layer does ("same", reflect and circular included), so the columns are
    # exactly those the layer multiplies.
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    total = 0
    for chunk in x.split(_CHUNK):
        padded = F.pad(chunk.float(), conv._reversed_padding_repeated_twice, mode=mode)
        cols = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        total = total + cols.pow(2).sum(dim=(0, 2))
    return total.reshape(conv.in_channels, *conv.kernel_size)


def _input_sumsq(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each input feature of `module` over one batch."""
    if isinstance(module, nn.Linear):
        return x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)
    if isinstance(module, nn.Conv2d):
        return _conv2d_column_sumsq(module, x)
    per_channel = x.float().pow(2).transpose(0, 1).reshape(x.shape[1], -1).sum(1)
    return per_channel.reshape(-1, *[1] * (module.weight.dim() - 2)).expand(-1, *module.kernel_size)


def _norms_for_weight(module: nn.Module, sumsq: torch.Tensor) -> torch.Tensor:
    """Input norms laid out like the weight, grouped convs included."""
    norms = sumsq.sqrt()
    weight = module.weight
    if isinstance(module, nn.Linear):
        return norms.unsqueeze(0).expand_as(weight)
    groups = module.groups
    per_group = norms.reshape(groups, -1, *norms.shape[1:])
    return per_group.repeat_interleave(weight.shape[0] // groups, dim=0)


class Wanda(Criterion):
    name = "wanda"
    needs_data = True
    summary = "|w| * ||x_j||_2 of the weight's input feature"

    def check_targets(self, targets: list[Target]) -> None:
        for t in targets:
            ok = isinstance(t.module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and t.param_name == "weight"
            if not ok:
                raise IncompatibleLayer(
                    f"criterion 'wanda' scores Linear and conv layers only, not {t.name} ({t.kind}); "
                    f"leave it out with ignore=[...] or pick a weight criterion")

    def compute(self, model: nn.Module, targets: list[Target], calibration: Calibration) -> Scores:
        sumsq: dict[str, torch.Tensor] = {}

        def hook_for(target: Target):
            def hook(module, inputs, output):
                sumsq[target.name] = sumsq.get(target.name, 0) + _input_sumsq(module, inputs[0].detach())
            return hook

        with forward_hooks({t.module: hook_for(t) for t in targets}):
            run_batches(model, calibration)
        missing = [t.name for t in targets if t.name not in sumsq]
        if missing:
            raise IncompatibleLayer(f"criterion 'wanda': these layers never ran on the calibration data: {missing}")
        return {t.name: wanda_scores(t.param.detach().float(), _norms_for_weight(t.module, sumsq[t.name]))
                for t in targets}
