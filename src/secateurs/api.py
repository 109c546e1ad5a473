"""prune(): the front door. Select weights, score them, allocate, and mask."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .allocate import (
    NORMALIZERS,
    SCOPES,
    global_masks,
    layer_masks,
    nm_masks,
    row_masks,
)
from .batches import LossFn
from .criteria import Calibration, Criterion, get_criterion
from .errors import IncompatibleLayer, InvalidArgument
from .model_checks import check_model
from .plans import PlanRecord
from .select import Target, select_targets
from .sparsity import MASK_SUFFIX, parse_pattern, set_mask


@dataclass
class LayerPlan:
    """What happened to one weight tensor."""

    name: str
    kind: str
    shape: list[int]
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class Plan(PlanRecord):
    """A record of one pruning call: the request and the per-layer outcome."""

    method: str
    sparsity: float
    pattern: str | None
    scope: str
    layers: list[LayerPlan] = field(default_factory=list)

    @property
    def achieved(self) -> float:
        """Fraction of zeros over the pruned layers."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["achieved_sparsity"] = self.achieved
        for layer, record in zip(self.layers, out["layers"]):
            record["sparsity"] = layer.sparsity
        return out

    def summary(self) -> dict[str, str]:
        zeros, total = sum(layer.zeros for layer in self.layers), sum(layer.numel for layer in self.layers)
        return {"method": self.method, "asked": self.pattern or f"{self.sparsity:.1%} ({self.scope})",
                "layers": str(len(self.layers)), "zeros": f"{zeros:,} of {total:,} ({self.achieved:.1%})"}


def check_ratio(name: str, value: float, upper_inclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name} must be a number, got {value!r}")
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise InvalidArgument(f"{name} must be in {interval}, got {value}")
    return float(value)


def resolve_sparsity(sparsity: float | None, pattern: str | tuple[int, int] | None) -> tuple[float, tuple[int, int] | None]:
    """Check `sparsity` and `pattern` together; an N:M pattern fixes the sparsity at 1 - N/M."""
    nm = parse_pattern(pattern) if pattern is not None else None
    if nm is None:
        if sparsity is None:
            raise InvalidArgument("give a sparsity in [0, 1) or an N:M pattern")
        return check_ratio("sparsity", sparsity), None
    implied = 1.0 - nm[0] / nm[1]
    if sparsity is not None and abs(check_ratio("sparsity", sparsity) - implied) > 1e-9:
        raise InvalidArgument(f"pattern {nm[0]}:{nm[1]} means sparsity {implied:g}, but sparsity={sparsity} was given")
    return implied, nm


def _check_widths(targets: list[Target], nm: tuple[int, int], skip: bool) -> list[Target]:
    fitting = [t for t in targets if t.param.shape[t.in_dim] % nm[1] == 0]
    if len(fitting) < len(targets) and not skip:
        bad = [f"{t.name} (width {t.param.shape[t.in_dim]})" for t in targets if t not in fitting]
        raise IncompatibleLayer(
            f"pattern {nm[0]}:{nm[1]} needs input widths divisible by {nm[1]}; these are not: {', '.join(bad)}; "
            f"leave them out with ignore=[...] (CLI: --ignore) or skip_incompatible=True")
    return fitting


def _existing_mask(t: Target) -> torch.Tensor | None:
    return t.module._buffers.get(t.param_name + MASK_SUFFIX)


def prune(
    model: nn.Module,
    method: str | Criterion = "magnitude",
    sparsity: float | None = None,
    *,
    pattern: str | tuple[int, int] | None = None,
    scope: str = "layer",
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    types: Sequence[type[nn.Module] | str] | None = None,
    include: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    prune_last: bool = False,
    min_ratio: float = 0.0,
    max_ratio: float = 1.0,
    normalize: str = "none",
    skip_incompatible: bool = False,
    seed: int = 0,
) -> Plan:
    """Prune `model` in place with masks and return the `Plan` that records it.

    `sparsity` is the fraction of weights set to zero among the selected layers
    (0.7 leaves 30% of them). `scope` is "layer" (every layer at that ratio),
    "global" (one ranking across layers, bounded per layer by `min_ratio` and
    `max_ratio`, scores optionally divided by a per-layer `normalize` statistic:
    "mean", "max" or "l2") or "row" (every output row at that ratio). `pattern="2:4"` keeps 2
    weights in every 4 consecutive inputs instead. Data-aware methods need `data`, an
    iterable of batches, and gradient-based ones a `loss_fn(outputs, targets)`.
    Weights pruned earlier stay pruned.
    """
    check_model(model, traced=False)
    criterion = get_criterion(method, seed=seed)
    if criterion.scores_norms:
        raise InvalidArgument(f"method {criterion.name!r} ranks channels by their norm scale, not single weights; "
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
    calibration = Calibration(data, loss_fn, max_batches)
    scores = criterion(model, targets, calibration)
    for t in targets:  # weights pruned before rank lowest, so masks only grow
        existing = _existing_mask(t)
        if existing is not None:
            scores[t.name] = scores[t.name].masked_fill(~existing, float("-inf"))
    if nm is not None:
        masks = nm_masks(scores, *nm, targets)
    elif scope == "global":
        masks = global_masks(scores, sparsity, min_ratio, max_ratio, normalize)
    elif scope == "row":
        masks = row_masks(scores, sparsity, targets)
    else:
        masks = layer_masks(scores, sparsity)
    for t in targets:
        set_mask(t.module, t.param_name, masks[t.name])
    plan = Plan(criterion.name, sparsity, f"{nm[0]}:{nm[1]}" if nm else None, scope)
    plan.layers = [LayerPlan(t.name, t.kind, list(t.param.shape), t.param.numel(),
                             int((~_existing_mask(t)).sum())) for t in targets]
    return plan
