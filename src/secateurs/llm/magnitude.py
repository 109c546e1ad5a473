"""Magnitude pruning for LLM linears: drop the smallest |W|, per output row or per layer.

Needs no calibration data: the engine runs no forward pass for it.
"""
from __future__ import annotations

import torch

from ..allocate import keep_mask
from ..criteria.magnitude import magnitude_scores
from .engine import LLMConfig, register_method
from .stats import LayerStats


@register_method("magnitude", statistic=None)
def prune_magnitude(weight: torch.Tensor, stats: LayerStats | None, config: LLMConfig,
          name: str) -> tuple[torch.Tensor, str]:
    """Return `weight` ([out, in]) with its smallest magnitudes zeroed, and an empty note."""
    keep = keep_mask(magnitude_scores(weight), config.sparsity, config.nm, config.compare, name)
    return weight * keep, ""
