"""Latency budgets: how close the per-op latency table's prediction comes to the measured latency.

For each model (the zoo ResNet-18 and a ViT-S/16 with hand-written SDPA attention, both
at batch 1 and 224x224), the table is built at `--threads` threads (time reported, then
reloaded from the cache), and for budgets of 0.8, 0.6 and 0.4 of the dense latency a
copy is pruned with `target="latency_ms=<budget>,threads=<threads>"` (L2, global); the
prediction for the cut (the search's own number) is compared with the cut model's
latency measured by `secateurs.latency_ms` (median of `--repeats` calls); the checks the
search made on cut copies before touching the model are listed too. The dense
model is measured again at the end, so the drift of this shared machine shows.
Prints one JSON object.

    .venv/bin/python benchmarks/latency.py [--threads 2] [--repeats 20] [--models resnet18 vit_s]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch

from secateurs import prune_structured
from secateurs.examples.zoo import resnet18, vit_sdpa
from secateurs.latency import latency_table
from secateurs.measure import latency_ms

MODELS = {
    "resnet18": lambda: resnet18(num_classes=1000, width=64),
    "vit_s": lambda: vit_sdpa(img=224, patch=16, dim=384, depth=12, heads=6, num_classes=1000),
}


def run(name: str, threads: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(1, 3, 224, 224)
    started = time.perf_counter()
    table = latency_table(model, x, threads=threads)
    built = time.perf_counter() - started
    started = time.perf_counter()
    latency_table(model, x, threads=threads)
    reloaded = time.perf_counter() - started
    rows = []
    for share in (0.8, 0.6, 0.4):
        pruned = copy.deepcopy(model)
        budget = share * table.dense_ms
        started = time.perf_counter()
        plan = prune_structured(pruned, x, target=f"latency_ms={budget:.3f},threads={threads}")
        seconds = time.perf_counter() - started
        measured = latency_ms(pruned, x, threads=threads, repeats=repeats)
        predicted = plan.budget["predicted"]
        rows.append({"budget_ms": round(budget, 2), "ratio": round(plan.ratio, 4),
                     "macs_fraction": round(plan.macs_after / plan.macs_before, 3),
                     "predicted_ms": round(predicted, 2), "measured_ms": round(measured, 2),
                     "error": round(predicted / measured - 1, 3), "prune_seconds": round(seconds, 1),
                     "checks": [{k: round(v, 4 if k == "ratio" else 2) for k, v in c.items()}
                                for c in plan.budget.get("checks", [])]})
    return {"model": name, "threads": threads, "timed_ops": len(table.ops), "distinct_timings": len(table.timings),
            "dense_ms_in_table": round(table.dense_ms, 2), "timed_share": round(table.timed_ms / table.dense_ms, 3),
            "table_build_seconds": round(built, 1), "table_reload_seconds": round(reloaded, 2), "budgets": rows,
            "dense_ms_at_end": round(latency_ms(model, x, threads=threads, repeats=repeats), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:   # a fresh table: the build time is part of the result
        os.environ["SECATEURS_CACHE"] = cache        # where prune_structured looks for it too
        results = [run(name, args.threads, args.repeats) for name in args.models]
    print(json.dumps({"torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
