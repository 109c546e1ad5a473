"""Unstructured masks, secateurs vs torch.nn.utils.prune, on the same MLP.

Both tools prune 50% of every Linear weight by one global L1 magnitude ranking
(secateurs: ``prune(model, "magnitude", 0.5, scope="global", prune_last=True)``;
torch: ``prune.global_unstructured(..., prune.L1Unstructured, amount=0.5)``). Measured:

1. prune time: wall time of that one call, in fresh processes, A/B interleaved;
2. prune peak memory: the process's high-water mark (``ru_maxrss``) after the call
   minus its resident size (psutil RSS) just before, in the same fresh processes;
3. fine-tune step time: forward + backward + SGD (momentum, weight decay) step, with
   secateurs' `keep_sparse` hooks or torch prune's forward pre-hook, interleaved in
   rotating rounds with an unpruned (dense) model as the reference;
4. bytes held by the model: every distinct tensor storage its modules hold (parameters,
   buffers and plain tensor attributes such as torch prune's recomputed ``weight``),
   while masked and after ``finalize`` / ``prune.remove``.

It also asserts that both leave exactly 50% zeros across the pruned layers and that
their masks agree everywhere except among weights tied at the threshold magnitude.

    .venv/bin/python benchmarks/unstructured.py [--quick] [--threads 1]

Prints one JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

import secateurs

SPARSITY = 0.5
TOOLS = ("secateurs", "torch")
ARMS = (*TOOLS, "dense")   # fine-tune arms; dense is the unpruned reference


@dataclass(frozen=True)
class Setup:
    """The model and workload sizes of one run."""

    widths: tuple[int, ...]   # MLP layer widths, input first, classes last
    batch: int
    prune_repeats: int        # fresh processes per tool for prune time and memory
    step_rounds: int          # rounds of fine-tune steps; every arm runs once per round
    steps_per_round: int      # consecutive timed steps of one arm within a round


FULL = Setup(widths=(1024, 4096, 4096, 2048, 10), batch=64, prune_repeats=4,
             step_rounds=12, steps_per_round=2)
QUICK = Setup(widths=(256, 1024, 1024, 512, 10), batch=32, prune_repeats=2,
              step_rounds=3, steps_per_round=2)


# --- the model and what both tools see of it -------------------------------------------

def build_model(widths: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    """The same ReLU MLP (same weights) in every process."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def prune_secateurs(model: nn.Module) -> None:
    plan = secateurs.prune(model, "magnitude", SPARSITY, scope="global", prune_last=True)
    expected = [f"{name}.weight" for name, _ in linears(model)]
    assert [layer.name for layer in plan.layers] == expected, "secateurs pruned other layers"


def prune_torch(model: nn.Module) -> None:
    params = [(m, "weight") for _, m in linears(model)]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=SPARSITY)


def finalize_secateurs(model: nn.Module) -> None:
    secateurs.finalize(model)


def finalize_torch(model: nn.Module) -> None:
    for _, m in linears(model):
        torch_prune.remove(m, "weight")


PRUNE = {"secateurs": prune_secateurs, "torch": prune_torch}
FINALIZE = {"secateurs": finalize_secateurs, "torch": finalize_torch}


def keep_masks(tool: str, model: nn.Module) -> list[torch.Tensor]:
    """Each pruned layer's mask as bool, True = kept."""
    suffix = "weight_prune_mask" if tool == "secateurs" else "weight_mask"
    return [getattr(m, suffix).bool() for _, m in linears(model)]


