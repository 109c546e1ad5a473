"""Wanda (Sun et al. 2023) for LLM linears: the score |W_ij| * ||X_j||_2 of
`secateurs.criteria.wanda` (the one implementation), from the norms the engine collects.

The lowest scores within each output row go (or, with an N:M pattern, the lowest M-N of
every M consecutive inputs of a row). No weight is updated.
"""
from __future__ import annotations

import torch

from ..allocate import keep_mask
from ..criteria.wanda import wanda_scores
from ..errors import MissingData
from .engine import LLMConfig, register_method
from .stats import LayerStats


def scores(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for a [out, in] weight, from the layer's calibration statistics."""
    return wanda_scores(weight, stats.norms)


@register_method("wanda", statistic="norms")
def prune_wanda(weight: torch.Tensor, stats: LayerStats | None, config: LLMConfig,
          name: str) -> tuple[torch.Tensor, str]:
    """Return `weight` ([out, in]) with its lowest Wanda scores zeroed, and an empty note."""
    if stats is None or stats.sumsq is None:
        raise MissingData(f"method 'wanda': layer {name} never ran on the calibration data")
    keep = keep_mask(scores(weight, stats), config.sparsity, config.nm, config.compare, name)
    return weight * keep, ""
