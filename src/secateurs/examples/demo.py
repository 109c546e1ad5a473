"""What `secateurs demo` shows: the digits CNN made physically smaller and faster, and what the other cuts buy.

The dense CNN (`digits.py`) is cut three ways: channels removed until the MACs meet a
budget (the headline, saved), and beside it, for size, unstructured sparsity and N:M.
Each is recovered by distillation from the dense model; then all four are measured
alike, their latency timed one after another on one batch of test images.
"""
from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from ..measure import Measurement, Timing, measure
from .digits import RECIPE, accuracy, dense_cache_path, dense_model, load_digits

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

    def metrics(self) -> dict[str, Any]:
        """metrics.json: `before` / `after` (dense / the structured model), its plan, and every variant's stages."""
        from ..run import layer_table

        return {
            "before": self.dense.after.to_dict(), "after": self.headline.after.to_dict(),
            "pruned_before_finetune": {"accuracy": self.headline.cut.accuracy},
            "plan": self.headline.plan.to_dict(), "seed": self.seed,
            "latency": {"batch": self.latency_batch, "threads": self.threads, "timer": "torch.utils.benchmark",
                        "spread": "latency_iqr_ms: interquartile range of the timed blocks"},
            "layers": {"before": layer_table(self.dense.model), "after": layer_table(self.headline.model)},
            "variants": [{"name": v.name, "what": v.what, "layers": layer_table(v.model),
                          "budget": getattr(v.plan, "budget", None),
                          "stages": [{"stage": "cut", "measurement": v.cut.to_dict()},
                                     {"stage": "distilled", "measurement": v.after.to_dict()}]}
                         for v in self.variants],
        }

    def table(self) -> Table:
        """One row per model: accuracy right after the cut and recovered, costs with their share of dense, latency."""
        dense, timing = self.dense.after, self.dense.timing
        table = Table(title=f"digits CNN: dense, and pruned then distilled {self.epochs} epochs (latency: batch of "
                            f"{self.latency_batch}, {self.threads} thread{'s' * (self.threads > 1)})")
        for column in ("model", "accuracy (cut → recovered)", "params", "non-zero", "MACs / image", "bytes",
                       "latency ms", "speedup"):
            table.add_column(column, justify="left" if column == "model" else "right")
        for entry in [self.dense] + self.variants:
            m = entry.after
            accuracy = f"{m.accuracy:.2%}" if entry is self.dense else f"{entry.cut.accuracy:.2%} → {m.accuracy:.2%}"
            table.add_row(entry.label, accuracy, f"{m.params:,} ({_share(m.params, dense.params)})",
                          _share(m.nonzeros, dense.nonzeros), f"{m.macs:,} ({_share(m.macs, dense.macs)})",
                          f"{m.size_bytes:,} ({_share(m.size_bytes, dense.size_bytes)})", entry.timing.text,
                          "1.00x" if entry is self.dense else entry.timing.speedup(timing))
        return table

    def notes(self, method: str) -> list[str]:
        """What the table's rows and columns mean, in a line each."""
        return ["; ".join(f"{v.name}: {v.what}" for v in self.variants)
                + f"; each scored by {method}, then distilled from the dense model",
                f"accuracy: the {self.test_images} held-out test images; latency: median ± half the interquartile "
                "range of torch.utils.benchmark's timed blocks, \"within noise\" where the spreads cover the "
                "difference"]

    def write(self, out: str | Path) -> Path:
        """The structured model (weights and plan.json) and metrics.json into `out`, a report into `out`/report;
        returns the report page."""
        from ..checkpoint import save
        from ..io import staged_output
        from ..report import build_report

        out = Path(out)
        with staged_output(out) as stage:
            save(self.headline.model, stage, self.headline.plan)
            (stage / "metrics.json").write_text(json.dumps(self.metrics(), indent=2))
        return build_report([out], out / "report", overwrite=True)


def _share(value: float, dense: float) -> str:
    return f"{value / dense:.0%}" if dense else "-"


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


__all__ = ["DEMO_EPOCHS", "DEMO_LATENCY_BATCH", "DEMO_METHOD", "DEMO_PATTERN", "DEMO_SPARSITY", "DEMO_TARGET", "Demo",
           "DemoModel", "demo"]