def used_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights forward actually multiplies by (torch prune's is recomputed per call)."""
    return [m.weight.detach() for _, m in linears(model)]


def zero_count(model: nn.Module) -> tuple[int, int]:
    """(zeros, total) over the pruned layers' weights."""
    weights = used_weights(model)
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def held_bytes(model: nn.Module) -> int:
    """Bytes of every distinct storage the modules hold: parameters, buffers, tensor attributes."""
    storages: dict[int, int] = {}
    for module in model.modules():
        tensors = [*module._parameters.values(), *module._buffers.values(),
                   *(v for v in vars(module).values() if isinstance(v, torch.Tensor))]
        for t in tensors:
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def weight_bytes(model: nn.Module) -> int:
    return sum(w.numel() * w.element_size() for w in used_weights(model))


# --- workers: each runs in a fresh process and prints one JSON line ---------------------

def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker_prune(tool: str, setup: Setup) -> dict:
    """Time, peak memory and held bytes of one prune + finalize in this fresh process."""
    PRUNE[tool](build_model((64, 64, 10)))  # first-call costs (lazy imports, kernels) go here
    model = build_model(setup.widths)
    gc.collect()
    rss_before, max_before = psutil.Process().memory_info().rss, max_rss_bytes()
    start = time.perf_counter()
    PRUNE[tool](model)
    seconds = time.perf_counter() - start
    max_after, rss_after = max_rss_bytes(), psutil.Process().memory_info().rss
    zeros, total = zero_count(model)
    masked = held_bytes(model)
    FINALIZE[tool](model)
    return {
        "prune_s": seconds,
        # when the call never rose above the earlier high-water mark, the peak is unknown
        "peak_extra_bytes": max_after - rss_before if max_after > max_before else None,
        "rss_after_extra_bytes": rss_after - rss_before,
        "zeros": zeros, "total": total,
        "held_masked_bytes": masked, "held_final_bytes": held_bytes(model),
        "final_zeros": zero_count(model)[0],
    }


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


Trainee = tuple[nn.Module, torch.optim.Optimizer]


def make_trainee(arm: str, setup: Setup) -> Trainee:
    """A model and its optimizer: pruned by `arm` (with keep_sparse for secateurs), or dense."""
    model = build_model(setup.widths)
    if arm in PRUNE:
        PRUNE[arm](model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    if arm == "secateurs":
        secateurs.keep_sparse(optimizer, model)
    return model, optimizer


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor))


def grad_bytes(model: nn.Module) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def time_steps(trainees: dict[str, Trainee], setup: Setup) -> dict[str, list[float]]:
    """Milliseconds per step of each arm, in rounds whose order rotates so no arm always goes first."""
    torch.manual_seed(1)
    x = torch.randn(setup.batch, setup.widths[0])
    y = torch.randint(0, setup.widths[-1], (setup.batch,))
    for model, optimizer in trainees.values():  # warm-up: optimizer state, allocator
        for _ in range(2):
            train_step(model, optimizer, x, y)
    arms = list(trainees)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for round_index in range(setup.step_rounds):
        shift = round_index % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            model, optimizer = trainees[arm]
            for _ in range(setup.steps_per_round):
                start = time.perf_counter()
                train_step(model, optimizer, x, y)
                times[arm].append((time.perf_counter() - start) * 1e3)
    return times


def worker_steps(setup: Setup) -> dict:
    """Mask agreement right after pruning, then fine-tune step times and training footprint."""
    trainees = {arm: make_trainee(arm, setup) for arm in ARMS}
    agreement = check_agreement(trainees["secateurs"][0], trainees["torch"][0], build_model(setup.widths))
    times = time_steps(trainees, setup)
    result = {"agreement": agreement}
    for arm, (model, optimizer) in trainees.items():
        if arm in PRUNE:
            zeros, total = zero_count(model)
            assert zeros == round(SPARSITY * total), f"{arm}: sparsity drifted during training"
        result[arm] = {
            "step_ms": times[arm],
            "train_held_bytes": held_bytes(model) + grad_bytes(model) + optimizer_bytes(optimizer),
        }
    return result


def check_agreement(secateurs_model: nn.Module, torch_model: nn.Module, original: nn.Module) -> dict:
    """Assert exact 50% zeros and masks that agree except among weights tied at the threshold."""
    magnitudes = torch.cat([w.abs().reshape(-1) for w in used_weights(original)])
    keep_s = torch.cat([m.reshape(-1) for m in keep_masks("secateurs", secateurs_model)])
    keep_t = torch.cat([m.reshape(-1) for m in keep_masks("torch", torch_model)])
    pruned = round(SPARSITY * keep_s.numel())
    assert int((~keep_s).sum()) == int((~keep_t).sum()) == pruned, "pruned counts differ"
    threshold = magnitudes.kthvalue(pruned).values  # magnitude of the last weight pruned
    differ = keep_s != keep_t
    assert bool((magnitudes[differ] == threshold).all()), "masks differ beyond ties at the threshold"
    for tool, model in (("secateurs", secateurs_model), ("torch", torch_model)):
        zeros, total = zero_count(model)
        assert zeros == pruned, f"{tool} left {zeros} zeros of {total}, expected {pruned}"
    return {
        "pruned_weights": pruned,
        "weights_at_threshold": int((magnitudes == threshold).sum()),
        "mask_differences": int(differ.sum()),
        "masks_identical": not bool(differ.any()),
    }


