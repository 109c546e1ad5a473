"""A Keras digits CNN (scikit-learn's bundled 8x8 digits, offline) for the tests, docs and benchmarks.

The data split is the PyTorch demo's (`secateurs.examples.digits.load_digits`), in
Keras' channels-last layout. The model is Functional with a residual block, so the
structured path has BatchNorm, Add, pooling and Flatten couplings to follow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backend import keras, to_numpy

L = keras.layers


@dataclass
class Digits:
    train_x: np.ndarray     # (N, 8, 8, 1) float32 in [0, 1]
    train_y: np.ndarray     # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray


def load_digits(seed: int = 0) -> Digits:
    from ..examples.digits import load_digits as torch_digits

    data = torch_digits(seed)
    to = lambda x: np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())  # noqa: E731
    return Digits(to(data.train_x), data.train_y.numpy(), to(data.test_x), data.test_y.numpy())


def digits_model(width: int = 16, seed: int = 0) -> Any:
    """conv-BN-ReLU, a residual block of two convs, pooling, Flatten, a Dense head: about 30k weights at width 16."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((8, 8, 1), name="image")
    x = L.ReLU()(L.BatchNormalization(momentum=0.9)(L.Conv2D(width, 3, padding="same", name="stem")(x)))
    x = L.MaxPooling2D()(L.Conv2D(2 * width, 3, padding="same", activation="relu", name="widen")(x))
    y = L.ReLU()(L.BatchNormalization(momentum=0.9)(L.Conv2D(2 * width, 3, padding="same", name="block_a")(x)))
    y = L.BatchNormalization(momentum=0.9)(L.Conv2D(2 * width, 3, padding="same", name="block_b")(y))
    x = L.MaxPooling2D()(L.ReLU()(L.Add()([x, y])))
    x = L.Dense(64, activation="relu", name="fc")(L.Flatten()(x))
    outputs = L.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def compile_digits(model: Any, learning_rate: float = 2e-3) -> Any:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def train_digits(data: Digits, epochs: int = 8, width: int = 16, seed: int = 0) -> Any:
    model = compile_digits(digits_model(width, seed))
    model.fit(data.train_x, data.train_y, batch_size=64, epochs=epochs, verbose=0, shuffle=True)
    return model


def accuracy(model: Any, data: Digits) -> float:
    logits = to_numpy(model.predict(data.test_x, batch_size=256, verbose=0))
    return float((logits.argmax(-1) == data.test_y).mean())
