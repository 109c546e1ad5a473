"""Structured pruning of recurrent hidden units: MACs, prune time and measured CPU speedup.

Each case is a zoo-style sequence model at a realistic width (a 2-layer bidirectional
LSTM classifier over token ids, a 2-layer GRU regressor), pruned with
`prune_structured(ratio=0.5)`: half of the hidden units of every layer and direction
(and half of the embedding features feeding the LSTM). Measured: prune wall time (median
of 3), MACs and parameters before / after, and CPU latency of the dense and pruned models at each
batch size, interleaved (the order alternates every round), one thread, medians. The
figure of merit is speedup / MAC reduction. Prints one JSON object.

    .venv/bin/python benchmarks/rnn_structured.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from secateurs.examples.zoo import gru_model, lstm_classifier
from secateurs.measure import count_macs, count_parameters
from secateurs.structured import prune_structured
from structured import interleaved_latency, spread, timed_prune  # benchmarks/structured.py


def cases(quick: bool) -> dict[str, tuple[torch.nn.Module, callable]]:
    """Name -> (dense model, batch size -> example input)."""
    steps = 16 if quick else 64
    hidden = 64 if quick else 256
    tokens = lambda batch: torch.randint(0, 1000, (batch, steps), generator=torch.Generator().manual_seed(0))
    floats = lambda batch: torch.randn(batch, steps, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    return {
        "lstm_classifier": (lstm_classifier(embed=128, hidden=hidden, layers=2).eval(), tokens),
        "gru_model": (gru_model(input_size=32, hidden=hidden, layers=2).eval(), floats),
    }


def bench(dense: torch.nn.Module, example, batches: list[int], rounds: int) -> dict:
    plans = []
    # the median of 3 leaves out the first call's one-time tracer warm-up
    pruned, prune_s = timed_prune(dense, lambda m: plans.append(prune_structured(m, example(1), 0.5)), repeats=3)
    plan = plans[-1]
    result = {"prune_s": round(prune_s, 3), "params": [count_parameters(dense)[0], plan.params_after],
              "macs_batch1": [count_macs(dense, example(1))[0], plan.macs_after]}
    result["mac_reduction"] = round(result["macs_batch1"][0] / plan.macs_after, 3)
    for batch in batches:
        times = interleaved_latency({"dense": dense, "pruned": pruned.eval()}, example(batch), rounds)
        dense_ms, pruned_ms = statistics.median(times["dense"]), statistics.median(times["pruned"])
        speedup = dense_ms / pruned_ms
        result[f"batch{batch}"] = {"dense_ms": round(dense_ms, 3), "pruned_ms": round(pruned_ms, 3),
                                   "speedup": round(speedup, 3),
                                   "speedup_over_mac_reduction": round(speedup / result["mac_reduction"], 3),
                                   "spread": [round(spread(times["dense"]), 3), round(spread(times["pruned"]), 3)]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small widths, few rounds")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = args.rounds or (5 if args.quick else 30)
    report = {"threads": 1, "rounds": rounds, "ratio": 0.5, "torch": torch.__version__}
    for name, (dense, example) in cases(args.quick).items():
        report[name] = bench(dense, example, [1, 32], rounds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
