"""Coupled channels of a Keras model, read from its explicit layer graph.

Every channel of every tensor in a Sequential or Functional model (the last axis) is an
atom, and so is every position of a kernel, bias or norm axis that channels run along.
One rule per layer kind links atoms that must be removed together: Dense / conv inputs
to kernel input axes, kernel output axes to biases and outputs, BatchNorm and
activations straight through, Add / Multiply across their inputs, Concatenate by
segments, Flatten by repeating each channel over the spatial positions, attention
heads across the query / key / value / output projections. Connected components of
atoms are the units (a channel, a neuron, a head); a unit is prunable unless one of its
atoms is blocked (a model input or output, a layer without a rule), and components
touching the same kernel axes form a group. The design of `secateurs.graph`, with the
Keras graph in place of a traced aten graph.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..errors import InvalidArgument
from ._backend import keras
from .targets import _ATTENTION, _CONV, _CONV_T, _DEPTHWISE, _SEPARABLE, _attention_parts, own_variable

L = keras.layers
KerasTensor = keras.KerasTensor

# Element-wise along channels (or pooling over positions only): channel c in is channel c out.
_PASS_THROUGH = tuple(getattr(L, n) for n in (
    "Activation", "ReLU", "LeakyReLU", "ELU", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "GlobalMaxPooling3D", "UpSampling1D", "UpSampling2D", "UpSampling3D",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D", "Softmax",
) if hasattr(L, n))
_MERGE = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)
_NORMS = (L.BatchNormalization, L.LayerNormalization) + ((L.RMSNormalization,) if hasattr(L, "RMSNormalization") else ())

UNIT_KINDS = ("channel", "head")


class StructuredUnsupported(InvalidArgument):
    """The model has no explicit layer graph (a subclassed model)."""


@dataclass
class KerasGroup:
    """Channels coupled across layers; each unit is removed from every member at once."""

    index: int
    members: list[tuple[str, int]]        # (variable path, axis)
    units: list[int]                      # component ids, in order along the first member
    prunable: list[bool]
    reason: str | None
    kind: str                             # "channel" or "head"

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable_units(self) -> list[int]:
        return [u for u, ok in zip(self.units, self.prunable) if ok]


@dataclass
class GraphNode:
    layer: Any
    args: tuple
    kwargs: dict
    inputs: list[Any]        # the KerasTensors among the arguments, in order
    outputs: list[Any]


@dataclass
class KerasAnalysis:
    model: Any
    nodes: list[GraphNode]
    groups: list[KerasGroup]
    unit_of: dict[tuple[str, int], np.ndarray]            # (variable path, axis) -> component id per position
    component: np.ndarray                                 # atom -> component id
    tensor_atoms: dict[int, np.ndarray]                   # id(KerasTensor) -> atoms of its channel axis
    variables: dict[str, Any]                             # path -> variable, every variable of the model
    layers: dict[str, Any]                                # path -> the top-level layer that holds the variable
    unknown: list[str] = field(default_factory=list)      # layers without a rule (their channels stay)


def functional_of(model: Any) -> Any:
    """The Functional graph of a Sequential or Functional model; StructuredUnsupported for others."""
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise InvalidArgument("the Sequential model is not built: call it on an input or start it with keras.Input")
        return graph
    if hasattr(model, "_nodes_by_depth") and hasattr(model, "_operations"):
        return model
    raise StructuredUnsupported(
        f"structured pruning needs a Sequential or Functional Keras model; {type(model).__name__} is subclassed "
        "(its graph is Python code): use secateurs.keras.prune for unstructured or N:M sparsity")


def graph_nodes(model: Any) -> tuple[Any, list[GraphNode]]:
    """(the Functional graph, its layer calls in topological order, input layers left out)."""
    functional = functional_of(model)
    nodes = []
    for depth in sorted(functional._nodes_by_depth, reverse=True):
        for node in functional._nodes_by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            args, kwargs = node.arguments.args, node.arguments.kwargs
            nodes.append(GraphNode(node.operation, tuple(args), dict(kwargs), list(node.input_tensors),
                                   list(node.outputs)))
    return functional, nodes


def bind_attention(layer: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """query / value / key (key defaults to value) and the options of an attention call."""
    bound = inspect.signature(type(layer).call).bind_partial(layer, *args, **kwargs).arguments
    bound.setdefault("key", None)
    if bound["key"] is None:
        bound["key"] = bound.get("value")
    return bound


class _Builder:
    """Atoms, links between them, and blocked atoms with their reasons."""

    def __init__(self, variables: dict[str, Any]):
        self.count = 0
        self.tensors: dict[int, np.ndarray | None] = {}
        self.params: dict[tuple[str, int], np.ndarray] = {}
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.blocked: list[tuple[np.ndarray, str]] = []
        self.heads: set[tuple[str, int]] = set()
        self.variables = variables

    def _new(self, n: int) -> np.ndarray:
        atoms = np.arange(self.count, self.count + n)
        self.count += n
        return atoms

    def C(self, tensor: Any) -> np.ndarray | None:
        """Atoms of `tensor`'s channel (last) axis; None where it has none or its size is unknown."""
        key = id(tensor)
        if key not in self.tensors:
            shape = tuple(tensor.shape)
            ok = len(shape) >= 2 and shape[-1] is not None
            self.tensors[key] = self._new(int(shape[-1])) if ok else None
        return self.tensors[key]

    def P(self, variable: Any, axis: int) -> np.ndarray:
        axis = axis % len(variable.shape)
        key = (variable.path, axis)
        if key not in self.params:
            self.params[key] = self._new(int(variable.shape[axis]))
            self.variables.setdefault(variable.path, variable)
        return self.params[key]

    def link(self, a: np.ndarray | None, b: np.ndarray | None, reason: str) -> None:
        if a is None or b is None or len(a) != len(b):
            self.block(a, reason)
            self.block(b, reason)
            return
        self.edges.append((a, b))

    def chain(self, atoms: list[np.ndarray | None], reason: str) -> None:
        for a, b in zip(atoms, atoms[1:]):
            self.link(a, b, reason)

    def block(self, atoms: np.ndarray | None, reason: str) -> None:
        if atoms is not None and len(atoms):
            self.blocked.append((atoms, reason))

    def block_node(self, node: GraphNode, reason: str) -> None:
        for t in node.inputs + node.outputs:
            self.block(self.C(t), reason)


