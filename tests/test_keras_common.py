"""Shared set-up of the Keras tests (no tests here): the backend before keras is imported, one torch thread, tiny models.

Keras reads KERAS_BACKEND once, at its first import; the Keras tests run on the torch
backend unless KERAS_BACKEND names another (`KERAS_BACKEND=jax pytest tests/test_keras*.py`).
No other test imports keras, so setting it here disturbs nothing else.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
BACKEND = os.environ["KERAS_BACKEND"]
if importlib.util.find_spec("keras") is None or importlib.util.find_spec(BACKEND) is None:
    pytest.skip(f"keras or its {BACKEND} backend is not installed (pip install 'secateurs[keras]')",
                allow_module_level=True)

import keras  # noqa: E402
from keras import layers  # noqa: E402

import secateurs.keras as sk  # noqa: E402
from secateurs.keras._backend import to_numpy  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one thread is several times faster than two on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh(seed: int = 0) -> None:
    """Layer names restart (dense, dense_1, ...) and the weights are seeded."""
    keras.backend.clear_session(free_memory=False)   # the gc pass would take most of a tiny test
    keras.utils.set_random_seed(seed)


def mlp(seed: int = 0, width: int = 16) -> keras.Model:
    fresh(seed)
    return keras.Sequential([keras.Input((12,)), layers.Dense(width, activation="relu"),
                             layers.Dense(width, activation="relu"), layers.Dense(3)])


def zoo(seed: int = 0) -> keras.Model:
    """One layer of every prunable kind: Conv1D/2D/3D, depthwise, separable, transposed, Embedding, attention."""
    fresh(seed)
    image = keras.Input((8, 8, 4), name="image")
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(image)
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)
    x = layers.SeparableConv2D(8, 3, padding="same")(x)
    x = layers.Conv2DTranspose(8, 2, strides=2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    t = layers.Embedding(20, 8)(tokens)
    t = layers.Conv1D(8, 3, padding="same")(t)
    t = layers.MultiHeadAttention(2, 4)(t, t)
    t = layers.GlobalAveragePooling1D()(t)
    volume = keras.Input((4, 4, 4, 2), name="volume")
    v = layers.GlobalAveragePooling3D()(layers.Conv3D(4, 2)(volume))
    x = layers.Concatenate()([x, t, v])
    x = layers.Dense(16, activation="relu", name="hidden")(x)
    out = layers.Dense(3, name="head")(x)
    return keras.Model([image, tokens, volume], out)


def zoo_inputs(n: int = 8, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 8, 8, 4)).astype("float32"), rng.integers(0, 20, (n, 6)).astype("int32"),
            rng.standard_normal((n, 4, 4, 4, 2)).astype("float32")]


def weights(variable) -> np.ndarray:
    return to_numpy(variable.value)


__all__ = ["BACKEND", "fresh", "keras", "layers", "mlp", "np", "sk", "to_numpy", "weights", "zoo", "zoo_inputs"]
