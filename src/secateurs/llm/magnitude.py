"""Magnitude pruning for LLM linears: drop the smallest |W|, per output row or per layer."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .masks import keep_mask
from .stats import LayerStats

if TYPE_CHECKING:
    from .engine import LLMConfig


def prune(weight: torch.Tensor, stats: LayerStats | None, config: "LLMConfig",
          name: str) -> tuple[torch.Tensor, str]:
    """Return `weight` ([out, in]) with its smallest magnitudes zeroed, and an empty note."""
    keep = keep_mask(weight.abs(), config.sparsity, config.nm, config.compare, name)
    return weight * keep, ""
