"""Record a model's aten-level op graph from one forward pass, without real compute.

The model runs once under FakeTensorMode (shapes only, no data, no large allocations)
while a TorchDispatchMode above it records every aten op: which tensors went in, which
came out, and which module was running. Parameters and buffers are fake copies, so the
graph knows exactly where each one is used, views and transposes included. Models
whose Python control flow needs real values fall back to a real forward pass.

Each op output is a new tensor node, even for in-place ops, so a node is one version of
a tensor. Whatever the model returns (tensors, tuples, dicts, Hugging Face outputs) is
flattened with torch's pytree and marked as graph outputs.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils import _pytree as pytree

from ..errors import InvalidArgument


@dataclass
class TensorNode:
    """One version of one tensor seen during the forward pass."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str                      # "input", "parameter", "buffer", "constant" or "activation"
    name: str | None = None        # parameter / buffer name, or input path
    producer: int | None = None    # index of the op that produced it


@dataclass
class OpNode:
    """One aten op call: its overload, arguments (tensors as node indices) and outputs."""

    index: int
    target: Any                    # torch._ops.OpOverload
    args: tuple
    kwargs: dict
    inputs: list[int]              # tensor nodes read, in argument order
    outputs: list[int]             # tensor nodes written
    module: str                    # qualified name of the innermost running module

    @property
    def name(self) -> str:
        return str(self.target)


@dataclass(frozen=True)
class ModuleCall:
    """The target of an op recorded for a whole module call, e.g. "module.rnn"."""

    kind: str

    def __str__(self) -> str:
        return f"module.{self.kind}"


@dataclass(frozen=True)
class Ref:
    """A tensor argument of an op, as the index of its tensor node."""

    node: int


@dataclass
class Graph:
    tensors: list[TensorNode] = field(default_factory=list)
    ops: list[OpNode] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    parameters: dict[str, int] = field(default_factory=dict)   # name -> tensor node
    fake: bool = True

    def consumers(self) -> dict[int, list[int]]:
        """Tensor node -> ops that read it."""
        readers: dict[int, list[int]] = {}
        for op in self.ops:
            for i in op.inputs:
                readers.setdefault(i, []).append(op.index)
        return readers

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.name] = counts.get(op.name, 0) + 1
        return counts


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: Graph, module_stack: list[str]):
        super().__init__()
        self.graph = graph
        self.module_stack = module_stack
        self.node_of: dict[int, int] = {}       # id(tensor object) -> latest tensor node
        self.alive: list[torch.Tensor] = []     # keeps ids from being reused
        self.inside_module_op = 0

    def register(self, tensor: torch.Tensor, kind: str, name: str | None = None, producer: int | None = None) -> int:
        node = TensorNode(len(self.graph.tensors), tuple(tensor.shape), tensor.dtype, kind, name, producer)
        self.graph.tensors.append(node)
        self.node_of[id(tensor)] = node.index
        self.alive.append(tensor)
        return node.index

    def _ref(self, value: Any, inputs: list[int]) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        node = self.node_of.get(id(value))
        if node is None:  # a tensor made outside any recorded op, e.g. a Python constant
            node = self.register(value, "constant")
        inputs.append(node)
        return Ref(node)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside_module_op:  # the module is recorded as one op around its call
            return func(*args, **kwargs)
        inputs: list[int] = []
        ref_args = pytree.tree_map(lambda v: self._ref(v, inputs), args)
        ref_kwargs = pytree.tree_map(lambda v: self._ref(v, inputs), kwargs)
        result = func(*args, **kwargs)
        op = OpNode(len(self.graph.ops), func, ref_args, ref_kwargs, inputs, [],
                    self.module_stack[-1] if self.module_stack else "")
        self.graph.ops.append(op)
        for value in pytree.tree_leaves(result):
            if isinstance(value, torch.Tensor):
                op.outputs.append(self.register(value, "activation", producer=op.index))
        return result


@contextlib.contextmanager
def _module_stack(model: nn.Module, stack: list[str]) -> Iterator[None]:
    def enter(name: str):
        def hook(module, args):
            stack.append(name)
        return hook

    def leave(module, args, output):
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _rnn_config(rnn: nn.RNNBase) -> dict[str, Any]:
    """What the "rnn" rule needs to know of an nn.RNN / LSTM / GRU."""
    return {"mode": rnn.mode, "num_layers": rnn.num_layers, "bidirectional": rnn.bidirectional,
            "batch_first": rnn.batch_first, "hidden_size": rnn.hidden_size, "proj_size": rnn.proj_size,
            "bias": rnn.bias}


# Modules recorded as one op (kind, config), not as the aten ops they run: their fused
# kernels (mkldnn_rnn_layer, per-gate splits) say nothing a rule could follow, the module does.
MODULE_OPS: dict[type, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    nn.RNNBase: ("rnn", _rnn_config),
}


def _module_op(module: nn.Module) -> tuple[str, Callable[[Any], dict[str, Any]]] | None:
    for cls in type(module).__mro__:
        if cls in MODULE_OPS:
            return MODULE_OPS[cls]
    return None


def _opaque_ref(recorder: _Recorder, value: Any, inputs: list[int]) -> Any:
    """A module argument as a Ref (tuples of them kept), or, for anything else holding
    tensors (a PackedSequence), its type name: its tensors are read but not described."""
    if isinstance(value, torch.Tensor) or value is None:
        return recorder._ref(value, inputs)
    if type(value) in (tuple, list):
        return tuple(_opaque_ref(recorder, v, inputs) for v in value)
    leaves = pytree.tree_leaves(value)
    for leaf in leaves:
        recorder._ref(leaf, inputs)
    return type(value).__name__ if any(isinstance(v, torch.Tensor) for v in leaves) else value


