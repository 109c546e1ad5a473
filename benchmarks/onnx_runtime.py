"""Pruned models in onnxruntime: CPU latency of dense and pruned ONNX files against torch's.

For each model (ResNet-18 on 3x128x128 and ViT-S/16 on 3x224x224, from
`secateurs.examples.zoo`, random init), a copy is pruned with
`prune_structured(ratio=0.5)` (half of every group's channels and heads, as in
benchmarks/structured.py), and both the dense and the pruned model are exported with
`secateurs.export_onnx` (dynamic batch, checked against torch). Latency at each batch
size: the four arms (dense / pruned x torch / onnxruntime) run in turn, the order
rotating every round, `--repeats` calls per arm per round after a warm-up, medians over
`--rounds` rounds; torch and onnxruntime both at `--threads` intra-op threads (onnxruntime's
spinning threads turned off, so that they do not slow the arm after them).
Prints one JSON object.

    .venv/bin/python benchmarks/onnx_runtime.py [--threads 2] [--rounds 7] [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import onnxruntime as ort
import torch

from secateurs.examples.zoo import resnet18, vit
from secateurs.export import export_onnx
from secateurs.measure import count_macs
from secateurs.structured import prune_structured

MODELS = {
    "resnet18-128px": (lambda: resnet18(num_classes=1000, width=64), (3, 128, 128)),
    "vit-s": (lambda: vit(dim=384, heads=6, depth=12), (3, 224, 224)),
}


def runner_torch(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return model(x)
    return call


def runner_ort(path: Path, x: torch.Tensor, threads: int) -> Callable[[], object]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # onnxruntime's threads spin after each run by default, stealing the cores from the next arm
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feeds)


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each arm, the arms taking turns in a rotating order."""
    for call in calls.values():
        call()
    names, samples = list(calls), {name: [] for name in calls}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for _ in range(repeats):
                calls[name]()
            samples[name].append((time.perf_counter() - start) * 1e3 / repeats)
    return {name: round(statistics.median(values), 3) for name, values in samples.items()}


def bench(name: str, threads: int, rounds: int, repeats: int, folder: Path) -> dict:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    dense = build().eval()
    x1 = torch.randn(1, *shape)
    pruned = copy.deepcopy(dense)
    prune_structured(pruned, x1, 0.5)
    reduction = count_macs(dense, x1)[0] / count_macs(pruned, x1)[0]
    files = {}
    for arm, model in (("dense", dense), ("pruned", pruned)):
        report = export_onnx(model, x1, folder / f"{name}-{arm}.onnx")
        files[arm] = {"bytes": report.bytes, "max_abs_diff": report.max_abs_diff}
    result = {"model": name, "mac_reduction": round(reduction, 3), "onnx": files, "batches": {}}
    for batch in (1, 32):
        x = torch.randn(batch, *shape)
        calls = {"torch dense": runner_torch(dense, x), "torch pruned": runner_torch(pruned, x),
                 "onnxruntime dense": runner_ort(folder / f"{name}-dense.onnx", x, threads),
                 "onnxruntime pruned": runner_ort(folder / f"{name}-pruned.onnx", x, threads)}
        ms = interleaved(calls, rounds, repeats if batch == 1 else 1)
        result["batches"][batch] = {
            "ms": ms,
            "speedup_torch": round(ms["torch dense"] / ms["torch pruned"], 2),
            "speedup_onnxruntime": round(ms["onnxruntime dense"] / ms["onnxruntime pruned"], 2),
            "speedup_over_mac_reduction_onnxruntime":
                round(ms["onnxruntime dense"] / ms["onnxruntime pruned"] / reduction, 2),
            "onnxruntime_vs_torch_pruned": round(ms["torch pruned"] / ms["onnxruntime pruned"], 2),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5, help="calls per arm per round at batch 1 (batch 32: 1)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench(name, args.threads, args.rounds, args.repeats, Path(tmp)) for name in args.models]
    print(json.dumps({"torch": torch.__version__, "onnxruntime": ort.__version__, "threads": args.threads,
                      "rounds": args.rounds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
