"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play: An Efficient Post-training Pruning Method for
Large Language Models"): relative importance and activations.

A weight's relative importance is its share of its row's and of its column's absolute
sum, |W_ij| / sum_j |W_ij| + |W_ij| / sum_i |W_ij|, so a weight that matters to a small
output row or a small input channel is not cut for being small in absolute terms. It is
weighted by the input activation as ||X_j||_2^a with a = 0.5 (the paper's choice), and
the lowest scores go within each output row (or in every group of M for N:M). No weight is
updated. RIA's channel permutation for N:M is llm/permute.py (`permute=True`).
"""
from __future__ import annotations

import torch

from ..allocate import keep_mask
from ..criteria.wanda import wanda_scores
from ..errors import MissingData
from .engine import LLMConfig, register_method
from .stats import LayerStats

ACTIVATION_POWER = 0.5  # the paper's a


def relative_importance(weight: torch.Tensor) -> torch.Tensor:
    """|W_ij| / sum_j |W_ij| + |W_ij| / sum_i |W_ij| for a [out, in] weight (0 / 0 counts as 0)."""
    magnitude = weight.abs().float()
    rows = magnitude.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    columns = magnitude.sum(0, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return magnitude / rows + magnitude / columns


def ria_scores(weight: torch.Tensor, norms: torch.Tensor, power: float = ACTIVATION_POWER) -> torch.Tensor:
    """RIA's score: relative importance times ||X_j||_2 ** power (Wanda's weighting, softened)."""
    return wanda_scores(relative_importance(weight), norms.float().pow(power))


@register_method("ria", statistic="norms")
def prune_ria(weight: torch.Tensor, stats: LayerStats | None, config: LLMConfig,
              name: str) -> tuple[torch.Tensor, str]:
    """Return `weight` ([out, in]) with its lowest RIA scores zeroed, and an empty note."""
    if stats is None or stats.sumsq is None:
        raise MissingData(f"method 'ria': layer {name} never ran on the calibration data")
    keep = keep_mask(ria_scores(weight, stats.norms), config.sparsity, config.nm, config.compare, name)
    return weight * keep, ""
