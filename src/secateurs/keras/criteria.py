"""The criteria of `secateurs.criteria`, on Keras kernels, as numpy scores (higher = keep).

Data-free: magnitude / l1, l2, random. Data-aware: activation, apoz and wanda read the
layers' inputs and outputs during an eager forward pass (any backend); gradient, taylor
and obd need gradients (TensorFlow, JAX, PyTorch). Each criterion gives one score per
weight, laid out like the kernel.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..criteria import get_criterion
from ..errors import IncompatibleLayer, InvalidArgument, MissingData
from ._backend import Calibration, capture_calls, gradient_fn, keras, require_inputs, run_eagerly, to_numpy
from .targets import _CONV, _CONV_T, _DEPTHWISE, _SEPARABLE, KerasTarget

Scores = dict[str, np.ndarray]


def canonical(method: str) -> str:
    """The criterion's own name ("magnitude" -> "l1"), or the one-line error naming the choices."""
    if not isinstance(method, str):
        raise InvalidArgument(f"method must be a criterion name for Keras models, got {type(method).__name__}")
    return get_criterion(method).name


def _weights(t: KerasTarget) -> np.ndarray:
    return to_numpy(t.variable.value).astype(np.float32)


def _broadcast(values: np.ndarray, t: KerasTarget, axes: tuple[int, ...]) -> np.ndarray:
    """`values`, laid out like the sizes of `axes` of the kernel, broadcast to the whole kernel."""
    shape = [1] * len(t.shape)
    for a in axes:
        shape[a] = t.shape[a]
    order = sorted(axes)
    arranged = np.transpose(values.reshape([t.shape[a] for a in axes]), [axes.index(a) for a in order])
    return np.broadcast_to(arranged.reshape(shape), t.shape)


# ---------------------------------------------------------------------------- gradients

