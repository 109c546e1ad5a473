"""prune() for Keras models: select kernels, score, allocate exact counts, mask. numpy throughout.

The counting rules are those of `secateurs.allocate`: a layer of n weights at ratio s
loses round(s * n), chosen by a stable sort so ties break the same way every run and on
every backend; global ranking honours per-layer bounds; N:M keeps the N best of every M
consecutive inputs.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from ..allocate import NORMALIZERS, SCOPES
from ..api import LayerPlan, Plan, check_ratio, resolve_sparsity
from ..errors import IncompatibleLayer, InvalidArgument
from ..sparsity import parse_pattern
from ._backend import Calibration
from .criteria import canonical, score
from .masks import mask_of, refresh_training, set_mask, sync_for_edit
from .targets import KerasTarget, from_rows, rows, select_targets


def _normalized(values: np.ndarray, how: str) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if how == "none" or finite.size == 0:
        return values
    scale = {"mean": np.abs(finite).mean(), "max": np.abs(finite).max(), "l2": np.linalg.norm(finite)}[how]
    return values / max(float(scale), 1e-12)


def _lowest(scores: np.ndarray, count: int) -> np.ndarray:
    keep = np.ones(scores.size, dtype=bool)
    if count > 0:
        keep[np.argsort(scores.reshape(-1), kind="stable")[:count]] = False
    return keep.reshape(scores.shape)


def layer_masks(scores: dict[str, np.ndarray], sparsity: float) -> dict[str, np.ndarray]:
    return {n: _lowest(s, round(sparsity * s.size)) for n, s in scores.items()}


def row_masks(scores: dict[str, np.ndarray], sparsity: float, targets: list[KerasTarget]) -> dict[str, np.ndarray]:
    masks = {}
    for t in targets:
        r = rows(scores[t.name], t)
        count = round(sparsity * r.shape[1])
        keep = np.ones(r.shape, dtype=bool)
        if count > 0:
            np.put_along_axis(keep, np.argsort(r, axis=1, kind="stable")[:, :count], False, axis=1)
        masks[t.name] = from_rows(keep, t)
    return masks


def global_masks(scores: dict[str, np.ndarray], sparsity: float, min_ratio: float, max_ratio: float,
                 normalize: str) -> dict[str, np.ndarray]:
    """One ranking across layers; each layer loses at least min_ratio and at most max_ratio of itself."""
    flat = {n: _normalized(s.reshape(-1).astype(np.float64), normalize) for n, s in scores.items()}
    sizes = {n: f.size for n, f in flat.items()}
    total = sum(sizes.values())
    budget = round(sparsity * total)
    low = {n: math.ceil(min_ratio * size - 1e-9) for n, size in sizes.items()}
    high = {n: math.floor(max_ratio * size + 1e-9) for n, size in sizes.items()}
    if sum(low.values()) > budget or sum(high.values()) < budget:
        reachable = (sum(low.values()) / total, sum(high.values()) / total)
        raise InvalidArgument(
            f"sparsity {sparsity} cannot be met with min_ratio={min_ratio} and max_ratio={max_ratio}: "
            f"these bounds allow {reachable[0]:.4f} to {reachable[1]:.4f}")
    names = list(flat)
    order = {n: np.argsort(flat[n], kind="stable") for n in names}
    values = np.concatenate([flat[n][order[n]][low[n]:high[n]] for n in names])
    owners = np.concatenate([np.full(high[n] - low[n], i) for i, n in enumerate(names)])
    chosen = owners[np.argsort(values, kind="stable")[:budget - sum(low.values())]]
    extra = np.bincount(chosen, minlength=len(names))
    masks = {}
    for i, n in enumerate(names):
        keep = np.ones(sizes[n], dtype=bool)
        keep[order[n][:low[n] + int(extra[i])]] = False
        masks[n] = keep.reshape(scores[n].shape)
    return masks


def nm_masks(scores: dict[str, np.ndarray], n: int, m: int, targets: list[KerasTarget]) -> dict[str, np.ndarray]:
    """Keep the `n` highest scores in every `m` consecutive inputs of each row (ties: the earlier input)."""
    masks = {}
    for t in targets:
        blocks = rows(scores[t.name], t).reshape(-1, m)
        keep = np.zeros(blocks.shape, dtype=bool)
        np.put_along_axis(keep, np.argsort(-blocks, axis=1, kind="stable")[:, :n], True, axis=1)
        masks[t.name] = from_rows(keep.reshape(-1, t.in_width), t)
    return masks


def _check_widths(targets: list[KerasTarget], nm: tuple[int, int], skip: bool) -> list[KerasTarget]:
    fitting = [t for t in targets if t.in_width % nm[1] == 0]
    if len(fitting) < len(targets) and not skip:
        bad = [f"{t.name} (width {t.in_width})" for t in targets if t not in fitting]
        raise IncompatibleLayer(
            f"pattern {nm[0]}:{nm[1]} needs input widths divisible by {nm[1]}; these are not: {', '.join(bad)}; "
            f"leave them out with ignore=[...] (CLI: --ignore) or skip_incompatible=True")
    return fitting


def prune(
    model: Any,
    method: str = "magnitude",
    sparsity: float | None = None,
    *,
    pattern: str | tuple[int, int] | None = None,
    scope: str = "layer",
    data: Any = None,
    loss_fn: Any = None,
    batch_size: int = 32,
    max_batches: int | None = None,
    types: Iterable[type | str] | None = None,
    include: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    prune_last: bool = False,
    min_ratio: float = 0.0,
    max_ratio: float = 1.0,
    normalize: str = "none",
    skip_incompatible: bool = False,
    seed: int = 0,
) -> Plan:
    """Prune a Keras model's kernels in place with masks and return the `Plan` that records it.

    The options mean what they mean in `secateurs.prune`: `sparsity` is the fraction of
    the selected weights set to zero, per layer (`scope="layer"`), per output row
    (`"row"`) or in one ranking (`"global"`, bounded by `min_ratio` / `max_ratio` per
    layer, scores divided by a per-layer `normalize` statistic); `pattern="2:4"` keeps 2
    of every 4 consecutive inputs instead. `data` is `(x, y)` arrays, `x` alone, or a
    list of batches; `loss_fn(y_true, y_pred)` is a Keras loss (default: the compiled
    one). Masks are kernel constraints, so `model.fit` keeps the zeros; masks only grow.
    """
    name = canonical(method)
    if name == "bn_scale":
        raise InvalidArgument("method 'bn_scale' ranks channels by their norm scale, not single weights; "
                              "use prune_structured (CLI: prune --structured)")
    sparsity, nm = resolve_sparsity(sparsity, pattern)
    if scope not in SCOPES:
        raise InvalidArgument(f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")
    min_ratio = check_ratio("min_ratio", min_ratio, upper_inclusive=True)
    max_ratio = check_ratio("max_ratio", max_ratio, upper_inclusive=True)
    if normalize not in NORMALIZERS:
        raise InvalidArgument(f"unknown normalize {normalize!r}; expected one of {', '.join(NORMALIZERS)}")
    if min_ratio > max_ratio:
        raise InvalidArgument(f"min_ratio {min_ratio} is above max_ratio {max_ratio}")
    targets = select_targets(model, types=types, include=include, ignore=ignore, prune_last=prune_last)
    if nm is not None:
        targets = _check_widths(targets, nm, skip_incompatible)
    if not targets:
        raise InvalidArgument("no layer matches the selection (types / include / ignore); nothing to prune")
    sync_for_edit(model)
    scores = score(model, name, targets, Calibration(data, loss_fn, max_batches, batch_size), seed=seed)
    for t in targets:   # weights pruned before rank lowest, so masks only grow
        existing = mask_of(t.variable)
        scores[t.name] = scores[t.name].astype(np.float64)
        if existing is not None:
            scores[t.name] = np.where(existing.mask, scores[t.name], -np.inf)
    if nm is not None:
        masks = nm_masks(scores, *nm, targets)
    elif scope == "global":
        masks = global_masks(scores, sparsity, min_ratio, max_ratio, normalize)
    elif scope == "row":
        masks = row_masks(scores, sparsity, targets)
    else:
        masks = layer_masks(scores, sparsity)
    plan = Plan(name, sparsity, f"{nm[0]}:{nm[1]}" if nm else None, scope)
    for t in targets:
        kept = set_mask(t.variable, masks[t.name]).mask
        plan.layers.append(LayerPlan(t.name, t.kind, list(t.shape), t.numel, int((~kept).sum())))
    refresh_training(model)
    return plan


__all__ = ["prune", "parse_pattern"]
