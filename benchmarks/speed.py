"""Really faster where it runs: secateurs' structured cuts against Torch-Pruning's, at the same MACs.

For each model (plain-torch reference networks from `secateurs.examples.zoo`, random
init) every arm prunes its own copy of one dense model with the L2-magnitude criterion:

- `tp_uniform`: Torch-Pruning 1.6.1, `MetaPruner(pruning_ratio=0.5)` (half of every
  layer's channels, the classifier kept; its defaults otherwise);
- `tp_round8`: the same with `round_to=8`;
- `sc_target`: secateurs `target="macs=<f>"`, f the fraction Torch-Pruning reached, with
  its defaults: one ratio for every group (scope "local") and `round_to="auto"` (free on
  the CPU, 8 for fp16/bf16 on a GPU);
- `sc_target_round8`: the same target with `round_to=8`;
- `sc_target_global`: the same target with `scope="global"`: units ranked across groups
  (uneven widths);
- `sc_uniform_round8`: secateurs `ratio=0.5` (half of every group, Torch-Pruning's shape)
  with `round_to=8`.

Measured per arm: prune seconds, the MAC reduction (the ideal speedup), and latency at
each batch size with the arms interleaved (the order alternating every round), medians
and relative spreads. On the CPU (`--device cpu`): torch eager at `--threads` threads and,
with `--onnx`, onnxruntime at the same thread count. On a GPU (`--device cuda`): the model
moved to the GPU (secateurs' arms are pruned there, in the GPU dtype), channels_last for
CNNs, cudnn.benchmark, timed with CUDA events. The figures of merit: speedup / MAC
reduction, and each arm's speedup over Torch-Pruning's best arm's. Prints one JSON object.

Torch-Pruning is not a dependency of secateurs; install it for this benchmark only:

    .venv/bin/python -m pip install --constraint constraints.txt --no-deps torch-pruning==1.6.1
    .venv/bin/python benchmarks/speed.py --device cpu --threads 2 --batches 1 32 [--onnx]
    python benchmarks/speed.py --device cuda --batches 1 256 --rounds 5   # the GPU rows: fp16 and bf16, < 8 min on an H200
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from secateurs.examples.zoo import mobilenet_v2, resnet18, resnet_bottleneck, vit
from secateurs.measure import count_macs
from secateurs.structured import prune_structured

try:
    import torch_pruning
except ImportError:
    torch_pruning = None

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    classifier: str          # the layer Torch-Pruning is told to ignore (its output is the logits)
    cnn: bool                # channels_last on a GPU


def cases(quick: bool) -> list[Case]:
    if quick:   # small widths and inputs: a dry run of the whole script in seconds
        return [Case("resnet18", lambda: resnet18(width=16), (3, 64, 64), "head.fc", True),
                Case("vit", lambda: vit(img=64, dim=96, heads=6, depth=2), (3, 64, 64), "head", False)]
    return [
        Case("resnet18-128px", lambda: resnet18(num_classes=1000, width=64), (3, 128, 128), "head.fc", True),
        Case("resnet50-128px", lambda: resnet_bottleneck(num_classes=1000), (3, 128, 128), "head.fc", True),
        Case("mobilenet_v2-224px", lambda: mobilenet_v2(num_classes=1000), (3, 224, 224), "head.fc", True),
        Case("vit-b16-224px", lambda: vit(dim=768, heads=12, depth=12), (3, 224, 224), "head", False),
    ]


def torch_pruning_prune(model: nn.Module, x: torch.Tensor, classifier: str, round_to: int | None) -> None:
    """Torch-Pruning's channel-uniform L2 cut of half of every layer, in place (its defaults otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = torch_pruning.pruner.MetaPruner(
            model, x, importance=torch_pruning.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
            global_pruning=False, ignored_layers=[model.get_submodule(classifier)], round_to=round_to)
        pruner.step()


def arms(case: Case, dense: nn.Module, x: torch.Tensor, device: torch.device,
         dtype: torch.dtype) -> dict[str, tuple[nn.Module, float]]:
    """Arm name -> (its pruned model on `device` in `dtype`, prune seconds)."""
    out: dict[str, tuple[nn.Module, float]] = {"dense": (dense.to(device, dtype), 0.0)}
    cpu_x = x.cpu().float()
    fraction = 0.25
    if torch_pruning is not None:
        for arm, round_to in (("tp_uniform", None), ("tp_round8", 8)):
            model = copy.deepcopy(dense).cpu().float()
            start = time.perf_counter()
            torch_pruning_prune(model, cpu_x, case.classifier, round_to)
            out[arm] = (model.to(device, dtype), time.perf_counter() - start)
        fraction = count_macs(out["tp_uniform"][0].cpu().float(), cpu_x)[0] / count_macs(dense.cpu().float(), cpu_x)[0]
    example = x.to(device, dtype)
    secateurs_arms = {"sc_target": {"target": f"macs={fraction:.4f}"},
                      "sc_target_round8": {"target": f"macs={fraction:.4f}", "round_to": 8},
                      "sc_target_global": {"target": f"macs={fraction:.4f}", "scope": "global"},
                      "sc_uniform_round8": {"ratio": 0.5, "round_to": 8}}
    for arm, options in secateurs_arms.items():
        model = copy.deepcopy(dense).to(device, dtype)   # pruned where it runs, in its own dtype
        start = time.perf_counter()
        prune_structured(model, example, **options)
        out[arm] = (model, time.perf_counter() - start)
    dense.to(device, dtype)
    return out


