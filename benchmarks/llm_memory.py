"""Peak memory and time of streaming Wanda / SparseGPT on a LLaMA checkpoint larger than 8 GB.

1. Writes (once, cached under $SECATEURS_CACHE or ~/.cache/secateurs) a random-init
   LLaMA-architecture checkpoint in fp32, shard by shard, never holding the whole model:
   hidden 2048, intermediate 5632, 45 layers, vocab 32000, 32 heads / 8 key-value heads,
   untied head: 2.16 G parameters, 8.64 GB (8.05 GiB).
2. Prunes it to 50% with `secateurs.llm.stream.prune_pretrained`, once with Wanda and once
   with SparseGPT, each in a fresh subprocess, from a few windows of 128 random token ids.
   Measured per run: the child's peak resident set (psutil polling of the child every 50 ms,
   and the child's own ru_maxrss, which catches spikes between polls), wall time, and the
   resident set right after importing torch, secateurs and transformers' LLaMA code (the
   floor they cost by themselves); the resident set every 30 s goes in the JSON too.
   The parent's getrusage(RUSAGE_CHILDREN).ru_maxrss, the largest of all children, is
   printed too. Each output folder is checked (the index's total size equals the input's,
   the first block's down projection is 50% sparse) and then deleted. `--pattern 2:4`
   prunes to N:M instead of 50% unstructured.

    .venv/bin/python benchmarks/llm_memory.py [--layers 45] [--windows 4] [--threads 1]
                                               [--methods wanda sparsegpt] [--pattern 2:4]

Prints one JSON object on stdout; progress goes to stderr. Needs about 2 x 8.7 GB of disk.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dataclasses import dataclass

import psutil

STD = 0.02
GB = 1e9
TRACE_SECONDS = 30  # how often the resident set is recorded for the trace in the JSON


def cache_root() -> Path:
    root = os.environ.get("SECATEURS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "secateurs"
    return Path(root)


def log(*items: object) -> None:
    print(*items, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Shapes:
    """The sizes of a LLaMA-architecture model (this benchmark's default: 2.16 G parameters at 45 layers)."""

    hidden: int = 2048
    intermediate: int = 5632
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 8

    def block(self) -> dict[str, tuple[int, ...]]:
        """Local name -> shape of every tensor of one LLaMA decoder layer."""
        head_dim = self.hidden // self.heads
        return {
            "input_layernorm.weight": (self.hidden,),
            "self_attn.q_proj.weight": (self.heads * head_dim, self.hidden),
            "self_attn.k_proj.weight": (self.kv_heads * head_dim, self.hidden),
            "self_attn.v_proj.weight": (self.kv_heads * head_dim, self.hidden),
            "self_attn.o_proj.weight": (self.hidden, self.heads * head_dim),
            "post_attention_layernorm.weight": (self.hidden,),
            "mlp.gate_proj.weight": (self.intermediate, self.hidden),
            "mlp.up_proj.weight": (self.intermediate, self.hidden),
            "mlp.down_proj.weight": (self.hidden, self.intermediate),
        }

    def block_params(self) -> int:
        return sum(math.prod(s) for s in self.block().values())


LLAMA_2B = Shapes()
HIDDEN, VOCAB = LLAMA_2B.hidden, LLAMA_2B.vocab


def _tensor(shape: tuple[int, ...], name: str, generator, dtype):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * STD).to(dtype)


