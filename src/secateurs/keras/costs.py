"""What a Keras model costs: weights, non-zeros, MACs, bytes and latency, on any backend.

MACs are counted per layer call from the kernel shapes and the positions the kernel
runs over (batch included, as for the example given): Dense, convolutions (transposed,
depthwise, separable), attention (projections plus the two attention matmuls) and
EinsumDense. Norms, activations and pooling count nothing, as on the PyTorch side.
`nonzero_macs` scales each kernel's MACs by the fraction of its weights that are not zero.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

from ..errors import InvalidArgument
from ..measure import Measurement
from ._backend import backend, capture_calls, keras, to_numpy
from .graph import bind_attention, graph_nodes
from .targets import _ATTENTION, _CONV, _CONV_T, _DEPTHWISE, _SEPARABLE, _attention_parts, all_layers, own_variable

L = keras.layers
_COUNTED = (L.Dense, L.EinsumDense, L.Embedding) + _CONV + _CONV_T + _DEPTHWISE + _SEPARABLE + _ATTENTION

ShapeOf = Callable[[Any], tuple[int, ...]]
Part = tuple[int, Any]     # (MACs, the kernel they multiply by, or None)


def _positions(shape: tuple[int, ...], channels_first: bool = False) -> int:
    """Product of every dim but the channel dim (batch included)."""
    dims = list(shape)
    del dims[1 if channels_first else -1]
    return int(np.prod(dims)) if dims else 1


def _size(variable: Any, shape_of: ShapeOf) -> int:
    return int(np.prod(shape_of(variable)))


def layer_macs(layer: Any, shape_of: ShapeOf, inputs: list[tuple[int, ...]], output: tuple[int, ...] | None,
               attention: dict[str, tuple[int, ...]] | None = None) -> list[Part]:
    """MACs of one call of `layer`, as parts per kernel; `shape_of(variable)` may give cut shapes."""
    first = lambda: getattr(layer, "data_format", "channels_last") == "channels_first"  # noqa: E731
    if isinstance(layer, L.Dense):
        k = own_variable(layer, "kernel")
        return [(_positions(inputs[0]) * _size(k, shape_of), k)]
    if isinstance(layer, _CONV + _DEPTHWISE):
        k = own_variable(layer, "kernel")
        return [(_positions(output, first()) * _size(k, shape_of), k)]
    if isinstance(layer, _CONV_T):
        k = own_variable(layer, "kernel")
        return [(_positions(inputs[0], first()) * _size(k, shape_of), k)]
    if isinstance(layer, _SEPARABLE):
        dw, pw = own_variable(layer, "depthwise_kernel"), own_variable(layer, "pointwise_kernel")
        positions = _positions(output, first())
        return [(positions * _size(dw, shape_of), dw), (positions * _size(pw, shape_of), pw)]
    if isinstance(layer, L.EinsumDense):
        k = own_variable(layer, "kernel")
        return [(_positions(inputs[0]) * _size(k, shape_of), k)]
    if isinstance(layer, _ATTENTION) and attention is not None:
        kernels = {role: own_variable(dense, "kernel") for role, dense in _attention_parts(layer)}
        if any(k is None or len(k.shape) != 3 for k in kernels.values()):
            return []
        q, key, v = attention["query"], attention["key"], attention["value"]
        batch = q[0] or 1
        target, source = _positions(q), _positions(v)
        heads, head_dim = shape_of(kernels["query"])[1:]
        value_dim = shape_of(kernels["value"])[2]
        return [(target * _size(kernels["query"], shape_of), kernels["query"]),
                (_positions(key) * _size(kernels["key"], shape_of), kernels["key"]),
                (source * _size(kernels["value"], shape_of), kernels["value"]),
                (target * (source // batch) * heads * (head_dim + value_dim), None),
                (target * _size(kernels["output"], shape_of), kernels["output"])]
    return []


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) if d is not None else 1 for d in x.shape)


def _counted_layers(model: Any) -> list[Any]:
    inside = {id(dense) for layer in all_layers(model) if isinstance(layer, _ATTENTION)
              for _, dense in _attention_parts(layer) if dense is not None}
    return [layer for layer in all_layers(model) if isinstance(layer, _COUNTED) and id(layer) not in inside]


def example_for(model: Any, example: Any = None, batch: int = 1) -> Any:
    """`example`, or a seeded random input of the model's input shape (zeros for integer inputs)."""
    if example is not None:
        return example
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise InvalidArgument("give an example input: the model's input shape is not known")
    rng = np.random.default_rng(0)
    arrays = []
    for t in inputs:
        shape = (batch,) + tuple(t.shape[1:])
        if any(d is None for d in shape):
            raise InvalidArgument(f"give an example input: the model's input shape {tuple(t.shape)} has unknown sizes")
        dtype = str(t.dtype)
        arrays.append(np.zeros(shape, dtype=dtype) if "int" in dtype else rng.standard_normal(shape).astype(dtype))
    return arrays[0] if len(arrays) == 1 else arrays


