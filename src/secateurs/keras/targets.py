"""Which Keras kernels get pruned, and how their axes map to inputs and outputs.

Keras lays kernels out inputs-first: Dense (in, out), ConvND (*k, in, out), depthwise
(*k, in, multiplier), Embedding (vocab, dim), attention projections (d_model, heads,
head_dim) and (heads, head_dim, d_model). A `KerasTarget` names the output and input
axes of one kernel, so row-wise ranking and N:M groups (M consecutive inputs, the
input channels at each kernel position) work on any of them.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import InvalidArgument
from ._backend import keras

L = keras.layers
_CONV = (L.Conv1D, L.Conv2D, L.Conv3D)
_CONV_T = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
_ATTENTION = (L.MultiHeadAttention, L.GroupQueryAttention)
ALL_CONV = _CONV + _CONV_T + _DEPTHWISE + _SEPARABLE

# Layer types pruned when none are named; embeddings are opt-in (as on the PyTorch side).
DEFAULT_TYPES: tuple[type, ...] = (L.Dense,) + ALL_CONV + _ATTENTION
# The names `types=` takes: the PyTorch side's names where they mean the same, and Keras' own.
TYPE_NAMES: dict[str, tuple[type, ...]] = {
    "dense": (L.Dense,), "linear": (L.Dense,), "conv": ALL_CONV, "conv1d": (L.Conv1D,), "conv2d": (L.Conv2D,),
    "conv3d": (L.Conv3D,), "conv_transpose": _CONV_T, "depthwise": _DEPTHWISE, "separable": _SEPARABLE,
    "embedding": (L.Embedding,), "attention": _ATTENTION,
}
# The classifier head left alone by default: the last layer of these kinds.
HEAD_TYPES = (L.Dense,) + ALL_CONV


@dataclass(frozen=True, eq=False)
class KerasTarget:
    """One prunable kernel: its variable, the layer that owns it, and its output / input axes."""

    name: str                   # the variable's path, e.g. "dense_1/kernel", "mha/query/kernel"
    layer: Any                  # the top-level layer the user sees (the attention layer, not its EinsumDense)
    owner: Any                  # the layer that holds the variable and runs it (the EinsumDense inside attention)
    variable: Any
    out_axes: tuple[int, ...]
    in_axes: tuple[int, ...]

    @property
    def kind(self) -> str:
        return type(self.layer).__name__

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.variable.shape)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def in_width(self) -> int:
        return int(np.prod([self.shape[a] for a in self.in_axes]))


def own_variable(layer: Any, name: str) -> Any:
    """The variable `name` ("kernel", "bias", ...) created by `layer` itself, or None."""
    for v in list(layer._trainable_variables) + list(layer._non_trainable_variables):
        if v.name == name:
            return v
    return None


def _attention_parts(layer: Any) -> list[tuple[str, Any]]:
    return [(role, getattr(layer, attr, None)) for role, attr in
            (("query", "_query_dense"), ("key", "_key_dense"), ("value", "_value_dense"), ("output", "_output_dense"))]


Spec = tuple[Any, Any, tuple[int, ...], tuple[int, ...]]


def kernel_specs(layer: Any) -> list[Spec]:
    """(variable, owning layer, out axes, in axes) of each prunable kernel of `layer` (none for others)."""
    if not layer.built:
        return []
    if isinstance(layer, L.Dense):
        return [(own_variable(layer, "kernel"), layer, (1,), (0,))]
    if isinstance(layer, _CONV):
        k = own_variable(layer, "kernel")
        rank = len(k.shape)
        return [(k, layer, (rank - 1,), (rank - 2,))]
    if isinstance(layer, _CONV_T):
        k = own_variable(layer, "kernel")
        rank = len(k.shape)
        return [(k, layer, (rank - 2,), (rank - 1,))]
    if isinstance(layer, _DEPTHWISE):
        k = own_variable(layer, "kernel")
        rank = len(k.shape)
        return [(k, layer, (rank - 2, rank - 1), tuple(range(rank - 2)))]
    if isinstance(layer, _SEPARABLE):
        dw, pw = own_variable(layer, "depthwise_kernel"), own_variable(layer, "pointwise_kernel")
        rank = len(dw.shape)
        return [(dw, layer, (rank - 2, rank - 1), tuple(range(rank - 2))), (pw, layer, (rank - 1,), (rank - 2,))]
    if isinstance(layer, L.Embedding):
        return [(own_variable(layer, "embeddings"), layer, (1,), (0,))]
    if isinstance(layer, _ATTENTION):
        specs = []
        for role, dense in _attention_parts(layer):
            kernel = own_variable(dense, "kernel") if dense is not None and dense.built else None
            if kernel is None or len(kernel.shape) != 3:
                continue
            specs.append((kernel, dense, (2,), (0, 1)) if role == "output" else (kernel, dense, (1, 2), (0,)))
        return specs
    return []


def resolve_types(types: Iterable[type | str] | None) -> tuple[type, ...]:
    if types is None:
        return DEFAULT_TYPES
    if isinstance(types, str):
        raise InvalidArgument("types takes a list of layer types, not a string")
    resolved: list[type] = []
    for t in types:
        if isinstance(t, str):
            if t.lower() not in TYPE_NAMES:
                raise InvalidArgument(f"unknown layer type {t!r}; expected one of {', '.join(sorted(TYPE_NAMES))}")
            resolved.extend(TYPE_NAMES[t.lower()])
        elif isinstance(t, type) and issubclass(t, L.Layer):
            resolved.append(t)
        else:
            raise InvalidArgument(f"types must be Keras layer classes or names, got {t!r}")
    return tuple(resolved)


def _matches(names: Sequence[str], patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def all_layers(model: Any) -> list[Any]:
    """Every layer inside `model` (nested models and subclassed models included), each once."""
    seen, out = set(), []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


def select_targets(model: Any, *, types: Iterable[type | str] | None = None, include: Sequence[str] | None = None,
                   ignore: Sequence[str] = (), prune_last: bool = False) -> list[KerasTarget]:
    """The kernels to prune, in layer order.

    `include` / `ignore` are glob patterns over layer names ("dense_*") or variable paths
    ("conv2d/kernel", "*/query/*"). The last Dense / conv layer (the classifier head) is
    left alone unless `prune_last` or `include` names it.
    """
    if isinstance(include, str) or isinstance(ignore, str):
        raise InvalidArgument("include and ignore take a list of glob patterns, not a string")
    if not getattr(model, "built", False):
        raise InvalidArgument("the Keras model is not built: call it on an input, or start it with keras.Input(...)")
    classes = resolve_types(types)
    layers = all_layers(model)
    heads = [layer for layer in layers if isinstance(layer, HEAD_TYPES)]
    head = heads[-1] if heads else None
    seen: set[int] = set()
    targets: list[KerasTarget] = []
    for layer in layers:
        if not isinstance(layer, classes):
            continue
        for variable, owner, out_axes, in_axes in kernel_specs(layer):
            if variable is None or id(variable) in seen or "float" not in str(variable.dtype):
                continue
            names = (layer.name, variable.path)
            named = include is not None and _matches(names, include)
            if include is not None and not named:
                continue
            if _matches(names, ignore) or (layer is head and not prune_last and not named):
                continue
            seen.add(id(variable))
            targets.append(KerasTarget(variable.path, layer, owner, variable, out_axes, in_axes))
    return targets


def rows(array: np.ndarray, target: KerasTarget) -> np.ndarray:
    """`array` (a kernel or a score of its shape) as rows whose last axis runs over the inputs.

    Each row is one output unit at one kernel position (conv) or all inputs of an output
    (dense); N:M groups and row-wise ranking run along the last axis.
    """
    others = [a for a in range(array.ndim) if a not in target.out_axes and a not in target.in_axes]
    perm = [*target.out_axes, *others, *target.in_axes]
    return np.transpose(array, perm).reshape(-1, target.in_width)


def from_rows(flat: np.ndarray, target: KerasTarget) -> np.ndarray:
    """Inverse of `rows`."""
    shape = target.shape
    others = [a for a in range(len(shape)) if a not in target.out_axes and a not in target.in_axes]
    perm = [*target.out_axes, *others, *target.in_axes]
    return np.transpose(flat.reshape([shape[a] for a in perm]), np.argsort(perm))
