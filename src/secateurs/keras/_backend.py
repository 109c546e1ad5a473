"""Keras import, backend choice, and the two things that differ per backend: numpy and gradients.

Everything else in `secateurs.keras` is numpy and `keras.ops`, so it runs the same on the
TensorFlow, JAX and PyTorch backends; only `gradients` branches on the backend.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import InvalidArgument, MissingData

# Backends that give gradients (Taylor, gradient, OBD); "numpy" and "openvino" run inference only.
GRADIENT_BACKENDS = ("tensorflow", "jax", "torch")


def _keras_config_backend() -> str | None:
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    try:
        import json

        return json.loads((home / "keras.json").read_text()).get("backend")
    except (OSError, ValueError):
        return None


def default_backend() -> None:
    """Before keras is first imported: fall back to the torch backend where Keras' own choice can't run.

    Keras reads KERAS_BACKEND, else ~/.keras/keras.json (which its first import writes,
    naming TensorFlow), once, at import. secateurs always has torch installed, so where
    KERAS_BACKEND is unset and the configured backend is not installed, the torch
    backend is chosen instead of an import error.
    """
    if "keras" in sys.modules or os.environ.get("KERAS_BACKEND"):
        return
    configured = _keras_config_backend() or "tensorflow"
    if importlib.util.find_spec(configured) is None:
        os.environ["KERAS_BACKEND"] = "torch"


def import_keras():
    default_backend()
    try:
        import keras
    except ImportError as exc:  # not installed, or the configured backend is missing
        raise InvalidArgument(f"secateurs.keras needs Keras 3 and its backend ({exc}); "
                              "pip install 'secateurs[keras]'") from None
    if int(keras.__version__.split(".")[0]) < 3:
        raise InvalidArgument(f"secateurs.keras needs Keras 3, found {keras.__version__} (tf.keras / Keras 2)")
    return keras


keras = import_keras()
ops = keras.ops


def backend() -> str:
    return keras.backend.backend()


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):    # a torch tensor: no __array__ round trip
        return x.detach().cpu().numpy()
    return np.asarray(ops.convert_to_numpy(x))


def value(variable: Any) -> np.ndarray:
    return to_numpy(variable.value)


# ---------------------------------------------------------------------------- calibration data

def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_inputs(x: Any) -> bool:
    """An array, or the list / dict of arrays a model with several inputs takes."""
    if isinstance(x, (list, tuple)):
        return bool(x) and all(_is_array(v) for v in x)
    if isinstance(x, dict):
        return bool(x) and all(_is_array(v) for v in x.values())
    return _is_array(x)


def _length(x: Any) -> int:
    if isinstance(x, (list, tuple)):
        return len(x[0])
    if isinstance(x, dict):
        return len(next(iter(x.values())))
    return len(x)


def _rows(x: Any, start: int, stop: int) -> Any:
    if isinstance(x, (list, tuple)):
        return type(x)(v[start:stop] for v in x)
    if isinstance(x, dict):
        return {k: v[start:stop] for k, v in x.items()}
    return x[start:stop]


class Calibration:
    """Batches for data-aware criteria: `(x, y)` arrays, `x` alone, or an iterable of batches.

    A batch is `x` or `(x, y)`; `x` may be a list or dict for models with several inputs.
    `loss_fn(y_true, y_pred)` is a Keras loss (an object, a function or a name); without
    one the model's compiled loss is used.
    """

    def __init__(self, data: Any = None, loss_fn: Any = None, max_batches: int | None = None,
                 batch_size: int = 32):
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise InvalidArgument(f"max_batches must be a positive integer, got {max_batches!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgument(f"batch_size must be a positive integer, got {batch_size!r}")
        self.data, self.loss_fn, self.max_batches, self.batch_size = data, loss_fn, max_batches, batch_size
        self._cached: list[Any] | None = None

    def batches(self) -> list[Any]:
        if self._cached is None:
            self._cached = list(self._iterate())
        return self._cached

    def _iterate(self) -> Iterator[Any]:
        data = self.data
        if data is None:
            return
        step = self.batch_size
        if _is_array(data) or (isinstance(data, dict) and _is_inputs(data)):
            source: Iterable[Any] = (_rows(data, i, i + step) for i in range(0, _length(data), step))
        elif isinstance(data, tuple) and len(data) == 2 and _is_inputs(data[0]) and _is_array(data[1]):
            x, y = data
            if _length(x) != len(y):
                raise InvalidArgument(f"data: {_length(x)} inputs but {len(y)} targets")
            source = ((_rows(x, i, i + step), y[i:i + step]) for i in range(0, len(y), step))
        else:
            source = data
        for i, batch in enumerate(source):
            if self.max_batches is not None and i >= self.max_batches:
                break
            yield batch

    def inputs(self) -> Iterator[Any]:
        for batch in self.batches():
            yield batch[0] if isinstance(batch, tuple) else batch

    def labelled(self, method: str) -> list[tuple[Any, Any]]:
        batches = self.batches()
        if not batches:
            raise MissingData(f"criterion {method!r} needs calibration data: pass data=(x, y) or a list of (x, y) batches")
        if not all(isinstance(b, tuple) and len(b) == 2 for b in batches):
            raise MissingData(f"criterion {method!r} needs targets: pass data=(x, y), not inputs alone")
        return batches

    def loss(self, model: Any, method: str) -> Callable[[Any, Any], Any]:
        loss = self.loss_fn if self.loss_fn is not None else getattr(model, "loss", None)
        if loss is None:
            raise MissingData(f"criterion {method!r} needs a loss: pass loss_fn= (a Keras loss) or compile the model")
        if isinstance(loss, (str, dict)) or (isinstance(loss, (list, tuple))):
            if not isinstance(loss, str):
                raise InvalidArgument("a model with several losses needs loss_fn= for the gradient criteria")
            loss = keras.losses.get(loss)
        return loss


def require_inputs(calibration: Calibration, method: str) -> list[Any]:
    inputs = list(calibration.inputs())
    if not inputs:
        raise MissingData(f"criterion {method!r} needs calibration data: pass data=x, data=(x, y) or a list of batches")
    return inputs


# ---------------------------------------------------------------------------- gradients

def gradient_fn(model: Any, variables: Sequence[Any], loss_fn: Callable[[Any, Any], Any],
                method: str) -> Callable[[Any, Any], list[np.ndarray]]:
    """A function (x, y) -> dL/dw of that batch for each of `variables`, as numpy (training=False).

    Built once per criterion call: on JAX the gradient is jit-compiled (once per batch shape).
    """
    name = backend()
    if name not in GRADIENT_BACKENDS:
        raise MissingData(f"criterion {method!r} needs gradients, which the {name} backend does not give; "
                          "use a data-free criterion (magnitude, l2, random) or wanda / activation")
    if name == "torch":
        return lambda x, y: _torch_gradients(model, variables, x, y, loss_fn)
    if name == "jax":
        return _jax_gradient_fn(model, variables, loss_fn, method)
    return lambda x, y: _tf_gradients(model, variables, x, y, loss_fn)


def _torch_gradients(model, variables, x, y, loss_fn) -> list[np.ndarray]:
    import torch

    tensors = [v.value for v in variables]
    frozen = [t for t in tensors if not t.requires_grad]
    for t in frozen:
        t.requires_grad_(True)
    try:
        with torch.enable_grad():
            loss = loss_fn(y, model(x, training=False))
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    finally:
        for t in frozen:
            t.requires_grad_(False)
    return [np.zeros(tuple(v.shape), dtype=np.float32) if g is None else g.detach().float().cpu().numpy()
            for v, g in zip(variables, grads)]


def _jax_gradient_fn(model, variables, loss_fn, method) -> Callable[[Any, Any], list[np.ndarray]]:
    import jax

    trainable = list(model.trainable_variables)
    positions = []
    for v in variables:
        index = next((i for i, t in enumerate(trainable) if t is v), None)
        if index is None:
            raise InvalidArgument(f"criterion {method!r}: {v.path} is not trainable (a frozen layer), so the jax "
                                  "backend gives it no gradient; leave it out with ignore=[...]")
        positions.append(index)

    options = {"training": False} if getattr(model, "_call_has_training_arg", True) else {}

    def loss_of(values, non_trainable, x, y):
        out, _ = model.stateless_call(values, non_trainable, x, **options)
        return loss_fn(y, out)

    grad = jax.jit(jax.grad(loss_of))

    def run(x, y):
        grads = grad([v.value for v in trainable], [v.value for v in model.non_trainable_variables], x, y)
        return [np.asarray(grads[i], dtype=np.float32) for i in positions]
    return run


def _tf_gradients(model, variables, x, y, loss_fn) -> list[np.ndarray]:
    import tensorflow as tf

    tensors = [v.value for v in variables]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        loss = loss_fn(y, model(x, training=False))
    grads = tape.gradient(loss, tensors)
    return [np.zeros(tuple(v.shape), dtype=np.float32) if g is None else np.asarray(g, dtype=np.float32)
            for v, g in zip(variables, grads)]


# ---------------------------------------------------------------------------- layer calls

class capture_calls:
    """Record what chosen layers are called with while a model runs eagerly.

    `on_call(layer, args, kwargs, output)` runs after each call of each layer in
    `layers`. The layer's bound `call` is shadowed by an instance attribute for the
    duration, which works on every backend and for subclassed models alike.
    """

    def __init__(self, layers: Iterable[Any], on_call: Callable[[Any, tuple, dict, Any], None]):
        self.layers = list({id(layer): layer for layer in layers}.values())
        self.on_call = on_call

    def __enter__(self) -> "capture_calls":
        for layer in self.layers:
            object.__setattr__(layer, "call", self._wrap(layer, layer.call))
        return self

    def _wrap(self, layer: Any, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            self.on_call(layer, args, kwargs, output)
            return output
        return wrapped

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            if "call" in layer.__dict__:
                object.__delattr__(layer, "call")


def run_eagerly(model: Any, inputs: Iterable[Any]) -> None:
    for x in inputs:
        model(x, training=False)