def _channels_last(layer: Any) -> bool:
    return getattr(layer, "data_format", "channels_last") != "channels_first"


def _last_axis(axis: Any, rank: int) -> bool:
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    return len(axes) == 1 and axes[0] % rank == rank - 1


def _rule_weights(b: _Builder, node: GraphNode) -> None:
    layer, name = node.layer, node.layer.name
    x, y = node.inputs[0] if node.inputs else None, node.outputs[0] if node.outputs else None
    if isinstance(layer, L.Dense):
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return b.block_node(node, f"{name}: LoRA or quantized Dense")
        k, bias = own_variable(layer, "kernel"), own_variable(layer, "bias")
        b.link(b.C(x), b.P(k, 0), f"{name}: input width")
        b.chain([b.P(k, 1)] + ([b.P(bias, 0)] if bias is not None else []) + [b.C(y)], f"{name}: output width")
        return None
    if isinstance(layer, _CONV + _CONV_T):
        if not _channels_last(layer) or getattr(layer, "groups", 1) != 1:
            return b.block_node(node, f"{name}: channels_first or grouped convolution")
        k, bias = own_variable(layer, "kernel"), own_variable(layer, "bias")
        out_axis, in_axis = (-1, -2) if isinstance(layer, _CONV) else (-2, -1)
        b.link(b.C(x), b.P(k, in_axis), f"{name}: input channels")
        b.chain([b.P(k, out_axis)] + ([b.P(bias, 0)] if bias is not None else []) + [b.C(y)], f"{name}: output channels")
        return None
    if isinstance(layer, _DEPTHWISE + _SEPARABLE):
        if not _channels_last(layer):
            return b.block_node(node, f"{name}: channels_first")
        dw = own_variable(layer, "kernel" if isinstance(layer, _DEPTHWISE) else "depthwise_kernel")
        multiplier = int(dw.shape[-1])
        cin = b.C(x)
        b.link(cin, b.P(dw, -2), f"{name}: input channels")
        if isinstance(layer, _DEPTHWISE):
            spread = [b.C(y)] + ([b.P(own_variable(layer, "bias"), 0)] if own_variable(layer, "bias") is not None else [])
        else:
            pw, bias = own_variable(layer, "pointwise_kernel"), own_variable(layer, "bias")
            spread = [b.P(pw, -2)]
            b.chain([b.P(pw, -1)] + ([b.P(bias, 0)] if bias is not None else []) + [b.C(y)], f"{name}: output channels")
        for atoms in spread:   # channel c feeds channels c * multiplier ... c * multiplier + multiplier - 1
            if atoms is None or cin is None or len(atoms) != len(cin) * multiplier:
                b.block(atoms, f"{name}: depthwise widths")
                b.block(cin, f"{name}: depthwise widths")
                continue
            for m in range(multiplier):
                b.link(cin, atoms.reshape(len(cin), multiplier)[:, m], f"{name}: depthwise channels")
        return None
    if isinstance(layer, L.Embedding):
        b.link(b.P(own_variable(layer, "embeddings"), 1), b.C(y), f"{name}: embedding width")
        return None
    if isinstance(layer, _ATTENTION):
        return _rule_attention(b, node)
    return None


