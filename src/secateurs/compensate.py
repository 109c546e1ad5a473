"""Bias compensation: a removed input channel leaves its mean contribution behind.

When structured pruning cuts input features j of a linear layer y = W x + b, the output
loses sum_j W[:, j] x_j. Replacing each removed term by its calibration mean,
b' = b + sum_j W[:, j] E[x_j], keeps the layer's output unbiased (the "baseline bias
compensation" of FLAP, An et al. 2024). It costs one calibration pass and no training,
and is what keeps a structurally pruned LLM usable before any recovery. Layers without a
bias get one (a Hugging Face config that needs a flag for it says so: see `hf.fit_config`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .batches import Calibration, eval_mode, forward_hooks, run_batches
from .errors import MissingData
from .layers import is_conv1d, is_linear_like, weight_out_in


@dataclass
class Snapshot:
    """What compensation needs from the dense model: each layer's weight and mean input."""

    weights: dict[str, torch.Tensor]    # module name -> dense weight as [out, in]
    means: dict[str, torch.Tensor]      # module name -> mean input feature, [in]


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_linear_like(m)}


def out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (transformers' Conv1D stores [in, out])."""
    return weight_out_in(module).detach()


def snapshot(model: nn.Module, calibration: Calibration) -> Snapshot:
    """Mean input of every linear layer over the calibration data, with the dense weights."""
    if calibration.data is None:
        raise MissingData("bias compensation needs calibration data (pass data=...)")
    layers = _linear_layers(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    with eval_mode(model), torch.no_grad(), forward_hooks({m: hook(n) for n, m in layers.items()}):
        run_batches(model, calibration)
    means = {n: (sums[n] / counts[n]).float() for n in sums}
    return Snapshot({n: out_in(layers[n]) for n in means}, means)


def _kept(plan_keeps: dict[str, list[int]], name: str, dim: int) -> list[int] | None:
    return plan_keeps.get(f"{name}:{dim}")


def compensate(model: nn.Module, snap: Snapshot, keeps: dict[str, list[int]]) -> list[str]:
    """Fold the mean contribution of every removed input feature into the bias; returns the layers changed.

    `keeps` is a structured plan's "param:dim" -> kept positions.
    """
    changed = []
    layers = _linear_layers(model)
    for name, weight in snap.weights.items():
        in_dim = 0 if is_conv1d(layers.get(name, nn.Identity())) else 1
        kept_in = _kept(keeps, f"{name}.weight", in_dim)
        module = layers.get(name)
        if kept_in is None or module is None:
            continue
        removed = torch.ones(weight.shape[1], dtype=torch.bool)
        removed[torch.as_tensor(kept_in, dtype=torch.long)] = False
        delta = weight[:, removed] @ snap.means[name][removed].to(weight.dtype)
        kept_out = _kept(keeps, f"{name}.weight", 1 - in_dim)
        if kept_out is not None:
            delta = delta[torch.as_tensor(kept_out, dtype=torch.long)]
        add_bias(module, delta)
        changed.append(name)
    return changed


def add_bias(module: nn.Module, delta: torch.Tensor) -> None:
    """Add `delta` to the module's bias, creating the bias (as `delta`) where there is none."""
    bias = getattr(module, "bias", None)
    with torch.no_grad():
        if bias is None:
            weight = module.weight
            module.bias = nn.Parameter(delta.to(weight.dtype).to(weight.device).clone(),
                                       requires_grad=weight.requires_grad)
        else:
            bias.add_(delta.to(bias.dtype).to(bias.device))


__all__ = ["Snapshot", "compensate", "snapshot"]
