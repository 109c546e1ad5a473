"""Budgets: bytes and latency targets, the per-op latency table, its cache and its use in the search.

No test asserts a timing: the machine is shared and noisy. They assert the table's
shape, its caching, that the prediction falls as more is cut, and that the solved
model's *predicted* latency meets the budget.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import secateurs.latency as latency
import secateurs.structured as structured
from secateurs.structured import apply as structured_apply
from secateurs.structured import budget as structured_budget
from secateurs.structured import units as structured_units
from secateurs import prune_structured
from secateurs.criteria import Calibration, get_criterion
from secateurs.errors import InvalidArgument
from secateurs.examples import zoo
from secateurs.measure import tensor_bytes
from secateurs.structured import Budget, parse_target


def mlp() -> tuple[nn.Module, torch.Tensor]:
    """Wide enough that the matmuls, not Python, take most of the time."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return model.eval(), torch.randn(32, 128)


@pytest.fixture(autouse=True)
def quick_timing(monkeypatch, one_thread):
    monkeypatch.setattr(latency, "TIME_PER_POINT_MS", 2.0)
    monkeypatch.setattr(latency, "MIN_REPEATS", 3)


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("latency")


def test_table_times_every_scaling_op_on_a_monotone_grid(table_dir):
    model, x = mlp()
    table = latency.latency_table(model, x, threads=1, cache=table_dir)
    assert [t.op for t in table.timings.values()].count("aten.addmm.default") == 3
    assert len(table.ops) == 5                       # three Linear, two ReLU
    for timing in table.timings.values():
        assert all(axis[-1] == 1.0 and axis == sorted(axis) and axis[0] >= 0.25 for axis in timing.axes)
        grid = np.asarray(timing.ms).reshape([len(a) for a in timing.axes])
        assert (grid >= 0).all()
        for axis in range(grid.ndim):
            assert (np.diff(grid, axis=axis) >= 0).all()
    hidden = [t for t in table.timings.values() if len(t.axes) == 2]
    assert len(hidden) == 1 and len(hidden[0].ms) == 16   # the 512 -> 512 layer: in x out widths
    assert table.predict() == pytest.approx(table.dense_ms)
    assert table.remainder_ms == pytest.approx(table.dense_ms - table.timed_ms)
    assert table.threads == 1 and table.torch_version == torch.__version__


@pytest.mark.filterwarnings("ignore:latency table")   # its fake 1 ms timings outweigh the model
def test_table_is_cached_by_structure_and_threads(table_dir, monkeypatch):
    model, x = mlp()
    first = latency.latency_table(model, x, threads=1, cache=table_dir)
    assert first.path.is_file() and json.loads(first.path.read_text())["key"] == first.key
    calls = []
    monkeypatch.setattr(latency, "_time_ms", lambda call: calls.append(1) or 1.0)
    again = latency.latency_table(copy.deepcopy(model), x, threads=1, cache=table_dir)
    assert calls == [] and again.timings == first.timings and again.dense_ms == first.dense_ms
    other_threads = latency.latency_table(model, x, threads=2, cache=table_dir)
    other_batch = latency.latency_table(model, torch.randn(8, 128), threads=1, cache=table_dir)
    assert calls and len({first.key, other_threads.key, other_batch.key}) == 3
    first.path.write_text("{not json")                 # a damaged file is rebuilt, not trusted
    assert latency.latency_table(model, x, threads=1, cache=table_dir).timings


def test_interpolation_is_exact_on_the_grid_and_linear_between():
    timing = latency.OpTiming("op", [[0.25, 0.5, 1.0], [0.5, 1.0]], [1, 2, 2, 4, 4, 8])
    assert timing.at([0.5, 1.0]) == 4
    assert timing.at([0.75, 1.0]) == pytest.approx(6)
    assert timing.at([0.1, 0.5]) == 1                 # clamped to the smallest width timed
    assert timing.at([0.375, 0.75]) == pytest.approx((1 + 2 + 2 + 4) / 4)


def _scored(model, x):
    return structured_units.score_model(model, x, get_criterion("l2"), Calibration(), structured.UNIT_KINDS, ())


def test_predicted_latency_falls_as_the_ratio_grows(table_dir):
    model, x = zoo.ZOO["resnet18"]()
    scored = _scored(model.eval(), x)
    table = latency.latency_table(model, x, threads=1, cache=table_dir, graph=scored.graph, analysis=scored.analysis)
    predicted = [table.predict(structured_apply.chosen_shapes(scored, structured_units.select_units(scored, r, "global", None, None)))
                 for r in (0.0, 0.2, 0.4, 0.6, 0.8)]
    assert all(a >= b for a, b in zip(predicted, predicted[1:]))
    assert predicted[-1] < predicted[0] == pytest.approx(table.dense_ms)