def _gradient_terms(model: Any, targets: list[KerasTarget], calibration: Calibration, method: str,
                    term: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Scores:
    batches = calibration.labelled(method)
    loss = calibration.loss(model, method)
    grads_of = gradient_fn(model, [t.variable for t in targets], loss, method)
    weights = [_weights(t) for t in targets]
    totals = [np.zeros(t.shape, dtype=np.float64) for t in targets]
    for x, y in batches:
        for total, w, g in zip(totals, weights, grads_of(x, y)):
            total += term(w, g)
    return {t.name: (total / len(batches)).astype(np.float32) for t, total in zip(targets, totals)}


def _take(x: Any, i: int) -> Any:
    if isinstance(x, (list, tuple)):
        return type(x)(_take(v, i) for v in x)
    if isinstance(x, dict):
        return {k: _take(v, i) for k, v in x.items()}
    return x[i:i + 1]


def _size(x: Any) -> int:
    if isinstance(x, (list, tuple)):
        return _size(x[0])
    if isinstance(x, dict):
        return _size(next(iter(x.values())))
    return len(x)


def _obd(model: Any, targets: list[KerasTarget], calibration: Calibration) -> Scores:
    """w^2 * H_ii / 2, H_ii the empirical Fisher: mean squared per-sample gradient."""
    batches = calibration.labelled("obd")
    loss = calibration.loss(model, "obd")
    grads_of = gradient_fn(model, [t.variable for t in targets], loss, "obd")
    totals = [np.zeros(t.shape, dtype=np.float64) for t in targets]
    samples = 0
    for x, y in batches:
        for i in range(_size(x)):
            for total, g in zip(totals, grads_of(_take(x, i), _take(y, i))):
                total += np.square(g)
            samples += 1
    return {t.name: (0.5 * np.square(_weights(t)) * total / samples).astype(np.float32)
            for t, total in zip(targets, totals)}


# ---------------------------------------------------------------------------- activations

def _channels_first(layer: Any) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_first"


def _observe(model: Any, targets: list[KerasTarget], calibration: Calibration, method: str,
             statistic: Callable[[Any, Any, KerasTarget], np.ndarray]) -> dict[str, np.ndarray]:
    """Sum over calibration batches of statistic(inputs, output, target) per target, one eager pass each."""
    owners: dict[int, list[KerasTarget]] = {}
    for t in targets:
        owners.setdefault(id(t.owner), []).append(t)
    sums: dict[str, np.ndarray] = {}

    def on_call(layer, args, kwargs, output):
        for t in owners.get(id(layer), []):
            value = statistic(args[0] if args else next(iter(kwargs.values())), output, t)
            sums[t.name] = sums.get(t.name, 0) + value

    with capture_calls([t.owner for t in targets], on_call):
        run_eagerly(model, require_inputs(calibration, method))
    missing = [t.name for t in targets if t.name not in sums]
    if missing:
        raise IncompatibleLayer(f"criterion {method!r}: these layers never ran on the calibration data: {missing}")
    return sums


def _out_channels(t: KerasTarget, method: str) -> int:
    if isinstance(t.layer, _SEPARABLE) and t.variable is t.layer.depthwise_kernel:
        raise IncompatibleLayer(f"criterion {method!r} cannot see the depthwise output inside {t.layer.name} "
                                f"({t.name}); leave it out with ignore=[...] or pick a weight criterion")
    return int(np.prod([t.shape[a] for a in t.out_axes]))


def _channel_values(output: Any, t: KerasTarget, method: str) -> np.ndarray:
    """The output as (positions, channels): channels are the trailing dims (axis 1 for channels_first)."""
    out = to_numpy(output).astype(np.float32)
    channels = _out_channels(t, method)
    if _channels_first(t.owner) and isinstance(t.layer, _CONV + _CONV_T + _DEPTHWISE + _SEPARABLE):
        out = np.moveaxis(out, 1, -1)
    if channels not in (out.shape[-1], int(np.prod(out.shape[out.ndim - len(t.out_axes):]))):
        raise IncompatibleLayer(f"criterion {method!r}: the output of {t.layer.name} does not end in its channels")
    return out.reshape(-1, channels)


def _activation_scores(model: Any, targets: list[KerasTarget], calibration: Calibration, method: str) -> Scores:
    def statistic(inputs, output, t):
        values = _channel_values(output, t, method)
        stat = np.abs(values) if method == "activation" else (values > 0).astype(np.float32)
        return np.concatenate([stat.sum(0), [len(values)]])

    sums = _observe(model, targets, calibration, method, statistic)
    # activation: mean |a|; apoz: 1 - APoZ = fraction of positive values
    return {t.name: _broadcast(sums[t.name][:-1] / max(sums[t.name][-1], 1), t, t.out_axes).astype(np.float32).copy()
            for t in targets}


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    span = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def _patch_sumsq(layer: Any, x: np.ndarray) -> np.ndarray:
    """Sum of squares of every im2col column of a conv (kernel position x input channel), shape (*k, in)."""
    if _channels_first(layer):
        x = np.moveaxis(x, 1, -1)
    spatial = x.ndim - 2
    kernel = tuple(layer.kernel_size)
    strides, dilation = tuple(layer.strides), tuple(layer.dilation_rate)
    pads = [(0, 0)]
    for i in range(spatial):
        if layer.padding == "same":
            pads.append(_same_padding(x.shape[1 + i], kernel[i], strides[i], dilation[i]))
        elif layer.padding == "causal":
            pads.append(((kernel[i] - 1) * dilation[i], 0))
        else:
            pads.append((0, 0))
    x = np.pad(x, pads + [(0, 0)])
    total = np.zeros((*kernel, x.shape[-1]), dtype=np.float64)
    for start in range(0, len(x), 16):   # a chunk of samples at a time bounds the im2col memory
        chunk = x[start:start + 16]
        windows = np.lib.stride_tricks.sliding_window_view(
            chunk, [(k - 1) * d + 1 for k, d in zip(kernel, dilation)], axis=tuple(range(1, 1 + spatial)))
        # windows: (B, *out_positions_unstrided, C, *span); take the strided positions and dilated taps
        index = (slice(None),) + tuple(slice(None, None, s) for s in strides) + (slice(None),) + \
            tuple(slice(None, None, d) for d in dilation)
        taps = windows[index]
        sq = np.square(taps, dtype=np.float64).sum(axis=tuple(range(1 + spatial)))    # (C, *kernel)
        total += np.moveaxis(sq, 0, -1)
    return total


def _wanda_norms(inputs: Any, t: KerasTarget) -> np.ndarray:
    """Sum of squares of each input feature of `t`, laid out like the kernel's input side."""
    x = to_numpy(inputs).astype(np.float32)
    layer = t.layer
    if isinstance(layer, _CONV + _DEPTHWISE):
        return _patch_sumsq(layer, x)      # (*k, in) for conv; the same for depthwise (per channel)
    width = t.in_width
    if x.size % width:
        raise IncompatibleLayer(f"criterion 'wanda': the input of {layer.name} does not end in its input features")
    return np.square(x.reshape(-1, width), dtype=np.float64).sum(0)


def _wanda(model: Any, targets: list[KerasTarget], calibration: Calibration) -> Scores:
    for t in targets:
        if isinstance(t.layer, (keras.layers.Embedding,) + _CONV_T + _SEPARABLE) or (
                isinstance(t.layer, _CONV) and t.layer.groups != 1):
            raise IncompatibleLayer(f"criterion 'wanda' scores Dense, attention and ungrouped conv kernels, not "
                                    f"{t.name} ({t.kind}); leave it out with ignore=[...] or pick a weight criterion")
    sums = _observe(model, targets, calibration, "wanda", lambda inputs, output, t: _wanda_norms(inputs, t))
    scores = {}
    for t in targets:
        norms = np.sqrt(sums[t.name])
        if isinstance(t.layer, _CONV):
            # (*k, in) -> (*k, in, out): every output channel sees the same columns
            norms = np.broadcast_to(norms[..., None], t.shape)
        elif isinstance(t.layer, _DEPTHWISE):
            norms = np.broadcast_to(norms[..., None], t.shape)
        else:
            norms = _broadcast(norms, t, t.in_axes)
        scores[t.name] = (np.abs(_weights(t)) * norms).astype(np.float32)
    return scores


# ---------------------------------------------------------------------------- registry

def score(model: Any, method: str, targets: list[KerasTarget], calibration: Calibration, seed: int = 0) -> Scores:
    """Per-weight scores of every target (higher = keep) by criterion `method`."""
    name = canonical(method)
    if name == "l1":
        return {t.name: np.abs(_weights(t)) for t in targets}
    if name == "l2":
        return {t.name: np.square(_weights(t)) for t in targets}
    if name == "random":
        rng = np.random.default_rng(seed)
        return {t.name: rng.random(t.shape, dtype=np.float32) for t in targets}
    if name == "gradient":
        return _gradient_terms(model, targets, calibration, name, lambda w, g: np.abs(g))
    if name == "taylor":
        return _gradient_terms(model, targets, calibration, name, lambda w, g: np.abs(w * g))
    if name == "obd":
        return _obd(model, targets, calibration)
    if name in ("activation", "apoz"):
        return _activation_scores(model, targets, calibration, name)
    if name == "wanda":
        return _wanda(model, targets, calibration)
    if name == "bn_scale":
        raise InvalidArgument("method 'bn_scale' ranks channels by their norm scale, not single weights; "
                              "use prune_structured (CLI: prune --structured)")
    raise MissingData(f"criterion {name!r} is not available for Keras models")
