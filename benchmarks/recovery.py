"""Recovery after structured pruning: the digits CNN cut to 0.25x and 0.1x MACs.

The dense model is `secateurs.examples.digits.dense_model` (cached after the first
run). For each MACs target, one copy of it is pruned with
`prune_structured(target="macs=<f>")` (L2 magnitude, global ratio search), and then,
from that same pruned copy:

- `pruned`: accuracy with no recovery at all;
- `bn_recalibrated`: after `recalibrate_bn` on the training split (no training);
- `finetune`: BN recalibration, then `finetune` (cross-entropy on the labels);
- `distill`: BN recalibration, then `distill` from the dense teacher (T=4, alpha=0.9);
- `distill_hidden`: as `distill`, plus MSE matching of the feature extractor's output
  through a learned channel projection.

The training arms use the same epochs, learning rate, optimizer (Adam) and batch
order; the rate drops tenfold for the last quarter of the epochs. Each arm runs once
per seed in `--seeds` (the seed sets the batch order, reshuffled every epoch), and the
worst and median accuracy drops are reported. Accuracy is on the held-out 20% test
split (359 images: one image is 0.28 points), never used for training or for choosing
anything. Acceptance (issue 5): distillation loses at most 1 point at 0.25x MACs and
at most 3 points at 0.1x, in the worst seed. Prints one JSON object.

    .venv/bin/python benchmarks/recovery.py
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from secateurs.examples.digits import DigitsData, accuracy, dense_model, load_digits
from secateurs.measure import count_macs, count_parameters
from secateurs.recover import distill, finetune, recalibrate_bn
from secateurs.structured import prune_structured

LIMITS = {0.25: 1.0, 0.1: 3.0}   # MACs fraction -> most accuracy points distillation may lose


class Epochs:
    """The training split, reshuffled each time it is iterated (seeded by `seed` and the epoch number)."""

    def __init__(self, data: DigitsData, seed: int = 0, batch_size: int = 64):
        self.data, self.seed, self.batch_size, self.epoch = data, seed, batch_size, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.data.train_batches(self.batch_size, seed=1000 * (self.seed + 1) + self.epoch)
        self.epoch += 1
        return iter(batches)


def two_phase(train: Callable[[int, float], Any], epochs: int, lr: float) -> None:
    """Train `epochs` epochs at `lr`, the last quarter at lr / 10 (as the dense recipe does)."""
    late = max(1, epochs // 4)
    train(epochs - late, lr)
    train(late, lr / 10)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def points(value: float) -> float:
    return round(100.0 * value, 2)


def run_target(dense: nn.Module, data: DigitsData, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    x = data.train_x[:1]
    pruned = copy.deepcopy(dense)
    prune_time = timed(lambda: prune_structured(pruned, x, target=f"macs={fraction}"))
    dense_acc = accuracy(dense, data)
    result: dict[str, Any] = {
        "target": f"macs={fraction}",
        "params": count_parameters(pruned)[0],
        "macs": count_macs(pruned, x)[0],
        "macs_fraction": round(count_macs(pruned, x)[0] / count_macs(dense, x)[0], 4),
        "prune_s": round(prune_time, 2),
        "accuracy": {"pruned": points(accuracy(pruned, data))},
        "seconds": {},      # median wall time of one training run per arm
    }
    recalibrate_bn(pruned, Epochs(data))
    result["accuracy"]["bn_recalibrated"] = points(accuracy(pruned, data))

    arms: dict[str, Callable[[nn.Module, Epochs, int, float], Any]] = {
        "finetune": lambda m, d, e, lr: finetune(m, d, epochs=e, lr=lr),
        "distill": lambda m, d, e, lr: distill(m, dense, d, e, lr, temperature=args.temperature, alpha=args.alpha),
        "distill_hidden": lambda m, d, e, lr: distill(m, dense, d, e, lr, temperature=args.temperature,
                                                      alpha=args.alpha, hidden=[("features", "features")]),
    }
    for name, train in arms.items():
        accuracies, seconds = [], []
        for seed in args.seeds:
            student, batches = copy.deepcopy(pruned), Epochs(data, seed)
            torch.manual_seed(seed)
            seconds.append(timed(lambda: two_phase(lambda e, lr: train(student, batches, e, lr), args.epochs, args.lr)))
            accuracies.append(points(accuracy(student, data)))
        result["accuracy"][name] = accuracies
        result["seconds"][name] = round(statistics.median(seconds), 2)
    dense_points = points(dense_acc)
    result["worst_drop_points"] = {k: round(dense_points - min(v) if isinstance(v, list) else dense_points - v, 2)
                                   for k, v in result["accuracy"].items()}
    result["median_drop_points"] = {k: round(dense_points - statistics.median(v), 2)
                                    for k, v in result["accuracy"].items() if isinstance(v, list)}
    limit = LIMITS.get(fraction)
    result["limit_points"] = limit
    result["distill_within_limit"] = None if limit is None else result["worst_drop_points"]["distill"] <= limit
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.1], help="MACs fractions")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="batch-order seeds, one run each")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_digits()
    dense = dense_model(data)
    x = data.train_x[:1]
    report = {
        "command": "benchmarks/recovery.py " + " ".join(
            f"--{k} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in vars(args).items()),
        "torch": torch.__version__,
        "threads": args.threads,
        "dense": {"accuracy": points(accuracy(dense, data)), "params": count_parameters(dense)[0],
                  "macs": count_macs(dense, x)[0], "test_samples": len(data.test_y)},
        "targets": [run_target(dense, data, f, args) for f in args.targets],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
