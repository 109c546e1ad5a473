"""Structured pruning side by side with Torch-Pruning: prune time, MACs and measured CPU speedup.

For each model (ResNet-18 on 3x128x128, ViT-S/16 and ViT-B/16 on 3x224x224, from
`secateurs.examples.zoo`), each tool prunes its own deep copy of one dense model with
the same L2-magnitude criterion:

- Torch-Pruning 1.6.1: `MetaPruner(pruning_ratio=0.5, MagnitudeImportance(p=2))`,
  channel-uniform (local), classifier ignored;
- secateurs `ratio=0.5`: half of every prunable group's channels / heads (local scope);
- secateurs `target="macs=<f>"`: a global ratio searched so the MACs are at most the
  fraction f that Torch-Pruning reached (f=0.25 when Torch-Pruning is absent);
- the same target with `round_to=8`: every cut width a multiple of 8.

Measured per arm: prune wall time (median of `--repeats` prunes, each of a fresh copy),
MACs (secateurs' counter for every arm; Torch-Pruning's own count is reported next to
it), parameters, the output shape, and CPU latency at each batch size with the arms
interleaved (the order alternates every round), a fixed thread count, medians. The
figure of merit is speedup / MAC reduction. Prints one JSON object.

Torch-Pruning is not a dependency of secateurs; install it for this benchmark only:

    .venv/bin/python -m pip install --constraint constraints.txt torch-pruning==1.6.1

Without it the Torch-Pruning arm reads "not installed". `--quick` uses small widths.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from secateurs.examples.zoo import resnet18, vit
from secateurs.graph import trace
from secateurs.graph.groups import analyze_graph
from secateurs.measure import count_macs, count_parameters
from secateurs.structured import prune_structured

try:
    import torch_pruning
except ImportError:
    torch_pruning = None


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    classifier: str          # the layer Torch-Pruning is told to ignore (its output is the logits)
    batches: list[int]
    rounds: int


def prune_with_torch_pruning(model: nn.Module, x: torch.Tensor, classifier: str, ratio: float) -> None:
    """Torch-Pruning's channel-uniform L2 pruning of `model` in place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its note on cls_token / pos_embed being pruned on the last dim
        pruner = torch_pruning.pruner.MetaPruner(
            model, x, importance=torch_pruning.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
            global_pruning=False, ignored_layers=[model.get_submodule(classifier)])
        pruner.step()


def timed_prunes(dense: nn.Module, prunes: dict[str, Callable[[nn.Module], object]],
                 repeats: int) -> dict[str, tuple[nn.Module, dict]]:
    """Per arm: its last pruned copy and the median wall / process CPU seconds of `repeats` prunes.

    Each prune works on a fresh deep copy (copying is not timed); the arms take turns,
    the order alternating every round. CPU time is reported next to wall time because
    other jobs on a shared machine disturb it less; wall time is what a user waits.
    """
    wall = {arm: [] for arm in prunes}
    cpu = {arm: [] for arm in prunes}
    pruned = {}
    for r in range(repeats):
        for arm in (list(prunes) if r % 2 == 0 else list(reversed(prunes))):
            model = copy.deepcopy(dense)
            start, start_cpu = time.perf_counter(), time.process_time()
            prunes[arm](model)
            wall[arm].append(time.perf_counter() - start)
            cpu[arm].append(time.process_time() - start_cpu)
            pruned[arm] = model.eval()
    return {arm: (pruned[arm], {"prune_s": round(statistics.median(wall[arm]), 3),
                                "prune_cpu_s": round(statistics.median(cpu[arm]), 3),
                                "prune_s_all": [round(t, 3) for t in wall[arm]]}) for arm in prunes}


def warm_up() -> None:
    """Prune a tiny model once with each tool, so lazy imports and first-call setup are not timed."""
    tiny = resnet18(num_classes=10, width=4).eval()
    x = torch.randn(1, 3, 32, 32)
    prune_structured(copy.deepcopy(tiny), x, 0.5)
    prune_structured(copy.deepcopy(tiny), x, target="macs=0.5")
    if torch_pruning is not None:
        prune_with_torch_pruning(copy.deepcopy(tiny), x, "head.fc", 0.5)