def _rule_attention(b: _Builder, node: GraphNode) -> None:
    layer, name = node.layer, node.layer.name
    bound = bind_attention(layer, node.args, node.kwargs)
    parts = dict(_attention_parts(layer))
    kernels = {role: own_variable(dense, "kernel") for role, dense in parts.items()}
    biases = {role: own_variable(dense, "bias") for role, dense in parts.items()}
    if any(k is None or len(k.shape) != 3 for k in kernels.values()):
        return b.block_node(node, f"{name}: attention over several axes or a multi-dimensional output")
    y = node.outputs[0]
    for role, tensor in (("query", bound.get("query")), ("key", bound.get("key")), ("value", bound.get("value"))):
        b.link(b.C(tensor) if isinstance(tensor, KerasTensor) else None, b.P(kernels[role], 0), f"{name}: {role} width")
    b.chain([b.P(kernels["output"], 2)] + ([b.P(biases["output"], 0)] if biases["output"] is not None else [])
            + [b.C(y)], f"{name}: output width")
    if getattr(layer, "_output_shape", None) is None and isinstance(bound.get("query"), KerasTensor):
        # the output width follows the query width when no output_shape is set
        b.link(b.C(bound["query"]), b.C(y), f"{name}: output width follows the query")
    else:
        b.block(b.C(y), f"{name}: output_shape is fixed in the config")
    # heads: one unit across q/k/v/output; a GQA key/value head carries its group of query heads
    q_heads = b.P(kernels["query"], 1)
    kv_heads = b.P(kernels["key"], 1)
    group = len(q_heads) // max(len(kv_heads), 1)
    for role in ("query", "key", "value"):
        b.heads.add((kernels[role].path, 1))
        if biases[role] is not None:
            b.link(b.P(kernels[role], 1), b.P(biases[role], 0), f"{name}: {role} heads")
    b.heads.add((kernels["output"].path, 0))
    b.link(q_heads, b.P(kernels["output"], 0), f"{name}: heads")
    b.link(kv_heads, b.P(kernels["value"], 1), f"{name}: key/value heads")
    if group * len(kv_heads) != len(q_heads):
        b.block(q_heads, f"{name}: head counts")
    else:
        for g in range(group):
            b.link(q_heads.reshape(len(kv_heads), group)[:, g], kv_heads, f"{name}: query heads of a key/value head")
    if bound.get("return_attention_scores"):
        b.block(q_heads, f"{name}: returns its attention scores (heads are an axis of an output)")
    return None