def cpu_timer(model: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter()
        model(x)
        return (time.perf_counter() - start) * 1e3
    return once


def cuda_timer(model: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int = 10) -> Callable[[], float]:
    """Milliseconds per call, from CUDA events around `repeats` back-to-back calls."""
    def once() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            model(x)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats
    return once


def ort_runner(model: nn.Module, x: torch.Tensor, threads: int, folder: Path, name: str) -> Callable[[torch.Tensor], object]:
    import onnxruntime as ort

    from secateurs.export import export_onnx

    path = export_onnx(model, x[:1], folder / f"{name}.onnx").path
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    return lambda batch: session.run(None, {feed: batch.numpy()})


def interleaved(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each timer once per round after one warm-up call, the order alternating every round."""
    times = {name: [] for name in timers}
    for timer in timers.values():
        timer()
    for r in range(rounds):
        for name in (list(timers) if r % 2 == 0 else list(reversed(timers))):
            times[name].append(timers[name]())
    return times


def summary(times: dict[str, list[float]], reductions: dict[str, float]) -> dict[str, dict]:
    ms = {arm: statistics.median(t) for arm, t in times.items()}
    speedup = {arm: ms["dense"] / t for arm, t in ms.items()}
    tp_best = max((speedup[a] for a in speedup if a.startswith("tp_")), default=None)
    return {arm: {"ms": round(t, 3),
                  "spread": round((max(times[arm]) - min(times[arm])) / t, 3),
                  "speedup": round(speedup[arm], 3),
                  "speedup_over_ideal": round(speedup[arm] / reductions[arm], 3),
                  "vs_torch_pruning_best": round(speedup[arm] / tp_best, 3) if tp_best else None}
            for arm, t in ms.items()}


def bench(case: Case, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    dense = case.build().eval()
    x1 = torch.randn(1, *case.shape)
    models = arms(case, dense, x1, device, dtype)
    dense_macs = count_macs(copy.deepcopy(dense).cpu().float(), x1)[0]
    reductions = {arm: dense_macs / count_macs(copy.deepcopy(m).cpu().float(), x1)[0] for arm, (m, _) in models.items()}
    if device.type == "cuda" and case.cnn:
        for model, _ in models.values():
            model.to(memory_format=torch.channels_last)
    result = {"model": case.name, "input": list(case.shape), "macs": dense_macs,
              "arms": {arm: {"mac_reduction": round(reductions[arm], 3), "prune_s": round(s, 3)}
                       for arm, (_, s) in models.items()},
              "eager": {}, "onnxruntime": {}}
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        runners = {arm: ort_runner(m, x1, args.threads, Path(tmp), f"{case.name}-{arm}")
                   for arm, (m, _) in models.items()} if args.onnx and device.type == "cpu" else {}
        for batch in args.batches:
            x = torch.randn(batch, *case.shape).to(device, dtype)
            if device.type == "cuda" and case.cnn:
                x = x.to(memory_format=torch.channels_last)
            make = cuda_timer if device.type == "cuda" else cpu_timer
            times = interleaved({arm: make(m, x) for arm, (m, _) in models.items()}, args.rounds)
            result["eager"][f"batch{batch}"] = summary(times, reductions)
            if runners:
                times = interleaved({arm: cpu_timer(r, x) for arm, r in runners.items()}, args.rounds)
                result["onnxruntime"][f"batch{batch}"] = summary(times, reductions)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES),
                        help="one or more; default: fp32 on cpu, fp16 and bf16 on cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (torch and onnxruntime)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", nargs="*", default=None, help="a subset of the model names")
    parser.add_argument("--onnx", action="store_true", help="also time every arm in onnxruntime (CPU)")
    parser.add_argument("--quick", action="store_true", help="small models: a dry run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = args.dtype or (["fp16", "bf16"] if device.type == "cuda" else ["fp32"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    chosen = [c for c in cases(args.quick) if args.models is None or c.name in args.models]
    results = [{"dtype": name, **bench(case, args, device, DTYPES[name])} for name in dtypes for case in chosen]
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "torch": torch.__version__,
                      "torch_pruning": getattr(torch_pruning, "__version__", None), "rounds": args.rounds,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
