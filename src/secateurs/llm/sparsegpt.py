"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot").

Prune the columns of W ([out, in]) left to right and, after each one, spread the error of
its pruned weights over the columns not yet visited, the optimal-brain-surgeon update under
the layer Hessian H = (2/n) sum x x^T. With U the upper Cholesky factor of H^-1, pruning
column j moves the later columns by -(w_j - q_j) / U_jj * U[j, j:]. The columns are taken
in blocks of `blocksize`: inside a block the updates are applied column by column, and the
block's accumulated errors reach every later column at once (the lazy batch update). The
mask is chosen adaptively when a block starts (or, for N:M, when each group of M columns
starts), from w^2 / U_jj^2 of the already-updated weights.

Two choices of ours: the mask is chosen within each output row (each row loses the same
number of weights in a block, so every row ends exactly at the requested sparsity, as with
Wanda), and a Cholesky failure is retried with ten times the damping, up to
`_RETRIES` times (the layer report notes it).
"""
from __future__ import annotations

import torch

from ..allocate import drop_lowest, pruned_count
from ..errors import IncompatibleLayer, MissingData
from ..sparsity import nm_mask
from .engine import LLMConfig, register_method
from .stats import LayerStats

_RETRIES = 4


def inverse_cholesky(hessian: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, and the damping used."""
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    base = hessian.diagonal().mean().item()
    for attempt in range(_RETRIES + 1):
        used = damp * 10 ** attempt
        damped = hessian.clone()
        damped[diag, diag] += used * base
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0:
                return upper, used
    raise IncompatibleLayer(
        f"method 'sparsegpt': layer {name}: the Hessian is not positive definite even with damping "
        f"{used:g}; give more calibration data or leave the layer out with ignore=[...]")


def _block_mask(block: torch.Tensor, scale: torch.Tensor, start: int, sparsity: float) -> torch.Tensor:
    """Keep-mask of one block of columns: each row drops its share of the lowest w^2 / U_jj^2."""
    width = block.shape[1]
    # counts from the cumulative column index, so the blocks of a row add up to floor(s * in)
    count = pruned_count(start + width, sparsity) - pruned_count(start, sparsity)
    return drop_lowest(block.pow(2) / scale.pow(2), count)


@register_method("sparsegpt", statistic="hessian")
def prune_sparsegpt(weight: torch.Tensor, stats: LayerStats | None, config: LLMConfig,
          name: str) -> tuple[torch.Tensor, str]:
    """Return `weight` ([out, in]) pruned by SparseGPT with its remaining weights updated, and a note."""
    if stats is None or stats.hessian is None:
        raise MissingData(f"method 'sparsegpt': layer {name} never ran on the calibration data")
    pattern = config.nm
    if pattern and weight.shape[1] % pattern[1]:
        raise IncompatibleLayer(
            f"{name}: input width {weight.shape[1]} is not divisible by M={pattern[1]} of the "
            f"{pattern[0]}:{pattern[1]} pattern; leave it out with ignore=[...] (CLI: --ignore)")
    w = weight.clone().float()
    hessian = stats.hessian.to(w.device).clone()
    dead = hessian.diagonal() == 0  # inputs that are always zero: nothing to learn, prune them
    hessian[dead, dead] = 1
    w[:, dead] = 0
    upper, used = inverse_cholesky(hessian, config.damp, name)
    for start in range(0, w.shape[1], config.blocksize):
        end = min(start + config.blocksize, w.shape[1])
        _prune_block(w, upper, start, end, config.sparsity, pattern)
    note = f"damping raised to {used:g}" if used != config.damp else ""
    return w, note


def _prune_block(w: torch.Tensor, upper: torch.Tensor, start: int, end: int, sparsity: float,
                 pattern: tuple[int, int] | None) -> None:
    """Prune columns [start, end) of `w` in place and push their error onto columns >= end."""
    block = w[:, start:end].clone()
    u = upper[start:end, start:end]
    scale = u.diagonal()
    errors = torch.zeros_like(block)
    keep = torch.ones_like(block, dtype=torch.bool)
    if pattern is None:
        keep = _block_mask(block, scale, start, sparsity)
    for j in range(end - start):
        if pattern is not None and j % pattern[1] == 0:
            # N:M: choose this group's mask now, from the weights updated so far
            cols = slice(j, j + pattern[1])
            keep[:, cols] = nm_mask(block[:, cols].pow(2) / scale[cols].pow(2), *pattern)
        column = block[:, j]
        error = torch.where(keep[:, j], torch.zeros_like(column), column) / u[j, j]
        block[:, j:] -= error.unsqueeze(1) * u[j, j:].unsqueeze(0)
        block[:, j] = torch.where(keep[:, j], block[:, j], torch.zeros_like(column))
        errors[:, j] = error
    w[:, start:end] = block
    w[:, end:] -= errors @ upper[start:end, end:]  # the lazy update of every later column
