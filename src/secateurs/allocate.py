"""From scores to masks: how many weights each layer (or row) loses, and which.

One rounding rule everywhere, the unstructured path (`prune(scope=...)`) and the LLM
engine alike: a group of n weights at ratio s loses floor(s * n) of them (`pruned_count`;
docs/concepts.md says why). Within a group the lowest scores go; ties break the same way
every run on the same input (torch's selection is deterministic).
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


def pruned_count(size: int, sparsity: float) -> int:
    """How many of `size` weights a `sparsity` fraction prunes: floor(sparsity * size), the one rule."""
    return math.floor(size * sparsity + 1e-9)  # 1e-9: 0.3 * 10 must give 3, not 2


def drop_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool keep-mask dropping the `count` lowest scores along the last axis (of each row)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        # topk rather than a full sort: a third faster, and the same answer on the same input
        lowest = scores.topk(count, dim=-1, largest=False, sorted=False).indices
        keep.scatter_(-1, lowest, False)
    return keep


def row_keep(rows: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of a [rows, inputs] score matrix: every row loses the same `pruned_count`."""
    return drop_lowest(rows, pruned_count(rows.shape[-1], sparsity))


def layer_keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of a whole layer's scores: the layer loses `pruned_count` of its weights."""
    flat = scores.reshape(1, -1)
    return drop_lowest(flat, pruned_count(flat.shape[1], sparsity)).reshape(scores.shape)


KEEPS = {"row": row_keep, "layer": layer_keep}


def keep_mask(rows: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None,
              scope: str = "row", name: str = "layer") -> torch.Tensor:
    """Bool keep-mask of one [out, in] score matrix: N:M along inputs, else `sparsity` per row or layer."""
    if pattern is not None:
        return nm_mask(rows, *pattern, name=name)
    return KEEPS[scope](rows, sparsity)


def layer_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """The same ratio in every layer."""
    return {name: layer_keep(s, sparsity) for name, s in scores.items()}


def row_masks(scores: dict[str, torch.Tensor], sparsity: float, targets: list[Target]) -> dict[str, torch.Tensor]:
    """The same ratio in every output row (Wanda's comparison group)."""
    return {t.name: from_weight_rows(row_keep(weight_rows(scores[t.name], t), sparsity), scores[t.name], t)
            for t in targets}


def global_counts(sizes: dict[str, int], sorted_scores: dict[str, torch.Tensor], sparsity: float,
                  min_ratio: float, max_ratio: float) -> dict[str, int]:
    """Per-layer counts that prune the globally lowest scores within per-layer bounds.

    Each layer first loses its `min_ratio` share; the rest of the budget goes to the
    lowest remaining scores of all layers, never past a layer's `max_ratio`.
    """
    total = sum(sizes.values())
    budget = pruned_count(total, sparsity)
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
    """The globally lowest floor(s * N) scores, found by selection (O(N)) instead of sorting.

    Ties at the threshold go to the earlier layer and index, as a stable sort would.
    """
    names = list(flat)
    values = torch.cat([flat[n] for n in names])
    budget = pruned_count(values.numel(), sparsity)
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
