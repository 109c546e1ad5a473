"""Prune + int8: bytes and CPU latency of dense, pruned and pruned+int8 models, side by side.

Arms, each built from one dense model:
- dense;
- structured: channels removed to `macs=0.25` (L2, global), no recovery (costs only);
- structured+int8: that model with its Linear layers int8 dynamic-quantized;
- unstructured: 70% of the weights masked (magnitude, per layer);
- unstructured+int8.

Models: the digits CNN (trained and cached; accuracy reported, without recovery) and a
Linear-heavy MLP (784-2048-2048-10, random weights: costs only), where int8 matters.
Latency: median over `--rounds` rounds in which every arm runs once, the arm order
rotating each round, `--repeats` timed calls per arm per round, one thread, at each
batch size. Bytes: the sparse safetensors form for float models, the int8 file for
quantized ones. Prints one JSON object.

    .venv/bin/python benchmarks/quantize.py [--rounds 7] [--repeats 30]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from torch import nn

from secateurs import measure, prune, prune_structured
from secateurs.examples.digits import accuracy, dense_model, load_digits
from secateurs.measure import latency_ms
from secateurs.quantize import int8_bytes, quantize_int8


def arms(dense: nn.Module, example: torch.Tensor) -> dict[str, nn.Module]:
    structured = copy.deepcopy(dense)
    prune_structured(structured, example, target="macs=0.25", method="l2")
    unstructured = copy.deepcopy(dense)
    prune(unstructured, "magnitude", 0.7)
    return {"dense": dense, "structured": structured, "structured+int8": quantize_int8(structured),
            "unstructured": unstructured, "unstructured+int8": quantize_int8(unstructured)}


def size(model: nn.Module, example: torch.Tensor) -> int:
    quantized = any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
    return int8_bytes(model) if quantized else measure(model, example, repeats=1).size_bytes


def latencies(models: dict[str, nn.Module], example: torch.Tensor, rounds: int, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(latency_ms(models[name], example, threads=1, warmup=2, repeats=repeats))
    return {name: statistics.median(t) for name, t in times.items()}


def bench(name: str, dense: nn.Module, example: torch.Tensor, batches: list[int], rounds: int, repeats: int,
          evaluate=None) -> dict:
    models = arms(dense.eval(), example[:1])
    result = {"model": name, "arms": {}}
    for arm, model in models.items():
        result["arms"][arm] = {"bytes": size(model, example[:1]),
                               "accuracy": evaluate(model) if evaluate else None}
    for batch in batches:
        x = example[:1].expand(batch, *example.shape[1:]).contiguous()
        timing = latencies(models, x, rounds, repeats)
        for arm, ms in timing.items():
            result["arms"][arm][f"latency_ms_batch{batch}"] = round(ms, 4)
            result["arms"][arm][f"speedup_batch{batch}"] = round(timing["dense"] / ms, 3)
    for arm in result["arms"].values():
        arm["bytes_vs_dense"] = round(arm["bytes"] / result["arms"]["dense"]["bytes"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    digits = load_digits()
    cnn = dense_model(digits)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                        nn.Linear(2048, 10))
    results = [
        bench("digits-cnn", cnn, digits.test_x[:64], [1, 64], args.rounds, args.repeats,
              evaluate=lambda m: accuracy(m, digits)),
        bench("mlp-784-2048-2048-10", mlp, torch.randn(64, 1, 28, 28), [1, 64], args.rounds, args.repeats),
    ]
    print(json.dumps({"torch": torch.__version__, "engine": torch.backends.quantized.engine, "threads": 1,
                      "rounds": args.rounds, "repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
