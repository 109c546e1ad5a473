"""Sparsity training: penalties that push weights (or whole groups) towards zero.

Train with the penalty added to the loss, then `threshold_prune` removes what reached
(near) zero. L1 drives single weights to zero; L2 shrinks them evenly; group lasso
(sum of the L2 norms of each output channel's weights) drives whole channels to zero.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..api import LayerPlan, Plan
from ..errors import InvalidArgument
from ..select import Target, select_targets
from ..sparsity import MASK_SUFFIX, set_mask


def _group_norms(t: Target) -> torch.Tensor:
    weight = t.param
    return weight.transpose(0, t.out_dim).reshape(weight.shape[t.out_dim], -1).norm(dim=1)


PENALTIES = {
    "l1": lambda t: t.param.abs().sum(),
    "l2": lambda t: t.param.pow(2).sum(),
    "group_lasso": lambda t: _group_norms(t).sum(),
}


class SparsityPenalty:
    """`strength * sum of the penalty over the selected weights`, as a callable for the loss."""

    def __init__(self, model: nn.Module, kind: str = "l1", strength: float = 1e-4, **selection: Any):
        if kind not in PENALTIES:
            raise InvalidArgument(f"unknown penalty {kind!r}; expected one of {', '.join(PENALTIES)}")
        if strength < 0:
            raise InvalidArgument(f"penalty strength must be >= 0, got {strength}")
        self.kind, self.strength = kind, strength
        self.targets = select_targets(model, **selection)
        if not self.targets:
            raise InvalidArgument("the penalty selects no layer")

    def __call__(self) -> torch.Tensor:
        term = PENALTIES[self.kind]
        return self.strength * sum(term(t) for t in self.targets)


def threshold_prune(model: nn.Module, threshold: float, **selection: Any) -> Plan:
    """Mask every selected weight with |w| <= `threshold`; returns the plan."""
    if threshold < 0:
        raise InvalidArgument(f"threshold must be >= 0, got {threshold}")
    targets = select_targets(model, **selection)
    plan = Plan("threshold", float("nan"), None, "layer")
    for t in targets:
        set_mask(t.module, t.param_name, t.param.detach().abs() > threshold)
        zeros = int((~t.module._buffers[t.param_name + MASK_SUFFIX]).sum())
        plan.layers.append(LayerPlan(t.name, t.kind, list(t.param.shape), t.param.numel(), zeros))
    plan.sparsity = plan.achieved
    return plan


__all__ = ["SparsityPenalty", "threshold_prune"]