def write_checkpoint(folder: Path, layers: int, shapes: Shapes = LLAMA_2B, dtype=None) -> int:
    """Write the random checkpoint shard by shard (one per layer, fp32 unless `dtype`); return its weight bytes."""
    import torch
    import transformers
    from safetensors.torch import save_file

    dtype = dtype or torch.float32
    stage = folder.with_name(folder.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shards = [{"model.embed_tokens.weight": (shapes.vocab, shapes.hidden)}]
    shards += [{f"model.layers.{i}.{k}": s for k, s in shapes.block().items()} for i in range(layers)]
    shards += [{"model.norm.weight": (shapes.hidden,), "lm_head.weight": (shapes.vocab, shapes.hidden)}]
    weight_map, total = {}, 0
    for k, group in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _tensor(s, n, generator, dtype) for n, s in group.items()}
        save_file(tensors, str(stage / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        log(f"  wrote {name} ({total / GB:.2f} GB so far)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = transformers.LlamaConfig(
        vocab_size=shapes.vocab, hidden_size=shapes.hidden, intermediate_size=shapes.intermediate,
        num_hidden_layers=layers, num_attention_heads=shapes.heads, num_key_value_heads=shapes.kv_heads,
        tie_word_embeddings=False, initializer_range=STD, architectures=["LlamaForCausalLM"])
    config.save_pretrained(stage)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(stage)
    stage.rename(folder)
    return total


def checkpoint(layers: int) -> tuple[Path, int]:
    folder = cache_root() / f"llama-random-{layers}l-fp32"
    if not (folder / "model.safetensors.index.json").is_file():
        need = (layers * LLAMA_2B.block_params() + 2 * VOCAB * HIDDEN) * 4 * 1.05
        free = shutil.disk_usage(folder.parent if folder.parent.exists() else Path.home()).free
        if free < need:
            raise SystemExit(f"need {need / GB:.1f} GB free for the checkpoint, have {free / GB:.1f} GB")
        log(f"writing the checkpoint to {folder}")
        write_checkpoint(folder, layers)
    total = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    return folder, total


CHILD = r"""
import json, resource, sys, time
import psutil, torch
torch.set_num_threads(int(sys.argv[4]))
from secateurs.llm import LLMConfig
from secateurs.llm.stream import prune_pretrained
import transformers
transformers.LlamaForCausalLM  # the lazy import of the modeling code, part of the floor
after_imports = psutil.Process().memory_info().rss
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 32000, (1, 128), generator=g) for _ in range(int(sys.argv[5]))]
start = time.perf_counter()
pattern = None if sys.argv[6] == "none" else sys.argv[6]
plan = prune_pretrained(sys.argv[1], sys.argv[2], batches, LLMConfig(method=sys.argv[3], sparsity=0.5, pattern=pattern))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_after_imports": after_imports,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "layers_pruned": len(plan.layers),
                  "mean_sparsity": sum(r.sparsity for r in plan.layers) / len(plan.layers)}))
"""


def run_child(src: Path, out: Path, method: str, threads: int, windows: int, pattern: str) -> dict:
    """Prune in a fresh process, polling its resident set; the child's JSON plus the polled peak."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out), method, str(threads), str(windows),
                              pattern],
                             stdout=subprocess.PIPE, env=env, text=True)
    handle, peak, trace = psutil.Process(child.pid), 0, []
    while child.poll() is None:
        try:
            rss = handle.memory_info().rss
        except psutil.NoSuchProcess:
            break
        peak = max(peak, rss)
        if time.perf_counter() - start >= TRACE_SECONDS * len(trace):
            trace.append(round(rss / GB, 2))
        time.sleep(0.05)
    stdout = child.stdout.read()
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"{method} run failed with status {child.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "polled_peak_rss": peak, "wall_seconds": wall, f"rss_gb_every_{TRACE_SECONDS}s": trace}


def check_output(out: Path, total: int, pattern: str) -> dict:
    """Sizes from the index, and the sparsity (and N:M pattern) of the first block's down projection."""
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.down_proj.weight"
    with safe_open(str(out / index["weight_map"][name]), "pt") as handle:
        weight = handle.get_tensor(name)
    result = {"total_size_matches": index["metadata"]["total_size"] == total,
              "down_proj_0_sparsity": float((weight == 0).float().mean())}
    if pattern != "none":
        n, m = map(int, pattern.split(":"))
        result["down_proj_0_follows_pattern"] = bool(((weight != 0).reshape(-1, m).sum(1) <= n).all())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=45)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--pattern", default="none", help="N:M pattern such as 2:4; none = 50%% unstructured")
    args = parser.parse_args()
    src, total = checkpoint(args.layers)
    results = {"checkpoint": str(src), "weights_bytes": total, "weights_gib": total / 2**30,
               "layers": args.layers, "windows": args.windows, "tokens_per_window": 128,
               "threads": args.threads, "pattern": args.pattern, "ram_total_gb": psutil.virtual_memory().total / GB,
               "cpus": os.cpu_count(), "runs": {}}
    for method in args.methods:
        out = src.parent / f"{src.name}-pruned-{method}-{args.pattern.replace(':', 'of')}"
        shutil.rmtree(out, ignore_errors=True)
        if shutil.disk_usage(src.parent).free < total * 1.05:
            raise SystemExit(f"need {total * 1.05 / GB:.1f} GB free for the output")
        log(f"pruning with {method}")
        try:
            run = run_child(src, out, method, args.threads, args.windows, args.pattern)
            run.update(check_output(out, total, args.pattern))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        run["peak_rss_gb"] = max(run["polled_peak_rss"], run["ru_maxrss"]) / GB
        results["runs"][method] = run
        log(json.dumps({method: run}))
    results["children_ru_maxrss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
