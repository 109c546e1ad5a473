"""BN-scale, network slimming (Liu et al. 2017): a channel whose norm scale |gamma| is small matters little.

The criterion scores the scale parameters of the model's normalisation layers, not the
weights of the targets: element score = |gamma|. Channel pruning sums element scores
over a group's members, so a unit's score is |gamma| summed over the group's norm
layers; a group with no norm member falls back to the squared L2 norm of its weights.
Weight-level pruning has no channel to attach |gamma| to and refuses the criterion.
Train with `SlimmingPenalty` (an L1 term on gamma) first, so the scales become sparse.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import InvalidArgument
from ..select import Target
from .base import Calibration, Criterion, Scores

# BatchNorm is the paper's layer; the others are opt-in because their scale is shared
# by every position of a token or a group rather than by one channel's statistics.
NORM_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "batchnorm": (nn.modules.batchnorm._NormBase,),
    "layernorm": (nn.LayerNorm,),
    "groupnorm": (nn.GroupNorm,),
    "rmsnorm": (nn.RMSNorm,),
}


def norm_types(names: Sequence[str]) -> tuple[type[nn.Module], ...]:
    """The module classes of the named norm kinds ("batchnorm", "layernorm", ...)."""
    if isinstance(names, str):
        names = (names,)
    bad = [n for n in names if n not in NORM_TYPES]
    if bad or not names:
        raise InvalidArgument(f"norms={list(names)!r}: expected a non-empty subset of {sorted(NORM_TYPES)}")
    return tuple(cls for n in names for cls in NORM_TYPES[n])


def norm_scales(model: nn.Module, norms: Sequence[str] = ("batchnorm",)) -> dict[str, nn.Parameter]:
    """Qualified name -> scale parameter (gamma) of every affine norm layer of the named kinds."""
    types = norm_types(norms)
    scales = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, types) and isinstance(weight, nn.Parameter):
            scales[f"{module_name}.weight" if module_name else "weight"] = weight
    return scales


class BNScale(Criterion):
    name = "bn_scale"
    summary = "|gamma| of the norm layers (network slimming); channel pruning only"
    scores_norms = True

    def __init__(self, norms: Sequence[str] = ("batchnorm",)):
        norm_types(norms)
        self.norms = tuple(norms) if not isinstance(norms, str) else (norms,)

    def compute(self, model: nn.Module, targets: list[Target], calibration: Calibration) -> Scores:
        return {name: gamma.detach().abs() for name, gamma in norm_scales(model, self.norms).items()}