@contextlib.contextmanager
def _module_ops(model: nn.Module, recorder: _Recorder) -> Iterator[None]:
    """Record each MODULE_OPS module call as one op reading its inputs and parameters.

    The op's args are the call's arguments (tensors as Refs); its kwargs hold
    "parameters" (local name -> Ref to the parameter's node) and "config".
    """
    pending: list[tuple[list[int], tuple, dict]] = []

    def enter(name: str, config: Callable[[Any], dict[str, Any]]):
        def hook(module, args, kwargs):
            inputs: list[int] = []
            ref_args = tuple(_opaque_ref(recorder, v, inputs) for v in (*args, *kwargs.values()))
            parameters = {}
            for local, _ in module.named_parameters(recurse=False):
                node = recorder.graph.parameters.get(f"{name}.{local}" if name else local)
                if node is not None:
                    parameters[local] = Ref(node)
                    inputs.append(node)
            pending.append((inputs, ref_args, {"parameters": parameters, "config": config(module)}))
            recorder.inside_module_op += 1
        return hook

    def leave(name: str, kind: str):
        def hook(module, args, kwargs, output):
            recorder.inside_module_op -= 1
            inputs, ref_args, ref_kwargs = pending.pop()
            op = OpNode(len(recorder.graph.ops), ModuleCall(kind), ref_args, ref_kwargs, inputs, [], name)
            recorder.graph.ops.append(op)
            for value in pytree.tree_leaves(output):
                if isinstance(value, torch.Tensor):
                    op.outputs.append(recorder.register(value, "activation", producer=op.index))
        return hook

    handles = []
    for name, module in model.named_modules():
        entry = _module_op(module)
        if entry is not None:
            kind, config = entry
            handles.append(module.register_forward_pre_hook(enter(name, config), with_kwargs=True))
            handles.append(module.register_forward_hook(leave(name, kind), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _split_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    if getattr(getattr(model, "config", None), "use_cache", False) and "use_cache" not in kwargs \
            and "use_cache" in inspect.signature(model.forward).parameters:
        # a Hugging Face KV cache is an output whose widths rightly change with the heads
        kwargs["use_cache"] = False
    return args, kwargs


def fake_on_cpu(mode: FakeTensorMode, tensor: torch.Tensor) -> torch.Tensor:
    """A fake of `tensor`'s shape, strides and dtype on the CPU, wherever the tensor lives.

    The graph is then the same for a model on a GPU, another accelerator or the meta device
    as for its CPU twin: device-specific kernels (cuDNN's batch norm, fused attention
    variants) never appear, and nothing is allocated on the device.
    """
    if tensor.layout != torch.strided or tensor.is_quantized:
        return mode.from_tensor(tensor)
    with mode:
        return torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=tensor.dtype, device="cpu")


def _run(model: nn.Module, args: tuple, kwargs: dict, fake: bool) -> Graph:
    graph = Graph(fake=fake)
    stack: list[str] = []
    mode = FakeTensorMode(allow_non_fake_inputs=False) if fake else contextlib.nullcontext()
    convert = (lambda t: fake_on_cpu(mode, t)) if fake else (lambda t: t)
    recorder = _Recorder(graph, stack)
    state = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        state[name] = convert(p)
    for name, b in model.named_buffers(remove_duplicate=False):
        state[name] = convert(b)
    seen: dict[int, int] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        kind = "parameter" if isinstance(p, nn.Parameter) else "buffer"
        if id(p) in seen:  # tied: both names point at one node
            recorder.node_of[id(state[name])] = seen[id(p)]
            if kind == "parameter":
                graph.parameters[name] = seen[id(p)]
            continue
        seen[id(p)] = recorder.register(state[name], kind, name)
        if kind == "parameter":
            graph.parameters[name] = seen[id(p)]
    flat, spec = pytree.tree_flatten((args, kwargs))
    flat = [convert(v) if isinstance(v, torch.Tensor) else v for v in flat]
    for i, value in enumerate(flat):
        if isinstance(value, torch.Tensor):
            recorder.register(value, "input", f"input[{i}]")
    args, kwargs = pytree.tree_unflatten(flat, spec)
    with mode, _module_stack(model, stack), _module_ops(model, recorder), recorder, torch.no_grad():
        output = torch.func.functional_call(model, state, args, kwargs, tie_weights=False, strict=False)
    for value in _leaves(output):
        if isinstance(value, torch.Tensor) and id(value) in recorder.node_of:
            graph.outputs.append(recorder.node_of[id(value)])
    return graph


def _leaves(output: Any) -> list[Any]:
    if hasattr(output, "to_tuple") and not isinstance(output, torch.Tensor):
        output = output.to_tuple()  # Hugging Face ModelOutput
    return pytree.tree_leaves(output)


def trace(model: nn.Module, example_inputs: Any) -> Graph:
    """The op graph of `model` on `example_inputs` (a tensor, a tuple of them, or a dict of keyword inputs)."""
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"trace needs an nn.Module, got {type(model).__name__}")
    args, kwargs = _split_inputs(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        try:
            return _run(model, args, kwargs, fake=True)
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            # data-dependent Python control flow, or an op without a fake kernel
            return _run(model, args, kwargs, fake=False)
    finally:
        model.train(was_training)
