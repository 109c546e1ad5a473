"""Keep-masks from scores, shared by the LLM methods: per output row, per layer, or N:M."""
from __future__ import annotations

import math

import torch

from ..sparsity import nm_mask


def pruned_count(width: int, sparsity: float) -> int:
    """How many of `width` weights a `sparsity` fraction prunes (rounded down)."""
    return math.floor(width * sparsity + 1e-9)  # 1e-9: 0.3 * 10 must give 3, not 2


def prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool keep-mask dropping the `count` lowest scores of each row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        # topk rather than a full sort: a third faster, and the same answer on the same input
        lowest = scores.topk(count, dim=-1, largest=False, sorted=False).indices
        keep.scatter_(-1, lowest, False)
    return keep


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None,
              compare: str = "row", name: str = "layer") -> torch.Tensor:
    """Bool keep-mask for a [out, in] score matrix: N:M along inputs, else `sparsity` per row or per layer."""
    if pattern is not None:
        return nm_mask(scores, *pattern, name=name)
    if compare == "layer":
        flat = scores.reshape(1, -1)
        return prune_lowest(flat, pruned_count(flat.shape[1], sparsity)).reshape(scores.shape)
    return prune_lowest(scores, pruned_count(scores.shape[1], sparsity))
