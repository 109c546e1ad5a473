"""From scores to masks: how many weights each layer loses, and which.

Counts are exact: a layer of n weights at ratio s loses round(s * n) of them, chosen
by a stable sort so ties break the same way every run.
"""
from __future__ import annotations

import math

import torch

from .errors import InvalidArgument
from .select import Target, from_weight_rows, weight_rows
from .sparsity import nm_mask

SCOPES = ("layer", "global", "row")
# Per-layer normalisations for global ranking, so criteria whose scale differs between
# layers (activations, gradients) can be compared across them.
NORMALIZERS = {
    "none": lambda s: s,
    "mean": lambda s: s / s[torch.isfinite(s)].abs().mean().clamp_min(1e-12),
    "max": lambda s: s / s[torch.isfinite(s)].abs().max().clamp_min(1e-12),
    "l2": lambda s: s / s[torch.isfinite(s)].norm().clamp_min(1e-12),
}


def _lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask (True = keep) removing the `count` lowest scores of a tensor."""
    flat = scores.reshape(-1)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if count > 0:
        mask[torch.argsort(flat, stable=True)[:count]] = False
    return mask.reshape(scores.shape)


def layer_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """The same ratio in every layer."""
    return {name: _lowest_mask(s, round(sparsity * s.numel())) for name, s in scores.items()}


def row_masks(scores: dict[str, torch.Tensor], sparsity: float, targets: list[Target]) -> dict[str, torch.Tensor]:
    """The same ratio in every output row (Wanda's comparison group)."""
    masks = {}
    for t in targets:
        rows = weight_rows(scores[t.name], t)
        count = round(sparsity * rows.shape[1])
        keep = torch.ones_like(rows, dtype=torch.bool)
        if count > 0:
            keep.scatter_(1, torch.argsort(rows, dim=1, stable=True)[:, :count], False)
        masks[t.name] = from_weight_rows(keep, scores[t.name], t)
    return masks


def global_counts(sizes: dict[str, int], sorted_scores: dict[str, torch.Tensor], sparsity: float,
                  min_ratio: float, max_ratio: float) -> dict[str, int]:
    """Per-layer counts that prune the globally lowest scores within per-layer bounds.

    Each layer first loses its `min_ratio` share; the rest of the budget goes to the
    lowest remaining scores of all layers, never past a layer's `max_ratio`.
    """
    total = sum(sizes.values())
    budget = round(sparsity * total)
    low = {n: math.ceil(min_ratio * size - 1e-9) for n, size in sizes.items()}
    high = {n: math.floor(max_ratio * size + 1e-9) for n, size in sizes.items()}
    if sum(low.values()) > budget or sum(high.values()) < budget:
        reachable = (sum(low.values()) / total, sum(high.values()) / total)
        raise InvalidArgument(
            f"sparsity {sparsity} cannot be met with min_ratio={min_ratio} and max_ratio={max_ratio}: "
            f"these bounds allow {reachable[0]:.4f} to {reachable[1]:.4f}")
    names = list(sizes)
    values = torch.cat([sorted_scores[n][low[n]:high[n]] for n in names])
    owners = torch.cat([torch.full((high[n] - low[n],), i, dtype=torch.long) for i, n in enumerate(names)])
    remaining = budget - sum(low.values())
    chosen = owners[torch.argsort(values, stable=True)[:remaining]]
    extra = torch.bincount(chosen, minlength=len(names)).tolist()
    return {n: low[n] + extra[i] for i, n in enumerate(names)}


def _unbounded_global_masks(flat: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """The globally lowest round(s * N) scores, found by selection (O(N)) instead of sorting.

    Ties at the threshold go to the earlier layer and index, as a stable sort would.
    """
    names = list(flat)
    values = torch.cat([flat[n] for n in names])
    budget = round(sparsity * values.numel())
    keep = torch.ones(values.numel(), dtype=torch.bool)
    if budget > 0:
        threshold = torch.kthvalue(values, budget).values
        below = values < threshold
        ties = (values == threshold).nonzero().flatten()[: budget - int(below.sum())]
        keep[below] = False
        keep[ties] = False
    return dict(zip(names, keep.split([flat[n].numel() for n in names])))


def global_masks(scores: dict[str, torch.Tensor], sparsity: float, min_ratio: float = 0.0,
                 max_ratio: float = 1.0, normalize: str = "none") -> dict[str, torch.Tensor]:
    """One ranking across all layers, with optional per-layer ratio bounds and normalisation."""
    norm = NORMALIZERS[normalize]
    flat = {n: norm(s.reshape(-1).float().cpu()) for n, s in scores.items()}
    if min_ratio == 0.0 and max_ratio == 1.0:
        keep = _unbounded_global_masks(flat, sparsity)
        return {n: keep[n].reshape(s.shape).to(s.device) for n, s in scores.items()}
    order = {n: torch.argsort(f, stable=True) for n, f in flat.items()}
    counts = global_counts({n: f.numel() for n, f in flat.items()},
                           {n: flat[n][order[n]] for n in flat}, sparsity, min_ratio, max_ratio)
    masks = {}
    for n, s in scores.items():
        keep = torch.ones(s.numel(), dtype=torch.bool)
        keep[order[n][:counts[n]]] = False
        masks[n] = keep.reshape(s.shape).to(s.device)
    return masks


def nm_masks(scores: dict[str, torch.Tensor], n: int, m: int, targets: list[Target]) -> dict[str, torch.Tensor]:
    """N:M masks: in each row, keep the `n` best of every `m` consecutive inputs."""
    return {t.name: from_weight_rows(nm_mask(weight_rows(scores[t.name], t), n, m, t.name), scores[t.name], t)
            for t in targets}