def _rule(b: _Builder, node: GraphNode, unknown: list[str]) -> None:
    layer, name = node.layer, node.layer.name
    x, y = node.inputs[0] if node.inputs else None, node.outputs[0] if node.outputs else None
    if isinstance(layer, L.InputLayer):
        return
    if isinstance(layer, (L.Dense,) + _CONV + _CONV_T + _DEPTHWISE + _SEPARABLE + (L.Embedding,) + _ATTENTION):
        _rule_weights(b, node)
        return
    if isinstance(layer, _NORMS):
        if not _last_axis(layer.axis, len(x.shape)):
            return b.block_node(node, f"{name}: normalizes another axis than the channels")
        own = [v for v in list(layer._trainable_variables) + list(layer._non_trainable_variables) if len(v.shape) == 1]
        b.chain([b.C(x)] + [b.P(v, 0) for v in own] + [b.C(y)], f"{name}: channels")
        return
    if isinstance(layer, L.PReLU):
        alpha = own_variable(layer, "alpha")
        b.link(b.C(x), b.C(y), f"{name}: channels")
        if alpha is not None and alpha.shape[-1] != 1:
            b.link(b.C(x), b.P(alpha, -1), f"{name}: channels")
        return
    if isinstance(layer, _PASS_THROUGH):
        if not _channels_last(layer):
            return b.block_node(node, f"{name}: channels_first")
        if isinstance(layer, L.Softmax) and _last_axis(layer.axis, len(x.shape)):
            return b.block_node(node, f"{name}: softmax over the channels")
        b.link(b.C(x), b.C(y), f"{name}: channels")
        return
    if isinstance(layer, _MERGE):
        outs = b.C(y)
        for t in node.inputs:
            atoms = b.C(t)
            if atoms is not None and len(atoms) == 1 and outs is not None and len(outs) > 1:
                b.block(atoms, f"{name}: broadcast input")   # a (..., 1) input broadcast over the channels
                continue
            b.link(atoms, outs, f"{name}: element-wise inputs")
        return
    if isinstance(layer, L.Concatenate):
        outs = b.C(y)
        if not _last_axis(layer.axis, len(y.shape)):
            for t in node.inputs:
                b.link(b.C(t), outs, f"{name}: concatenated along another axis")
            return
        parts = [b.C(t) for t in node.inputs]
        if outs is None or any(p is None for p in parts) or sum(len(p) for p in parts) != len(outs):
            return b.block_node(node, f"{name}: concatenation widths")
        offset = 0
        for p in parts:
            b.link(p, outs[offset:offset + len(p)], f"{name}: segment")
            offset += len(p)
        return
    if isinstance(layer, L.Flatten):
        spatial = tuple(x.shape[1:-1])
        if not _channels_last(layer) or any(d is None for d in spatial) or b.C(x) is None or b.C(y) is None:
            return b.block_node(node, f"{name}: channels_first or unknown spatial size")
        positions = int(np.prod(spatial)) if spatial else 1
        b.link(np.tile(b.C(x), positions), b.C(y), f"{name}: each channel repeated over {positions} positions")
        return
    if isinstance(layer, L.Reshape):
        if x.shape[-1] is not None and x.shape[-1] == y.shape[-1] and len(x.shape) >= 2 and len(y.shape) >= 2:
            b.link(b.C(x), b.C(y), f"{name}: channels kept last")
        else:
            b.block_node(node, f"{name}: reshapes the channel axis")
        return
    unknown.append(f"{name} ({type(layer).__name__})")
    b.block_node(node, f"{name}: {type(layer).__name__} has no rule")


def analyze(model: Any) -> KerasAnalysis:
    """Groups of coupled channels and heads of a Sequential or Functional model."""
    functional, nodes = graph_nodes(model)
    variables = {v.path: v for v in model.weights}
    b = _Builder(variables)
    unknown: list[str] = []
    for node in nodes:
        _rule(b, node, unknown)
    for t in list(functional.inputs) + list(functional.outputs):
        b.block(b.C(t), "model input or output")
    total = b.count
    if b.edges:
        rows = np.concatenate([a for a, _ in b.edges])
        cols = np.concatenate([c for _, c in b.edges])
    else:
        rows = cols = np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(total, total))
    _, component = connected_components(graph, directed=False)
    reason_of: dict[int, str] = {}
    for atoms, reason in b.blocked:
        for c in np.unique(component[atoms]).tolist():
            reason_of.setdefault(c, reason)
    unit_of = {key: component[atoms] for key, atoms in b.params.items()}
    members_of: dict[int, list[tuple[str, int]]] = {}
    for key, comps in unit_of.items():
        for c in np.unique(comps).tolist():
            members_of.setdefault(c, []).append(key)
    by_members: dict[tuple, list[int]] = {}
    for c, members in members_of.items():
        by_members.setdefault(tuple(members), []).append(c)
    groups = []
    for members, comps in by_members.items():
        first = unit_of[members[0]]
        order = {c: i for i, c in reversed(list(enumerate(first.tolist())))}
        comps = sorted(comps, key=lambda c: order.get(c, len(first)))
        prunable = [c not in reason_of for c in comps]
        reasons = sorted({reason_of[c] for c in comps if c in reason_of})
        kind = "head" if any(m in b.heads for m in members) else "channel"
        groups.append(KerasGroup(len(groups), list(members), comps, prunable, reasons[0] if reasons else None, kind))
    layers = {v.path: node.layer for node in nodes for v in node.layer.weights}
    return KerasAnalysis(model, nodes, groups, unit_of, component, {k: v for k, v in b.tensors.items() if v is not None},
                         variables, layers, unknown)