def interleaved_latency(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    """Ms per forward of each model, every round; all models run once per round, the order alternating."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)  # warm-up: oneDNN picks and caches its kernels on the first call
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for name in order:
                start = time.perf_counter()
                models[name](x)
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def spread(values: list[float]) -> float:
    """Relative spread (max - min) / median of repeated timings: how noisy the machine was."""
    return (max(values) - min(values)) / statistics.median(values)


def graph_seconds(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds to trace `model` on fake tensors, and to group the traced graph's channels."""
    traced, grouped = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        graph = trace(model, x)
        traced.append(time.perf_counter() - start)
        start = time.perf_counter()
        analyze_graph(graph)
        grouped.append(time.perf_counter() - start)
    return {"trace_s": round(statistics.median(traced), 3), "analyze_s": round(statistics.median(grouped), 3),
            "fake": graph.fake}


def bench(case: Case, repeats: int) -> dict:
    torch.manual_seed(0)
    dense = case.build().eval()
    x1 = torch.randn(1, *case.shape)
    with torch.inference_mode():
        expected = dense(x1).shape
    dense_macs, dense_params = count_macs(dense, x1)[0], count_parameters(dense)[0]
    arms: dict[str, dict] = {}
    models = {"dense": dense}

    def record(arm: str, model: nn.Module, timing: dict, setting: str, **extra) -> None:
        macs = count_macs(model, x1)[0]
        with torch.inference_mode():
            shape_ok = model(x1).shape == expected
        arms[arm] = {"setting": setting, **timing, "params": count_parameters(model)[0],
                     "macs": macs, "mac_reduction": round(dense_macs / macs, 3), "output_shape_ok": shape_ok, **extra}
        models[arm] = model

    prunes = {}
    fraction = 0.25
    if torch_pruning is None:
        arms["torch_pruning"] = {"setting": "not installed"}
    else:
        def tp_prune(m: nn.Module) -> None:
            prune_with_torch_pruning(m, x1, case.classifier, 0.5)
        reference = copy.deepcopy(dense)
        tp_prune(reference)  # untimed: the MACs fraction secateurs' target must reach
        fraction = count_macs(reference, x1)[0] / dense_macs
        prunes["torch_pruning"] = tp_prune
    target = f"macs={fraction:.4f}"
    prunes["secateurs_ratio"] = lambda m: prune_structured(m, x1, 0.5)
    prunes["secateurs_target"] = lambda m: prune_structured(m, x1, target=target)
    prunes["secateurs_target_round8"] = lambda m: prune_structured(m, x1, target=target, round_to=8)
    settings = {"torch_pruning": "pruning_ratio=0.5", "secateurs_ratio": "ratio=0.5",
                "secateurs_target": f"target={target}", "secateurs_target_round8": f"target={target}, round_to=8"}
    for arm, (model, timing) in timed_prunes(dense, prunes, repeats).items():
        extra = {}
        if arm == "torch_pruning":
            extra["macs_by_torch_pruning"] = int(torch_pruning.utils.count_ops_and_params(model, x1)[0])
        record(arm, model, timing, settings[arm], **extra)

    latency = {}
    for batch in case.batches:
        times = interleaved_latency(models, torch.randn(batch, *case.shape), case.rounds)
        ms = {arm: statistics.median(t) for arm, t in times.items()}
        latency[f"batch{batch}"] = {arm: {"ms": round(t, 2), "spread": round(spread(times[arm]), 3),
                                          "speedup": round(ms["dense"] / t, 3),
                                          "speedup_over_mac_reduction":
                                              round(ms["dense"] / t / arms[arm]["mac_reduction"], 3)
                                          if arm in arms else None}
                                    for arm, t in ms.items()}
    return {"model": case.name, "input": list(case.shape), "params": dense_params, "macs": dense_macs,
            "graph": graph_seconds(dense, x1, repeats), "arms": arms, "latency": latency}


def cases(quick: bool, rounds: int) -> list[Case]:
    width, (small, base) = (16, (96, 192)) if quick else (64, (384, 768))
    return [
        Case("resnet18-128px", lambda: resnet18(num_classes=1000, width=width), (3, 128, 128), "head.fc", [1, 32], rounds),
        Case("vit-s", lambda: vit(dim=small, heads=6, depth=12), (3, 224, 224), "head", [1, 32], rounds),
        Case("vit-b", lambda: vit(dim=base, heads=12, depth=12), (3, 224, 224), "head", [1, 32], max(3, rounds // 2)),
    ]


def installed_version(distribution: str) -> str:
    """The installed version as pip records it (Torch-Pruning 1.6.1 reports "1.6.0" in `__version__`)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small widths, few rounds: a smoke run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="latency rounds per batch size (default 9, quick 3)")
    parser.add_argument("--repeats", type=int, default=None, help="prunes timed per arm (default 3, quick 1)")
    parser.add_argument("--models", nargs="*", default=None, help="subset of resnet18-128px vit-s vit-b")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 9)
    repeats = args.repeats or (1 if args.quick else 3)
    selected = [c for c in cases(args.quick, rounds) if args.models is None or c.name in args.models]
    warm_up()
    runs = [bench(case, repeats) for case in selected]
    print(json.dumps({"threads": args.threads, "torch": torch.__version__,
                      "torch_pruning": installed_version("torch-pruning"), "runs": runs},
                     indent=2))


if __name__ == "__main__":
    main()
