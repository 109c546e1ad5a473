"""The embedded default: a small CNN on scikit-learn's bundled digits (8x8, offline).

Training takes a few seconds on CPU and is cached, keyed by the recipe, so a second
run reuses the dense model. `demo()` is what `secateurs demo` shows: the dense CNN cut
three ways (channels removed to a MAC budget, unstructured sparsity, N:M), each
recovered by distillation from the dense model, then all four measured alike.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import cache_dir
from ..errors import SecateursError
from ..io import load_state, save_weights
from ..measure import Measurement, Timing, measure
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


# ------------------------------------------------------------------------ the demo

# What `secateurs demo` does by default: the structured cut to a quarter of the MACs (the
# headline, saved), and beside it 70% unstructured sparsity and 2:4, for size.
DEMO_TARGET, DEMO_SPARSITY, DEMO_PATTERN, DEMO_METHOD = "macs=0.25", 0.7, "2:4", "taylor"
# Recovery: epochs of distillation from the dense model, at this learning rate.
DEMO_EPOCHS, DEMO_LR = 6, 2e-3
# Latency is timed on a batch of this many test images: at batch 1 an 8x8 CNN is all
# per-call overhead, which no pruning removes.
DEMO_LATENCY_BATCH = 256

# step(text, total) -> a context whose value is update(done, total): how the demo reports progress.
Step = Callable[[str, "int | None"], ContextManager[Callable[[int, int], Any]]]


@contextlib.contextmanager
def _quiet_step(text: str, total: int | None = None) -> Iterator[Callable[[int, int], Any]]:
    yield lambda done, total: None


@dataclass
class DemoModel:
    """One model of the demo: how it was made, and its costs right after the cut and after recovery."""

    name: str                      # "dense", "structured", "unstructured", "2:4"
    label: str                     # the name with its setting, e.g. "structured (macs=0.25)"
    what: str                      # how it was made, in words
    model: nn.Module
    plan: Any = None
    cut: Measurement | None = None          # right after the cut, before recovery (not timed)
    after: Measurement | None = None        # after recovery, timed with the others

    @property
    def timing(self) -> Timing:
        return Timing.of(self.after.to_dict())


@dataclass
class Demo:
    """The dense model and its pruned variants, measured alike."""

    dense: DemoModel
    variants: list[DemoModel]
    threads: int
    latency_batch: int
    epochs: int
    seed: int
    test_images: int               # accuracy is measured on these held-out images

    @property
    def headline(self) -> DemoModel:
        return self.variants[0]


def demo(*, target: str = DEMO_TARGET, sparsity: float = DEMO_SPARSITY, pattern: str = DEMO_PATTERN,
         method: str = DEMO_METHOD, epochs: int = DEMO_EPOCHS, threads: int = 1,
         latency_batch: int = DEMO_LATENCY_BATCH, seed: int = 0, only_structured: bool = False,
         step: Step = _quiet_step) -> Demo:
    """The dense digits CNN and its pruned variants, each recovered by distillation, measured alike.

    The structured variant removes channels until the MACs meet `target`; the others
    zero `sparsity` of the weights, and N of every M (`pattern`). Accuracy is on the
    held-out test split; latency on `latency_batch` test images at `threads` threads,
    all models timed one after another at the end so they share the machine's state.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)   # training too: one thread is as fast for this CNN, and steady on a busy machine
    try:
        return _demo(target, sparsity, pattern, method, epochs, threads, latency_batch, seed, only_structured, step)
    finally:
        torch.set_num_threads(previous)


def _demo(target: str, sparsity: float, pattern: str, method: str, epochs: int, threads: int, latency_batch: int,
          seed: int, only_structured: bool, step: Step) -> Demo:
    from ..api import prune
    from ..recover.distill import distill
    from ..structured import prune_structured

    torch.manual_seed(seed)
    data = load_digits()
    cached = dense_cache_path().is_file()
    what = (f"dense CNN: from the cache ({dense_cache_path()})" if cached else
            f"dense CNN: training it, {RECIPE['epochs']} epochs (cached for the next run)")
    with step(what, None if cached else RECIPE["epochs"]) as update:
        dense = dense_model(data, on_epoch=update)
    example = data.test_x[:1]
    timed = data.test_x[:latency_batch]
    scoring = data.train_batches()[:8]
    cuts: list[tuple[str, str, str, Callable[[nn.Module], Any]]] = [
        ("structured", f"structured ({target.split(',')[0]})", f"channels removed to {target}",
         lambda m: prune_structured(m, example, target=target, method=method, data=scoring,
                                    loss_fn=F.cross_entropy, seed=seed))]
    if not only_structured:
        cuts.append(("unstructured", f"unstructured ({sparsity:.0%})", f"{sparsity:.0%} of the weights zeroed",
                     lambda m: prune(m, method, sparsity, data=scoring, loss_fn=F.cross_entropy, seed=seed)))
        kept, every = pattern.split(":")
        cuts.append((pattern, pattern, f"{kept} of every {every} weights kept",
                     lambda m: prune(m, method, pattern=pattern, data=scoring, loss_fn=F.cross_entropy,
                                     skip_incompatible=True, seed=seed)))
    evaluate = lambda m: accuracy(m, data)  # noqa: E731
    base = DemoModel("dense", "dense", "trained on digits", dense)
    base.cut = base.after = measure(dense, example, threads=threads, evaluate=evaluate, timed=False)
    variants = []
    for name, label, what, cut in cuts:
        with step(f"{name}: {what} ({method} scores), then {epochs} epochs of distillation", epochs) as update:
            model = copy.deepcopy(dense)
            variant = DemoModel(name, label, what, model, cut(model))
            variant.cut = measure(model, example, threads=threads, evaluate=evaluate, timed=False)
            for epoch in range(epochs):
                distill(model, dense, data.train_batches(seed=100 + epoch), epochs=1, lr=DEMO_LR)
                update(epoch + 1, epochs)
            model.eval()
            variants.append(variant)
    with step(f"timing {1 + len(variants)} models on a batch of {len(timed)} images, {threads} thread(s)",
              1 + len(variants)) as update:
        for done, entry in enumerate([base] + variants, start=1):
            entry.after = measure(entry.model, example, threads=threads, evaluate=evaluate, timed_inputs=timed)
            update(done, 1 + len(variants))
    return Demo(base, variants, threads, len(timed), epochs, seed, len(data.test_y))


__all__ = ["Demo", "DemoModel", "DigitsCNN", "DigitsData", "accuracy", "demo", "dense_model", "load_digits"]
