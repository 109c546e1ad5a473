"""OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
Pruning LLMs to High Sparsity").

Blocks with more outlier features lose fewer weights. A block's outlier ratio D_b is the
fraction of its Wanda scores |W_ij| * ||X_j|| above M times their layer's mean score (M = 5
by default). The ratios are scaled to [0, 1] and each block gets the sparsity
s_b = s - lambda * (D_b' - mean(D')), so the plain mean of the block sparsities is the
global sparsity s (blocks of a transformer are the same size, so it is also the mean
weighted by parameters), then clamped to [0, 0.99] (a clamp breaks the equality only for
a lambda large enough to reach it).

The outliers are measured on the dense model in a first pass of the same block engine
(statistics only, nothing pruned).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..criteria.wanda import wanda_scores
from ..layers import weight_out_in
from .blocks import BlockLayout, block_linears
from .engine import LLMConfig, cache_off, capture_inputs, collect_stats, place_inputs, walk_blocks


def outlier_ratio(block: nn.Module, inputs: Any, config: LLMConfig, prefix: str = "") -> float:
    """Fraction of the block's Wanda scores above `config.owl_m` times their layer's mean."""
    linears = block_linears(block, prefix, config.ignore)
    stats = collect_stats(block, inputs, linears, LLMConfig(method="wanda"))
    outliers = total = 0
    for name, module in linears.items():
        if stats[name].tokens == 0:
            continue
        s = wanda_scores(weight_out_in(module).detach().float(), stats[name].norms)
        outliers += int((s > config.owl_m * s.mean()).sum())
        total += s.numel()
    return outliers / total if total else 0.0


def spread(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Block sparsities s - lam * (normalised ratio - its mean), clamped to [0, 0.99]."""
    d = torch.tensor(ratios, dtype=torch.float64)
    span = d.max() - d.min()
    normalised = (d - d.min()) / span if span > 0 else torch.zeros_like(d)
    block = sparsity - lam * (normalised - normalised.mean())
    return block.clamp(0.0, 0.99).tolist()


def owl_sparsities(model: nn.Module, batches: list[Any], config: LLMConfig, layout: BlockLayout) -> list[float]:
    """One sparsity per block from the dense model's outliers, mean `config.sparsity`.

    Each block is onloaded to `config.device` in turn, as in the pruning pass.
    """
    ratios: list[float] = []
    with cache_off(model):
        inputs = place_inputs(capture_inputs(model, layout, batches), config)
        walk_blocks(layout, inputs, lambda i, block, block_inputs: ratios.append(
            outlier_ratio(block, block_inputs, config, prefix=f"{layout.blocks_path}.{i}.")), config.device)
    return spread(ratios, config.sparsity, config.owl)