def _halfway_budget(table_dir, monkeypatch):
    """The MLP, its input and latency table, and a budget halfway between dense and the largest cut."""
    monkeypatch.setenv("SECATEURS_CACHE", str(table_dir))
    model, x = mlp()
    scored = _scored(model, x)
    table = latency.latency_table(model, x, threads=1, graph=scored.graph, analysis=scored.analysis)
    most = table.predict(structured_apply.chosen_shapes(scored, structured_units.select_units(scored, 0.9, "global", None, None)))
    budget = (most + table.dense_ms) / 2
    return model, x, table, budget


def test_latency_target_meets_its_budget_on_the_prediction(table_dir, monkeypatch):
    model, x, table, budget = _halfway_budget(table_dir, monkeypatch)
    plan = prune_structured(model, x, target=f"latency_ms={budget},threads=1")
    record = plan.budget
    assert record["key"] == "latency_ms" and record["threads"] == 1 and record["limit"] == pytest.approx(budget)
    assert record["predicted"] <= budget < record["dense"] == table.dense_ms
    assert record["measured"] > 0 and record["table"] == str(table.path)
    assert model(x).shape == (32, 10) and plan.macs_after < plan.macs_before


def test_a_cut_that_measures_over_the_budget_is_cut_further_before_the_model_is_touched(table_dir, monkeypatch):
    model, x, table, budget = _halfway_budget(table_dir, monkeypatch)
    measured = iter([1.3 * budget, 0.9 * budget, 0.9 * budget])   # the first cut runs slower than predicted
    monkeypatch.setattr(structured_budget, "latency_ms", lambda *args, **kwargs: next(measured))
    plan = prune_structured(model, x, target=f"latency_ms={budget},threads=1")
    first, second = plan.budget["checks"]
    assert first["measured"] > budget >= second["measured"] == plan.budget["measured"]
    assert second["ratio"] > first["ratio"] and plan.ratio == second["ratio"]
    assert second["predicted"] <= budget * first["predicted"] / first["measured"] + 1e-9


def test_an_impossible_latency_budget_is_one_line(table_dir, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(table_dir))
    model, x = mlp()
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgument, match=r"target latency_ms=0.0001,threads=1 cannot be met") as caught:
        prune_structured(model, x, target="latency_ms=0.0001,threads=1")
    assert "\n" not in str(caught.value) and "ms" in str(caught.value)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())   # left whole


def test_bytes_target_counts_parameters_and_buffers_at_their_dtype():
    model, x = zoo.ZOO["resnet18"]()
    dense = tensor_bytes(model)
    plan = prune_structured(model.eval(), x, target="bytes=0.5")
    assert plan.budget["dense"] == dense
    assert plan.budget["predicted"] == plan.budget["measured"] == tensor_bytes(model) <= 0.5 * dense
    with pytest.raises(InvalidArgument, match="bytes=0.001 cannot be met"):
        prune_structured(zoo.ZOO["resnet18"]()[0].eval(), x, target="bytes=0.001")


def test_macs_and_params_budgets_record_predicted_equal_to_measured():
    model, x = zoo.ZOO["mobilenet_v2"]()
    plan = prune_structured(model.eval(), x, target="macs=0.5")
    assert plan.budget["predicted"] == plan.budget["measured"] == plan.macs_after <= 0.5 * plan.macs_before


@pytest.mark.parametrize("text,expected", [
    ("macs=0.5", Budget("macs", 0.5)), ("params=1", Budget("params", 1.0)), ("bytes=0.25", Budget("bytes", 0.25)),
    ("latency_ms=5", Budget("latency_ms", 5.0)), ("latency_ms=2.5,threads=2", Budget("latency_ms", 2.5, 2)),
])
def test_parse_target_reads_every_budget(text, expected):
    assert parse_target(text) == expected
    assert parse_target(str(expected)) == expected


@pytest.mark.parametrize("text", ["latency_ms=0", "latency_ms=-1", "latency_ms=inf", "bytes=1.5", "macs=0.5,threads=2",
                                  "latency_ms=5,threads=0", "latency_ms=5,cores=2", "seconds=1", "latency_ms"])
def test_parse_target_refuses_in_one_line(text):
    with pytest.raises(InvalidArgument, match=r"target must look like .*latency_ms=5") as caught:
        parse_target(text)
    assert "\n" not in str(caught.value) and repr(text) in str(caught.value)


def test_bad_threads_are_refused():
    model, x = mlp()
    with pytest.raises(InvalidArgument, match="threads must be a positive integer, got 0"):
        latency.latency_table(model, x, threads=0, cache=False)


def test_a_table_timed_under_load_warns_that_its_predictions_are_unreliable(table_dir):
    model, x = mlp()
    table = latency.latency_table(model, x, threads=1, cache=table_dir)
    table.timings = {k: latency.OpTiming(t.op, t.axes, [v + 1.0 for v in t.ms]) for k, t in table.timings.items()}
    table.dense_ms = table.timed_ms / 2          # as if the ops had been timed while the machine was busy
    with pytest.warns(RuntimeWarning, match=r"ops timed alone sum to .* probably busy"):
        latency._warn_if_inconsistent(table)
