"""Latency: one timing function (torch.utils.benchmark blocks, median and IQR), what every figure goes through.

Whether a model is faster is not asserted here (timing lives in benchmarks/): these tests
check what is recorded and how a difference or a budget is called.
"""
from __future__ import annotations

import sys
import time

import pytest
import torch

import secateurs as sc
from secateurs.errors import InvalidArgument
from secateurs.measure import MIN_RUNS, Timing, latency_ms, measure, time_forward
from tests.conftest import tiny_cnn

timing_module = sys.modules["secateurs.measure"]


def test_time_forward_returns_median_spread_threads_and_runs_and_restores_threads():
    before = torch.get_num_threads()
    timing = time_forward(tiny_cnn(), torch.randn(1, 4, 4, 4), threads=1)
    assert timing.median_ms > 0 and timing.iqr_ms >= 0 and timing.threads == 1 and timing.runs >= MIN_RUNS
    assert torch.get_num_threads() == before


def test_timing_stops_at_its_time_limit(monkeypatch):
    started = time.perf_counter()
    timing = time_forward(tiny_cnn(), torch.randn(1, 4, 4, 4), precision=1e-9, max_seconds=0.2)
    assert time.perf_counter() - started < 2.0 and timing.runs >= 1     # an unreachable precision still ends
    monkeypatch.setattr(timing_module, "MAX_SECONDS", 0.1)             # the defaults are read at call time
    started = time.perf_counter()
    time_forward(tiny_cnn(), torch.randn(1, 4, 4, 4), precision=1e-9)
    assert time.perf_counter() - started < 1.5


def test_latency_ms_keeps_its_signature_and_is_time_forwards_median(monkeypatch):
    calls = []

    def fake(model, example, threads=1, **kwargs):
        calls.append((threads, kwargs))
        return Timing(1.5, 0.1, threads, 12)

    monkeypatch.setattr(timing_module, "time_forward", fake)
    assert latency_ms(tiny_cnn(), torch.randn(1, 4, 4, 4), threads=2, warmup=1, repeats=3) == 1.5
    assert calls == [(2, {"warmup": 1})]
    assert sc.latency_ms is latency_ms


def test_bad_thread_counts_are_refused():
    for threads in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgument, match="threads must be a positive integer"):
            time_forward(tiny_cnn(), torch.randn(1, 4, 4, 4), threads=threads)


def test_measure_records_the_spread_and_times_the_inputs_it_is_given(monkeypatch):
    seen = []
    monkeypatch.setattr(timing_module, "time_forward",
                        lambda model, inputs, threads: seen.append(inputs.shape) or Timing(2.0, 0.2, threads, 15))
    d = measure(tiny_cnn(), torch.randn(1, 4, 4, 4), timed_inputs=torch.randn(64, 4, 4, 4)).to_dict()
    assert (d["latency_ms"], d["latency_iqr_ms"], d["latency_runs"], d["threads"]) == (2.0, 0.2, 15, 1)
    assert seen == [(64, 4, 4, 4)] and d["macs"] == measure(tiny_cnn(), torch.randn(1, 4, 4, 4), timed=False).macs
    untimed = measure(tiny_cnn(), torch.randn(1, 4, 4, 4), timed=False).to_dict()
    assert untimed["latency_ms"] is None and untimed["latency_iqr_ms"] is None and len(seen) == 1


def test_within_noise_is_when_the_spreads_cover_the_difference():
    dense = Timing(10.0, 1.0, 1, 20)
    assert Timing(9.2, 0.8, 1, 20).within_noise(dense)          # 0.8 apart, half-IQRs add to 0.9
    assert not Timing(8.0, 0.8, 1, 20).within_noise(dense)
    assert Timing(9.6, 0.8, 1, 20).speedup(dense) == "1.04x, within noise"
    assert Timing(4.0, 0.1, 1, 20).speedup(dense) == "2.50x"
    assert Timing(1.02, 0.1, 1, 20).within_noise(1.0) and not Timing(1.2, 0.1, 1, 20).within_noise(1.0)   # a budget


def test_a_timing_prints_median_and_half_the_iqr_at_one_precision():
    assert str(Timing(49.05, 2.0, 1, 10)) == "49.0 ± 1.0 ms"
    assert str(Timing(14.76, 0.15, 1, 10)) == "14.76 ± 0.07 ms" or str(Timing(14.76, 0.15, 1, 10)) == "14.76 ± 0.08 ms"
    assert Timing(0.0619, 0.00146, 1, 10).text == "0.0619 ± 0.0007"
    assert Timing.of({"latency_ms": 3.0, "threads": 2}) == Timing(3.0, 0.0, 2, 0)    # an old record: no spread
    assert Timing.of({"latency_ms": None}) is None
