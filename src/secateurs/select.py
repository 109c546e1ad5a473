"""Which parameters get pruned: selection by layer type, name pattern and ignore list."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import InvalidArgument

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# Layer types pruned when the user names none. Embeddings are opt-in.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, *_CONV, *_CONV_T, nn.MultiheadAttention, nn.RNNBase,
)
TYPE_NAMES: dict[str, type[nn.Module]] = {
    "linear": nn.Linear, "conv": nn.modules.conv._ConvNd, "conv1d": nn.Conv1d,
    "conv2d": nn.Conv2d, "conv3d": nn.Conv3d, "embedding": nn.Embedding,
    "attention": nn.MultiheadAttention, "rnn": nn.RNNBase, "lstm": nn.LSTM, "gru": nn.GRU,
}


@dataclass(frozen=True)
class Target:
    """One prunable weight tensor and how its dimensions map to inputs and outputs."""

    name: str            # qualified parameter name, e.g. "features.0.weight"
    module_name: str
    module: nn.Module
    param_name: str
    out_dim: int         # dimension indexing output channels / neurons
    in_dim: int          # dimension indexing input channels / features

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def kind(self) -> str:
        return type(self.module).__name__


def _weight_params(module: nn.Module) -> list[tuple[str, int, int]]:
    """(param name, out dim, in dim) of the weights of `module` that can be pruned."""
    if isinstance(module, _CONV_T):
        return [("weight", 1, 0)]
    if isinstance(module, (nn.Linear, *_CONV)):
        return [("weight", 0, 1)]
    if isinstance(module, nn.Embedding):
        return [("weight", 1, 0)]
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [(n, 0, 1) for n in names if getattr(module, n, None) is not None]
    if isinstance(module, nn.RNNBase):
        return [(n, 0, 1) for n, _ in module.named_parameters(recurse=False)
                if n.startswith("weight_")]
    return []


def resolve_types(types: Iterable[type[nn.Module] | str] | None) -> tuple[type[nn.Module], ...]:
    """Turn user-given layer types (classes or names like "linear") into classes."""
    if types is None:
        return DEFAULT_TYPES
    resolved = []
    for t in types:
        if isinstance(t, str):
            if t.lower() not in TYPE_NAMES:
                raise InvalidArgument(
                    f"unknown layer type {t!r}; expected one of {sorted(TYPE_NAMES)}")
            resolved.append(TYPE_NAMES[t.lower()])
        elif isinstance(t, type) and issubclass(t, nn.Module):
            resolved.append(t)
        else:
            raise InvalidArgument(f"types must be nn.Module classes or names, got {t!r}")
    return tuple(resolved)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_targets(
    model: nn.Module,
    *,
    types: Iterable[type[nn.Module] | str] | None = None,
    include: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    prune_last: bool = False,
) -> list[Target]:
    """The weights to prune, in module order.

    `include` and `ignore` are glob patterns over module names ("features.*") or
    parameter names ("encoder.*.weight"). The last Linear/conv layer (the classifier
    head) is left alone unless `prune_last` is true or it is named in `include`.
    """
    if isinstance(include, str) or isinstance(ignore, str):
        raise InvalidArgument("include and ignore take a list of glob patterns, not a string")
    classes = resolve_types(types)
    seen: set[int] = set()
    targets: list[Target] = []
    for module_name, module in model.named_modules():
        if not isinstance(module, classes):
            continue
        for param_name, out_dim, in_dim in _weight_params(module):
            param = getattr(module, param_name)
            full = f"{module_name}.{param_name}" if module_name else param_name
            if id(param) in seen or not param.is_floating_point():
                continue
            if include is not None and not (_matches(module_name, include) or _matches(full, include)):
                continue
            if _matches(module_name, ignore) or _matches(full, ignore):
                continue
            seen.add(id(param))
            targets.append(Target(full, module_name, module, param_name, out_dim, in_dim))
    if not prune_last:
        targets = _drop_head(model, targets, include)
    return targets


def _drop_head(model: nn.Module, targets: list[Target], include: Sequence[str] | None) -> list[Target]:
    """Leave out the last Linear/conv of the model unless the user named it."""
    heads = [m for _, m in model.named_modules() if isinstance(m, (nn.Linear, *_CONV, *_CONV_T))]
    if not heads:
        return targets
    head = heads[-1]
    kept = []
    for t in targets:
        named = include is not None and (_matches(t.module_name, include) or _matches(t.name, include))
        if t.module is head and not named:
            continue
        kept.append(t)
    return kept


def weight_rows(t: torch.Tensor, target: Target) -> torch.Tensor:
    """View of a weight (or a same-shaped score) as rows whose last axis runs over inputs.

    Each row is one output channel at one kernel position; N:M groups and Wanda's
    per-row comparison run along the last axis.
    """
    dims = [d for d in range(t.dim()) if d not in (target.out_dim, target.in_dim)]
    perm = [target.out_dim, *dims, target.in_dim]
    return t.permute(perm).reshape(-1, t.shape[target.in_dim])


def from_weight_rows(rows: torch.Tensor, like: torch.Tensor, target: Target) -> torch.Tensor:
    """Inverse of `weight_rows`: back to the weight's own shape."""
    dims = [d for d in range(like.dim()) if d not in (target.out_dim, target.in_dim)]
    perm = [target.out_dim, *dims, target.in_dim]
    shaped = rows.reshape([like.shape[d] for d in perm])
    inverse = [perm.index(d) for d in range(like.dim())]
    return shaped.permute(inverse).contiguous()
