"""Seconds per block and peak GPU memory of pruning a LLaMA-7B-shaped checkpoint streamed onto one GPU.

1. Writes (once, cached under $SECATEURS_CACHE or ~/.cache/secateurs) a random-init
   checkpoint with LLaMA-7B's shapes in fp16, shard by shard (benchmarks/llm_memory.py's
   writer): hidden 4096, intermediate 11008, 32 heads (no GQA), vocab 32000, 32 layers:
   6.74 G parameters, 13.5 GB. SparseGPT runs on a checkpoint of the same shapes with
   `--sparsegpt-layers` layers (default 4): its ~10 s a block times 32 would not fit.
2. Prunes each with `secateurs.llm.stream.prune_pretrained(..., device="cuda")` from
   `--windows` x `--seqlen` random token ids (default 128 x 2048, the papers' calibration):
   the model is never in memory; each block is read from the shards, onloaded to the GPU
   with the calibration activations, pruned, run for the next block's inputs and written.
   Runs: Wanda, SparseGPT and magnitude (no calibration pass) at 50%.
3. Records per run: seconds per block (median, min, max; from `plan.block_seconds`), the
   summed per-layer pruning step (the papers' "pruning metric" time: Wanda paper, LLaMA-7B,
   SparseGPT 203 s, Wanda 0.5 s), the whole call, peak GPU memory
   (torch.cuda.max_memory_allocated / reserved), and the first block's down projection
   sparsity in the output folder. Each output is deleted after its check.
4. The 2:4 kernel: one 11008 x 4096 fp16 linear over 4096 tokens, dense against
   torch's semi-structured sparse (to_sparse_semi_structured), median of 50 calls.

    python benchmarks/llm_gpu.py                    # on the GPU machine; about 5 minutes on an H200
    python benchmarks/llm_gpu.py --tiny             # dry run on the CPU with tiny shapes (seconds)
        [--layers 32] [--sparsegpt-layers 4] [--windows 128] [--seqlen 2048] [--offload-inputs]
        [--methods wanda sparsegpt magnitude] [--deadline 420]

`--deadline` seconds after the start, runs not yet begun are skipped (recorded as such),
so the script ends within the device's time limit. Prints one JSON object on stdout;
progress goes to stderr. Needs about 30 GB of disk (the checkpoint and one output).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_memory import Shapes, cache_root, log, write_checkpoint  # noqa: E402

LLAMA_7B = Shapes(hidden=4096, intermediate=11008, vocab=32000, heads=32, kv_heads=32)
TINY = Shapes(hidden=64, intermediate=160, vocab=256, heads=4, kv_heads=4)
GB = 1e9


def checkpoint(shapes: Shapes, layers: int, tiny: bool) -> Path:
    """The cached random fp16 checkpoint with `layers` layers of `shapes`."""
    folder = cache_root() / f"llama-random-{shapes.hidden}h-{layers}l-fp16{'-tiny' if tiny else ''}"
    if not (folder / "model.safetensors.index.json").is_file():
        log(f"writing the checkpoint to {folder}")
        write_checkpoint(folder, layers, shapes, torch.float16)
    return folder


def calibration(windows: int, seqlen: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(windows)]


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peaks(device: str) -> dict[str, float]:
    if not device.startswith("cuda"):
        return {}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB}


def _down_proj_sparsity(out: Path) -> float:
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.down_proj.weight"
    with safe_open(str(out / index["weight_map"][name]), "pt") as handle:
        return float((handle.get_tensor(name) == 0).float().mean())


def prune_run(src: Path, method: str, batches: list[torch.Tensor], device: str, offload: bool) -> dict:
    """One streamed prune of `src` on `device`; its timings, memory and a check of the output."""
    from secateurs.llm.stream import prune_pretrained

    out = src.with_name(f"{src.name}-pruned-{method}")
    shutil.rmtree(out, ignore_errors=True)
    _peak_reset(device)
    start = time.perf_counter()
    try:
        plan = prune_pretrained(src, out, batches if method != "magnitude" else [], method=method, sparsity=0.5,
                                device=device, offload_inputs=offload)
        seconds = time.perf_counter() - start
        result = {"seconds": seconds, **_peaks(device), "down_proj_0_sparsity": _down_proj_sparsity(out)}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    blocks = plan.block_seconds
    return {**result, "blocks": len(blocks), "block_seconds_median": statistics.median(blocks),
            "block_seconds_min": min(blocks), "block_seconds_max": max(blocks),
            "layer_prune_seconds_sum": sum(r.seconds for r in plan.layers),
            "layer_prune_seconds_per_block": sum(r.seconds for r in plan.layers) / len(blocks)}


def semi_structured(device: str, shapes: Shapes, tokens: int = 4096, calls: int = 50) -> dict:
    """Dense against torch's 2:4 semi-structured kernel on one up-projection-sized fp16 linear."""
    if not device.startswith("cuda"):
        return {"skipped": "needs CUDA"}
    from torch.sparse import to_sparse_semi_structured

    from secateurs.sparsity import nm_mask

    weight = torch.randn(shapes.intermediate, shapes.hidden, device=device, dtype=torch.float16)
    weight = weight * nm_mask(weight.abs(), 2, 4)
    x = torch.randn(tokens, shapes.hidden, device=device, dtype=torch.float16)
    sparse = to_sparse_semi_structured(weight)

    def median_ms(fn) -> float:
        times = []
        for _ in range(calls + 5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times[5:])
    dense_ms = median_ms(lambda: torch.nn.functional.linear(x, weight))
    sparse_ms = median_ms(lambda: torch.nn.functional.linear(x, sparse))
    return {"shape": [shapes.intermediate, shapes.hidden], "tokens": tokens, "dense_ms": dense_ms,
            "semi_structured_ms": sparse_ms, "speedup": dense_ms / sparse_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="dry run: tiny shapes, few windows, on the CPU")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--sparsegpt-layers", type=int, default=4)
    parser.add_argument("--windows", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--offload-inputs", action="store_true")
    # Wanda first: the run that matters most if the deadline cuts the rest
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "magnitude"])
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds; later runs are skipped")
    args = parser.parse_args()
    start = time.perf_counter()
    shapes = TINY if args.tiny else LLAMA_7B
    layers = args.layers or (4 if args.tiny else 32)
    windows, seqlen = args.windows or (4 if args.tiny else 128), args.seqlen or (32 if args.tiny else 2048)
    device = args.device or ("cpu" if args.tiny else "cuda")
    report = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "shapes": vars(shapes), "layers": layers, "windows": windows,
              "seqlen": seqlen, "dtype": "float16", "offload_inputs": args.offload_inputs,
              "references_pruning_metric_seconds_llama7b": {"sparsegpt": 203, "wanda": 0.5}, "runs": {}}
    report["semi_structured_2of4"] = semi_structured(device, shapes)
    batches = calibration(windows, seqlen, shapes.vocab)
    for method in args.methods:
        if time.perf_counter() - start > args.deadline:
            report["runs"][method] = {"skipped": f"past the {args.deadline:.0f} s deadline"}
            continue
        count = min(layers, args.sparsegpt_layers) if method == "sparsegpt" else layers
        src = checkpoint(shapes, count, args.tiny)
        log(f"{method}: {count} layers on {device}")
        report["runs"][method] = prune_run(src, method, batches, device, args.offload_inputs)
        log(json.dumps({method: report["runs"][method]}))
    report["total_seconds"] = time.perf_counter() - start
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
