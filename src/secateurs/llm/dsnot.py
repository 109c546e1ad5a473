"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for
Sparse LLMs"): refine a pruned layer's mask by swapping weights, with no training.

After any method has pruned W to W', each output row repeatedly revives the pruned weight
that most reduces its reconstruction error and prunes, in exchange, the kept weight that
adds least back (within the same group of M for N:M), so the row keeps its count and
pattern. The paper scores the swaps with the mean shift of the row's output; we score them
with the exact calibration error e = d^T H d of the row's change d = W - W' under the
SparseGPT Hessian H = (2/n) X^T X, and take a swap only when it lowers e: the error never
rises. At most CYCLES swaps per row (the paper's budget of 50 cycles).

A revived weight gets its dense value back; a weight the method had updated (SparseGPT,
ALPS) keeps its updated value until it is swapped out.
"""
from __future__ import annotations

import torch

from ..errors import MissingData
from .engine import LLMConfig, register_refiner
from .stats import LayerStats

CYCLES = 50


def row_errors(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per output row, d^T H d with d = dense - pruned: the row's calibration error (float64)."""
    d = (dense - pruned).double()
    return ((d @ hessian.double()) * d).sum(1)


def _swap_costs(w, d, g, h, diag, grow_ok, kept, m):
    """For each row: the best pruned weight j to revive, the kept k to prune with it, the error change."""
    rows = torch.arange(w.shape[0], device=w.device)
    a = -d  # reviving j moves d_j to 0
    grow = 2 * a * g + a * a * diag
    grow = grow.masked_fill(~grow_ok, float("inf"))
    j = grow.argmin(1)
    aj = a[rows, j]
    # pruning k moves d_k by +w_k; the cross term couples it with the revived j
    prune = 2 * w * g + w * w * diag + 2 * aj.unsqueeze(1) * w * h[j]
    allowed = kept
    if m is not None:
        groups = torch.arange(w.shape[1], device=w.device) // m
        allowed = allowed & (groups.unsqueeze(0) == (j // m).unsqueeze(1))
    prune = prune.masked_fill(~allowed, float("inf"))
    k = prune.argmin(1)
    return j, k, grow[rows, j] + prune[rows, k]


def refine_mask(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor,
                pattern: tuple[int, int] | None = None, cycles: int = CYCLES) -> tuple[torch.Tensor, list[float]]:
    """`pruned` with swapped pruned/kept weights lowering sum_rows d^T H d; and that error per cycle.

    The first entry of the history is the error before any swap; every later one is no larger.
    """
    h = hessian.double()
    diag = h.diagonal().unsqueeze(0)
    w = pruned.double().clone()
    full = dense.double()
    d = full - w
    g = d @ h
    kept = w != 0
    grow_ok = ~kept & (full != 0)
    rows = torch.arange(w.shape[0], device=w.device)
    history = [float((d * g).sum())]
    m = pattern[1] if pattern else None
    for _ in range(cycles):
        j, k, change = _swap_costs(w, d, g, h, diag, grow_ok, kept, m)
        error = (d * g).sum(1)
        accept = torch.isfinite(change) & (change < -1e-9 * error.clamp_min(1e-30))
        frozen = torch.isfinite(change) & ~accept
        grow_ok[rows[frozen], j[frozen]] = False  # this j found no partner: try the next one
        if not bool(accept.any()):
            if not bool(frozen.any()):
                break
            continue
        r, j, k = rows[accept], j[accept], k[accept]
        a, b = -d[r, j], w[r, k]
        g[r] += a.unsqueeze(1) * h[j] + b.unsqueeze(1) * h[k]
        w[r, j], d[r, j] = full[r, j], 0.0
        w[r, k], d[r, k] = 0.0, full[r, k]
        kept[r, j], kept[r, k] = True, False
        grow_ok[r, j], grow_ok[r, k] = False, full[r, k] != 0
        history.append(float((d * g).sum()))
    return w.to(pruned.dtype), history


@register_refiner("dsnot", statistic="hessian")
def refine_dsnot(dense: torch.Tensor, pruned: torch.Tensor, stats: LayerStats | None, config: LLMConfig,
                 name: str) -> tuple[torch.Tensor, str]:
    """Return `pruned` refined by DSnoT swaps, and a note with the error change."""
    if stats is None or stats.hessian is None:
        raise MissingData(f"refine 'dsnot': layer {name} never ran on the calibration data")
    refined, history = refine_mask(dense, pruned, stats.hessian.to(dense.device), config.nm)
    drop = 1 - history[-1] / history[0] if history[0] > 0 else 0.0
    return refined, f"dsnot: error -{drop:.1%}"
