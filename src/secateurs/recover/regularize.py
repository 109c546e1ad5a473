"""Sparsity training: penalties that push weights (or whole groups) towards zero.

Train with the penalty added to the loss, then `threshold_prune` removes what reached
(near) zero. L1 drives single weights to zero; L2 shrinks them evenly; group lasso
(sum of the L2 norms of each output channel's weights) drives whole channels to zero.

For structured pruning, `GroupLassoPenalty` takes its groups from the coupled-channel
analysis: a unit's norm covers every parameter slice removed with it (the producer's
rows and bias, the norm's entries, the consumers' columns), so a unit driven to zero
is one that `prune_structured` removes without changing the output. `SlimmingPenalty`
is network slimming's L1 term on the norm scales, for the `bn_scale` criterion.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..api import LayerPlan, Plan
from ..criteria.bn_scale import norm_scales
from ..errors import InvalidArgument, MissingData
from ..graph.groups import Analysis, analyze
from ..structured.units import UNIT_KINDS, is_ignored
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


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength < float("inf"):
        raise InvalidArgument(f"penalty strength must be a number >= 0, got {strength!r}")
    return float(strength)


class GroupLassoPenalty:
    """`strength * sum over prunable units of sqrt(p) * ||unit||_2`, units from the coupled-group analysis.

    Group lasso (Yuan & Lin 2006; for channels, Wen et al. 2016): the L2 norm of all
    parameter slices of a unit, across every member of its group, so the whole unit
    reaches zero together. `p` is the number of parameters of the unit (the usual
    scaling that keeps large and small groups comparable). Give `example_inputs` (the
    model is traced) or an `analysis` of this model; build the penalty after any cut.
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None, *, analysis: Analysis | None = None,
                 strength: float = 1e-3, units: Sequence[str] = UNIT_KINDS, ignore: Sequence[str] = ()):
        self.strength = _check_strength(strength)
        bad = [u for u in units if u not in UNIT_KINDS]
        if bad:
            raise InvalidArgument(f"unknown unit kind {bad[0]!r}; expected some of {UNIT_KINDS}")
        if analysis is None:
            if example_inputs is None:
                raise MissingData("GroupLassoPenalty needs example_inputs=... (or analysis=...) to find the groups")
            analysis = analyze(model, example_inputs)
        groups = [g for g in analysis.groups if g.kind in units and g.prunable_units and not is_ignored(g, ignore)]
        self.units: list[tuple[int, int]] = [(g.index, i) for g in groups for i, ok in enumerate(g.prunable) if ok]
        if not self.units:
            raise InvalidArgument("the model has no prunable unit for the group-lasso penalty (see analyze())")
        by_index = {g.index: g for g in groups}
        row_of = {by_index[gi].units[i]: r for r, (gi, i) in enumerate(self.units)}
        penalised = np.array(list(row_of), dtype=np.int64)
        self.slices: list[tuple[nn.Parameter, int, torch.Tensor, torch.Tensor]] = []
        sizes = np.zeros(len(self.units))
        for g in groups:
            for name, dim in g.members:
                param = model.get_parameter(name)
                unit_ids = analysis.unit_of[(name, dim)]
                positions = np.nonzero(np.isin(unit_ids, penalised))[0]
                rows = np.array([row_of[u] for u in unit_ids[positions].tolist()], dtype=np.int64)
                np.add.at(sizes, rows, param.numel() // param.shape[dim])
                self.slices.append((param, dim, torch.as_tensor(positions, device=param.device),
                                    torch.as_tensor(rows, device=param.device)))
        self.scale = torch.as_tensor(np.sqrt(sizes), dtype=torch.float32)

    def unit_norms(self) -> torch.Tensor:
        """The L2 norm of each penalised unit (in the order of `self.units`: (group index, position))."""
        total = torch.zeros(len(self.units), device=self.slices[0][0].device)
        for param, dim, positions, rows in self.slices:
            squares = param.float().pow(2).transpose(0, dim).reshape(param.shape[dim], -1).sum(1)[positions]
            total = total.index_add(0, rows, squares)
        return (total + 1e-12).sqrt()  # the epsilon keeps the gradient finite at exactly zero

    def __call__(self) -> torch.Tensor:
        norms = self.unit_norms()
        return self.strength * (self.scale.to(norms.device) * norms).sum()


class SlimmingPenalty:
    """`strength * sum of |gamma|` over the norm layers' scales (network slimming, Liu et al. 2017)."""

    def __init__(self, model: nn.Module, strength: float = 1e-4, norms: Sequence[str] = ("batchnorm",)):
        self.strength = _check_strength(strength)
        self.scales = list(norm_scales(model, norms).values())
        if not self.scales:
            raise InvalidArgument(f"the model has no affine norm layer of kinds {list(norms)} to slim")

    def __call__(self) -> torch.Tensor:
        return self.strength * sum(gamma.abs().sum() for gamma in self.scales)


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


__all__ = ["GroupLassoPenalty", "SlimmingPenalty", "SparsityPenalty", "threshold_prune"]
