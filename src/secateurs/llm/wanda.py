"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Score each weight by |W_ij| * ||X_j||_2, the weight's magnitude times the L2 norm of its
input feature over the calibration tokens, and drop the lowest scores within each output
row (or, with an N:M pattern, the lowest M-N of every M consecutive inputs of a row). No
weight is updated.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import MissingData
from .masks import keep_mask
from .stats import LayerStats

if TYPE_CHECKING:
    from .engine import LLMConfig


def scores(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for a [out, in] weight."""
    norms = stats.norms.to(weight.device)
    # in place on the fresh |W| (promoted as `*` would): one [out, in] buffer instead of two,
    # half the time on big layers
    return weight.abs().to(torch.promote_types(weight.dtype, norms.dtype)).mul_(norms.unsqueeze(0))


def prune(weight: torch.Tensor, stats: LayerStats | None, config: "LLMConfig",
          name: str) -> tuple[torch.Tensor, str]:
    """Return `weight` ([out, in]) with its lowest Wanda scores zeroed, and an empty note."""
    if stats is None or stats.sumsq is None:
        raise MissingData(f"method 'wanda': layer {name} never ran on the calibration data")
    keep = keep_mask(scores(weight, stats), config.sparsity, config.nm, config.compare, name)
    return weight * keep, ""
