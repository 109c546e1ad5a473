"""Structured pruning: time to prune, MACs removed, and the CPU speedup actually measured.

For each model: prune half of every group's channels / heads (`ratio=0.5`, the setting
Torch-Pruning's numbers in ANCHORS.md use) and, separately, to a MACs target; then time
dense and pruned forward passes interleaved, at batch 1 and 32, with a fixed thread
count. The figure of merit is measured speedup / (MACs before / MACs after).
Prints one JSON object. `--quick` uses small widths for a smoke run.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from secateurs.examples.zoo import resnet18, vit
from secateurs.measure import count_macs, count_parameters
from secateurs.structured import prune_structured


def interleaved_latency(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median ms per forward of each model, alternating the models every round."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)  # warm-up
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for name in order:
                start = time.perf_counter()
                models[name](x)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def bench(name: str, build, shape: tuple[int, ...], batches: list[int], rounds: int, **prune_kwargs) -> dict:
    dense = build().eval()
    x1 = torch.randn(1, *shape)
    pruned = copy.deepcopy(dense)
    start = time.perf_counter()
    prune_structured(pruned, x1, **prune_kwargs)
    prune_s = time.perf_counter() - start
    pruned.eval()
    macs = (count_macs(dense, x1)[0], count_macs(pruned, x1)[0])
    result = {"model": name, "prune": prune_kwargs, "prune_s": round(prune_s, 3),
              "params": [count_parameters(dense)[0], count_parameters(pruned)[0]],
              "macs": list(macs), "mac_reduction": round(macs[0] / macs[1], 3), "latency": {}}
    for batch in batches:
        ms = interleaved_latency({"dense": dense, "pruned": pruned}, torch.randn(batch, *shape), rounds)
        speedup = ms["dense"] / ms["pruned"]
        result["latency"][f"batch{batch}"] = {"dense_ms": round(ms["dense"], 2), "pruned_ms": round(ms["pruned"], 2),
                                              "speedup": round(speedup, 3),
                                              "speedup_over_mac_reduction": round(speedup / result["mac_reduction"], 3)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    width, dims = (16, (96, 192)) if args.quick else (64, (384, 768))
    rounds = 3 if args.quick else 7
    runs = [
        bench("resnet18-128px", lambda: resnet18(num_classes=1000, width=width), (3, 128, 128), [1, 32], rounds, ratio=0.5),
        bench("resnet18-128px", lambda: resnet18(num_classes=1000, width=width), (3, 128, 128), [1], rounds,
              target="macs=0.25"),
        bench("vit-s", lambda: vit(dim=dims[0], heads=6, depth=12), (3, 224, 224), [1, 8], rounds, ratio=0.5),
        bench("vit-b", lambda: vit(dim=dims[1], heads=12, depth=12), (3, 224, 224), [1], rounds, ratio=0.5),
    ]
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