# --- the driver -----------------------------------------------------------------------

def run_worker(argv: list[str]) -> dict:
    """Run this file as a worker in a fresh interpreter and parse its JSON line."""
    # stderr passes through, so a failed assertion in a worker shows its traceback
    done = subprocess.run([sys.executable, __file__, *argv], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize_prunes(runs: dict[str, list[dict]]) -> dict:
    """Medians over the fresh-process prune runs, after checking each left exactly 50% zeros."""
    summary = {}
    for tool, records in runs.items():
        assert all(r["zeros"] == round(SPARSITY * r["total"]) == r["final_zeros"] for r in records), \
            f"{tool} did not leave exactly {SPARSITY:.0%} zeros"
        summary[tool] = {
            "prune_s_median": median([r["prune_s"] for r in records]),
            "prune_s_all": [r["prune_s"] for r in records],
            "prune_peak_extra_bytes_median": median([r["peak_extra_bytes"] for r in records]),
            "prune_rss_after_extra_bytes_median": median([r["rss_after_extra_bytes"] for r in records]),
            "held_masked_bytes": records[0]["held_masked_bytes"],
            "held_final_bytes": records[0]["held_final_bytes"],
        }
    return summary


def summarize_steps(steps: dict, results: dict) -> None:
    """Add each arm's median step time and training footprint to `results`."""
    dense_ms = statistics.median(steps["dense"]["step_ms"])
    for arm in ARMS:
        record = results.setdefault(arm, {})
        record["step_ms_median"] = statistics.median(steps[arm]["step_ms"])
        record["step_ms_over_dense"] = record["step_ms_median"] / dense_ms
        record["step_ms_all"] = steps[arm]["step_ms"]
        record["train_held_bytes"] = steps[arm]["train_held_bytes"]


def run_all(setup: Setup, threads: int, quick: bool) -> dict:
    """Every measurement, each in fresh worker processes; returns the JSON report."""
    common = ["--threads", str(threads)] + (["--quick"] if quick else [])
    prunes: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
    for repeat in range(setup.prune_repeats):
        for tool in (TOOLS if repeat % 2 == 0 else TOOLS[::-1]):
            print(f"prune {tool} {repeat + 1}/{setup.prune_repeats}", file=sys.stderr)
            prunes[tool].append(run_worker(["--worker", "prune", "--tool", tool, *common]))
    print("mask agreement and fine-tune steps", file=sys.stderr)
    steps = run_worker(["--worker", "steps", *common])
    results = summarize_prunes(prunes)
    summarize_steps(steps, results)
    ratios = {  # torch / secateurs: above 1 means secateurs is faster or smaller
        key: results["torch"][key] / results["secateurs"][key]
        for key in ("prune_s_median", "prune_peak_extra_bytes_median", "step_ms_median",
                    "held_masked_bytes", "train_held_bytes")
        if results["torch"][key] and results["secateurs"][key]
    }
    model = build_model(setup.widths)
    return {
        "setup": {"widths": list(setup.widths), "batch": setup.batch, "threads": threads,
                  "prune_repeats": setup.prune_repeats,
                  "steps_timed_per_arm": setup.step_rounds * setup.steps_per_round,
                  "torch": torch.__version__, "secateurs": secateurs.__version__,
                  "cpus": psutil.cpu_count()},
        "model": {"params": sum(p.numel() for p in model.parameters()),
                  "param_bytes": held_bytes(model), "pruned_weight_bytes": weight_bytes(model)},
        "agreement": steps["agreement"],
        "results": results,
        "ratio_torch_over_secateurs": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few repeats (smoke run)")
    # one thread by default: on a shared 2-core machine, two OpenMP threads stall whenever
    # another process takes a core, which swamps the A/B difference
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every process")
    parser.add_argument("--worker", choices=("prune", "steps"), help=argparse.SUPPRESS)
    parser.add_argument("--tool", choices=TOOLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = QUICK if args.quick else FULL
    if args.worker == "prune":
        report = worker_prune(args.tool, setup)
    elif args.worker == "steps":
        report = worker_steps(setup)
    else:
        report = run_all(setup, args.threads, args.quick)
    print(json.dumps(report, indent=None if args.worker else 2))


if __name__ == "__main__":
    main()
