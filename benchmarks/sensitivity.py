"""Sensitivity-based allocation against uniform ones at the same MACs, on the digits CNN.

The dense model is `secateurs.examples.digits.dense_model` (cached after the first run).
The sensitivity curves (`secateurs.sensitivity.sensitivity`, L2 ranking, ratios 0.1..0.9)
are measured on calibration batches drawn from the *training* split (mean cross-entropy
by default), never on the test split. For each MACs fraction, three copies of the dense
model are cut:

- `global`: `prune_structured(target="macs=<f>")`, the library default (one L2 ranking
  across groups, each normalised by its group's mean, ratio found by search);
- `uniform`: the same fraction of every group's units, the smallest that meets the
  target (`prune_by_sensitivity(..., allocation="uniform")`);
- `sensitivity`: `prune_by_sensitivity(...)`, asked for the smaller of the two
  baselines' measured MACs, so it never keeps more MACs than either;
- `sensitivity x3`: `prune_by_sensitivity_rounds(..., rounds=3)` to the same MACs, the
  curves measured again (same data) on the partly cut model before each of 3 cuts.

Each is scored on the held-out test split (359 images: one image is 0.28 points) right
after the cut, after BatchNorm recalibration alone, and after the same short distillation from the dense teacher (BatchNorm
recalibration, then `distill`, T=4, alpha=0.9, the last quarter of the epochs at a
tenth of the rate), once per seed in `--seeds` (the seed sets the batch order). Medians
and every seed's accuracy are reported. Prints one JSON object.

    .venv/bin/python benchmarks/sensitivity.py
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import Epochs, points, two_phase  # noqa: E402  (the recovery benchmark's training schedule)

from secateurs.examples.digits import DigitsData, accuracy, cache_dir, dense_model, load_digits  # noqa: E402
from secateurs.measure import count_macs  # noqa: E402
from secateurs.recover import distill, recalibrate_bn  # noqa: E402
from secateurs.sensitivity import (METRICS, Sensitivity, allocate, data_digest, prune_by_sensitivity,  # noqa: E402
                                   prune_by_sensitivity_rounds, sensitivity)
from secateurs.structured import prune_structured  # noqa: E402


def measure_curves(dense: nn.Module, data: DigitsData, args: argparse.Namespace) -> Sensitivity:
    """The sensitivity curves on `--calib-images` training images, cached under the digits cache."""
    batches = data.train_batches(256, seed=12345)
    batches = [(x, y) for x, y in batches][: max(1, args.calib_images // 256)]
    factory, higher_is_better = METRICS[args.metric]
    return sensitivity(dense, data.train_x[:1], factory(batches, F.cross_entropy), higher_is_better=higher_is_better,
                       metric_name=args.metric, cache_dir=cache_dir() / "sensitivity",
                       data_key=f"digits-train:{args.metric}:{data_digest(batches)}")


def bn_recalibrated(pruned: nn.Module, data: DigitsData) -> float:
    """Test accuracy of a copy of `pruned` after BatchNorm recalibration alone (no training)."""
    student = copy.deepcopy(pruned)
    recalibrate_bn(student, Epochs(data))
    return accuracy(student, data)


def recovered(pruned: nn.Module, dense: nn.Module, data: DigitsData, seed: int, args: argparse.Namespace) -> float:
    """Test accuracy of a copy of `pruned` after BN recalibration and a short distillation."""
    student = copy.deepcopy(pruned)
    recalibrate_bn(student, Epochs(data, seed))
    batches = Epochs(data, seed)
    torch.manual_seed(seed)
    two_phase(lambda e, lr: distill(student, dense, batches, e, lr, temperature=4.0, alpha=0.9), args.epochs, args.lr)
    return accuracy(student, data)


def run_fraction(dense: nn.Module, data: DigitsData, curves: Sensitivity, fraction: float,
                 args: argparse.Namespace) -> dict[str, Any]:
    x = data.train_x[:1]
    dense_macs = count_macs(dense, x)[0]
    cuts: dict[str, Callable[[nn.Module, float], Any]] = {
        "global": lambda m, f: prune_structured(m, x, target=f"macs={f}"),
        "uniform": lambda m, f: prune_by_sensitivity(m, x, curves, f"macs={f}", "uniform"),
    }
    models: dict[str, nn.Module] = {}
    seconds: dict[str, float] = {}
    for name, cut in cuts.items():
        models[name] = copy.deepcopy(dense)
        started = time.perf_counter()
        cut(models[name], fraction)
        seconds[name] = round(time.perf_counter() - started, 3)
    matched = min(count_macs(m, x)[0] for m in models.values()) / dense_macs
    models["sensitivity"] = copy.deepcopy(dense)
    started = time.perf_counter()
    plan = prune_by_sensitivity(models["sensitivity"], x, curves, f"macs={matched}")
    seconds["sensitivity"] = round(time.perf_counter() - started, 3)
    models["sensitivity x3"] = copy.deepcopy(dense)
    started = time.perf_counter()
    rounds = prune_by_sensitivity_rounds(models["sensitivity x3"], x, lambda m: measure_curves(m, data, args),
                                         f"macs={matched}", rounds=3)
    seconds["sensitivity x3"] = round(time.perf_counter() - started, 3)
    arms = {}
    for name, model in models.items():
        recovered_points = [points(recovered(model, dense, data, seed, args)) for seed in args.seeds]
        arms[name] = {"macs_fraction": round(count_macs(model, x)[0] / dense_macs, 4),
                      "prune_s": seconds[name],
                      "accuracy_after_cut": points(accuracy(model, data)),
                      "accuracy_after_bn": points(bn_recalibrated(model, data)),
                      "accuracy_after_distill": recovered_points,
                      "median_after_distill": statistics.median(recovered_points)}
    predicted = {name: float(f"{allocate(dense, x, curves, f'macs={f}', name).predicted_loss:.4g}")
                 for name, f in (("uniform", fraction), ("sensitivity", matched))}
    return {"target": f"macs={fraction}", "sensitivity_target": f"macs={matched:.4f}",
            "sensitivity_ratios": {k: round(v, 3) for k, v in plan.ratio.items()},
            "sensitivity_x3_ratios": [{k: round(v, 3) for k, v in p.ratio.items()} for p in rounds],
            "predicted_loss": predicted, "arms": arms,
            "sensitivity_beats": {f"{arm} vs {name}": {"after_cut": arms[arm]["accuracy_after_cut"]
                                                       > arms[name]["accuracy_after_cut"],
                                                       "after_distill_median": arms[arm]["median_after_distill"]
                                                       > arms[name]["median_after_distill"]}
                                  for arm in ("sensitivity", "sensitivity x3") for name in cuts}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25, 0.1], help="MACs fractions")
    parser.add_argument("--metric", choices=sorted(METRICS), default="loss", help="what the curves measure")
    parser.add_argument("--calib-images", type=int, default=512, help="training images the curves are measured on")
    parser.add_argument("--epochs", type=int, default=4, help="distillation epochs after the cut")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="batch-order seeds, one run each")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_digits()
    dense = dense_model(data)
    started = time.perf_counter()
    curves = measure_curves(dense, data, args)
    report = {
        "command": "benchmarks/sensitivity.py " + " ".join(
            f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
            for k, v in vars(args).items()),
        "torch": torch.__version__,
        "threads": args.threads,
        "dense_accuracy": points(accuracy(dense, data)),
        "curves": {"metric": curves.metric_name, "baseline": float(f"{curves.baseline:.4g}"), "cached": curves.cached,
                   "measure_s": curves.seconds, "call_s": round(time.perf_counter() - started, 3),
                   "points": {c.label: [float(f"{m:.4g}") for m in c.metric] for c in curves.curves},
                   "ratios": curves.ratios},
        "fractions": [run_fraction(dense, data, curves, f, args) for f in args.targets],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