def count_macs(model: Any, example: Any) -> tuple[int, int]:
    """(MACs, non-zero MACs) of one eager forward pass on `example`, any kind of model."""
    totals = [0, 0]
    density: dict[int, float] = {}

    def dense_fraction(k: Any) -> float:
        if id(k) not in density:
            density[id(k)] = float(np.count_nonzero(to_numpy(k.value))) / max(int(np.prod(k.shape)), 1)
        return density[id(k)]

    def on_call(layer, args, kwargs, output):
        tensors = [a for a in args if hasattr(a, "shape")]
        attention = None
        if isinstance(layer, _ATTENTION):
            bound = bind_attention(layer, args, kwargs)
            attention = {r: _shape(bound[r]) for r in ("query", "key", "value")}
        out = output[0] if isinstance(output, (tuple, list)) else output
        for macs, kernel in layer_macs(layer, lambda v: tuple(v.shape), [_shape(t) for t in tensors],
                                       _shape(out), attention):
            totals[0] += macs
            totals[1] += macs if kernel is None else round(macs * dense_fraction(kernel))

    with capture_calls(_counted_layers(model), on_call):
        model(example, training=False)
    return totals[0], totals[1]


def concrete_shapes(model: Any, example: Any = None) -> dict[int, tuple[int, ...]]:
    """id(KerasTensor) -> its shape for `example` (default: batch 1 of the model's input shape)."""
    functional, nodes = graph_nodes(model)
    example = example_for(model, example)
    examples = example if isinstance(example, (list, tuple)) else [example]
    specs: dict[int, Any] = {}
    for t, x in zip(functional.inputs, examples):
        specs[id(t)] = keras.KerasTensor(tuple(x.shape), dtype=t.dtype)
    for node in nodes:
        if any(id(t) not in specs for t in node.inputs):
            continue
        args = keras.tree.map_structure(lambda a: specs.get(id(a), a) if isinstance(a, keras.KerasTensor) else a,
                                        node.args)
        kwargs = keras.tree.map_structure(lambda a: specs.get(id(a), a) if isinstance(a, keras.KerasTensor) else a,
                                          node.kwargs)
        outputs = keras.tree.flatten(node.layer.compute_output_spec(*args, **kwargs))
        for t, spec in zip(node.outputs, outputs):
            specs[id(t)] = spec
    return {k: _shape(v) for k, v in specs.items()}


def graph_macs(model: Any, nodes: list[Any], shapes: dict[int, tuple[int, ...]], shape_of: ShapeOf) -> int:
    """MACs of the graph's layer calls with kernel shapes from `shape_of` (a cut not yet made)."""
    total = 0
    for node in nodes:
        if not isinstance(node.layer, _COUNTED):
            continue
        attention = None
        if isinstance(node.layer, _ATTENTION):
            bound = bind_attention(node.layer, node.args, node.kwargs)
            attention = {r: shapes[id(bound[r])] for r in ("query", "key", "value")}
        ins = [shapes[id(t)] for t in node.inputs]
        out = shapes[id(node.outputs[0])] if node.outputs else None
        total += sum(macs for macs, _ in layer_macs(node.layer, shape_of, ins, out, attention))
    return total


def unique_weights(model: Any) -> list[Any]:
    seen, out = set(), []
    for v in model.weights:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def weight_arrays(model: Any) -> dict[str, np.ndarray]:
    return {v.path: to_numpy(v.value) for v in unique_weights(model)}


def weight_bytes(model: Any, sparse: bool) -> int:
    """Size of the weights as a safetensors file, dense or in secateurs' sparse form (values + 1-bit mask)."""
    import torch
    from safetensors.torch import save as st_save

    from ..io import _encode

    tensors = {}
    for name, array in weight_arrays(model).items():
        if array.dtype.kind == "f" and array.dtype.itemsize not in (2, 4, 8):
            array = array.astype(np.float32)
        elif array.dtype.kind == "V" or str(array.dtype) == "bfloat16":
            array = array.astype(np.float32)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
    encoded, metadata = _encode(tensors, sparse=sparse)
    return len(st_save(encoded, metadata=metadata))


def latency_ms(model: Any, example: Any, threads: int | None = None, repeats: int = 20) -> float:
    """Median milliseconds of `model.predict_on_batch(example)` after warm-up (PyTorch backend: at `threads`)."""
    restore = None
    if backend() == "torch" and threads is not None:
        import torch

        restore = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        for _ in range(3):
            model.predict_on_batch(example)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.predict_on_batch(example)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        if restore is not None:
            import torch

            torch.set_num_threads(restore)
    return float(statistics.median(times))


def measure(model: Any, example: Any = None, *, threads: int | None = 1, latency: bool = True,
            evaluate: Callable[[Any], float] | None = None) -> Measurement:
    """Weights, non-zeros, MACs, non-zero MACs, bytes and latency of a Keras model on `example`.

    `example` defaults to one random sample of the model's input shape. `params` counts
    every weight (trainable or not, as Keras' `count_params`).
    """
    example = example_for(model, example)
    arrays = weight_arrays(model)
    macs, nonzero_macs = count_macs(model, example)
    return Measurement(
        params=int(sum(a.size for a in arrays.values())),
        nonzeros=int(sum(np.count_nonzero(a) for a in arrays.values())),
        macs=int(macs), nonzero_macs=int(nonzero_macs),
        size_bytes=weight_bytes(model, sparse=True), dense_size_bytes=weight_bytes(model, sparse=False),
        latency_ms=latency_ms(model, example, threads) if latency else 0.0,
        threads=threads or 1, accuracy=evaluate(model) if evaluate else None)
