"""The embedded default: a small CNN on scikit-learn's bundled digits (8x8, offline).

Training takes a few seconds on CPU and is cached, keyed by the recipe, so a second
run reuses the dense model. What `secateurs demo` does with it is in `demo.py`.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..cache import cache_dir
from ..errors import SecateursError
from ..io import load_state, save_weights
from ..recover.finetune import evaluate_accuracy, finetune

RECIPE = {"arch": "digits-cnn-v1", "seed": 0, "epochs": 24, "lr": 2e-3, "final_lr": 2e-4, "final_epochs": 8, "batch": 64}


class DigitsCNN(nn.Module):
    """Three conv blocks and a two-layer head: about 60k parameters."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 4, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass
class DigitsData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def train_batches(self, batch_size: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(seed))
        return [(self.train_x[i], self.train_y[i]) for i in order.split(batch_size)]

    def test_batches(self, batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.test_x.split(batch_size), self.test_y.split(batch_size)))


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> DigitsData:
    """The 1797 digits images scaled to [0, 1], split by a seeded shuffle."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise SecateursError("the digits demo needs scikit-learn: pip install 'secateurs[demo]'") from None
    digits = sk_load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return DigitsData(x[train], y[train], x[test], y[test])


def train_dense(data: DigitsData, on_epoch: Callable[[int, int], Any] | None = None) -> DigitsCNN:
    torch.manual_seed(RECIPE["seed"])
    model = DigitsCNN()
    for epoch in range(RECIPE["epochs"]):
        # a lower rate for the last epochs lets the dense model converge, so the
        # comparison with pruned-and-fine-tuned models is fair
        lr = RECIPE["final_lr"] if epoch >= RECIPE["epochs"] - RECIPE["final_epochs"] else RECIPE["lr"]
        finetune(model, data.train_batches(RECIPE["batch"], seed=epoch), epochs=1, lr=lr)
        if on_epoch is not None:
            on_epoch(epoch + 1, RECIPE["epochs"])
    return model.eval()


def dense_cache_path() -> Path:
    """Where the trained dense CNN is cached, keyed by its training recipe."""
    key = hashlib.sha256(repr(sorted(RECIPE.items())).encode()).hexdigest()[:12]
    return cache_dir() / f"digits-{key}.safetensors"


def dense_model(data: DigitsData, use_cache: bool = True,
                on_epoch: Callable[[int, int], Any] | None = None) -> DigitsCNN:
    """The trained dense CNN, from the cache when a matching one is there."""
    path = dense_cache_path()
    if use_cache and path.is_file():
        model = DigitsCNN()
        model.load_state_dict(load_state(path))
        return model.eval()
    model = train_dense(data, on_epoch)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_weights(model, tmp)
        os.replace(tmp, path)
    return model


def accuracy(model: nn.Module, data: DigitsData) -> float:
    return evaluate_accuracy(model, data.test_batches())


__all__ = ["DigitsCNN", "DigitsData", "accuracy", "dense_cache_path", "dense_model", "load_digits"]
