"""Sensitivity curves (cached, plotted) and the allocation that meets a budget with the least predicted loss."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from secateurs.cli import main
from secateurs.errors import InvalidArgument
from secateurs.examples.digits import DigitsCNN, load_digits
from secateurs.measure import count_macs, count_parameters
from secateurs.recipe import parse_recipe
from secateurs.recover import finetune
from secateurs.report import build_report
from secateurs.sensitivity import (Sensitivity, allocate, data_digest, mean_loss_metric, prune_by_sensitivity,
                                   prune_by_sensitivity_rounds, save_plot, sensitivity)

from .test_recipe import project  # noqa: F401  (the tiny model, its weights, data and pipeline recipe)

RATIOS = (0.25, 0.5, 0.75)


@pytest.fixture(scope="module")
def digits(one_thread):
    """A small digits CNN trained for a few epochs (about 98% accuracy), held-out batches, an example input."""
    data = load_digits()
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    for epoch in range(4):
        finetune(model, data.train_batches(64, seed=epoch), epochs=1, lr=3e-3)
    held_out = data.test_batches(180)[:1]
    return model.eval(), held_out, data.test_x[:1]


@pytest.fixture(scope="module")
def curves(digits):
    model, held_out, x = digits
    return sensitivity(model, x, mean_loss_metric(held_out, F.cross_entropy), RATIOS, higher_is_better=False)


def _accuracy(batches):
    from secateurs.recover.finetune import evaluate_accuracy

    return lambda model: evaluate_accuracy(model, batches)


def test_curves_cover_every_group_and_fall_with_the_ratio(digits):
    model, held_out, x = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = sensitivity(model, x, _accuracy(held_out), RATIOS)
    assert [c.label for c in found.curves] == ["features.0", "features.3", "features.7", "classifier.1"]
    assert found.ratios == list(RATIOS) and found.baseline > 0.9
    for curve in found.curves:
        assert len(curve.metric) == len(curve.removed) == len(RATIOS)
        assert curve.removed == [int(r * curve.units) for r in RATIOS]
        assert curve.order and sorted(curve.order) == list(range(curve.units))
        # monotone up to noise: pruning more of a trained layer does not help
        assert all(b <= a + 0.02 for a, b in zip([found.baseline] + curve.metric, curve.metric))
    assert min(c.metric[-1] for c in found.curves) < found.baseline - 0.05
    # the model is left exactly as it was, weights and BatchNorm statistics alike
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = found.report_curves()
    assert report["features.0"][0] == [0.0, found.baseline] and len(report["features.0"]) == len(RATIOS) + 1


def test_zeroing_in_place_measures_what_cutting_a_copy_does(digits, curves):
    model, held_out, x = digits
    cut = sensitivity(model, x, mean_loss_metric(held_out, F.cross_entropy), RATIOS, higher_is_better=False, mode="cut")
    for zeroed, removed in zip(curves.curves, cut.curves):
        assert zeroed.removed == removed.removed
        torch.testing.assert_close(torch.tensor(zeroed.metric), torch.tensor(removed.metric), rtol=1e-4, atol=1e-5)


def test_cache_hits_without_evaluating_and_misses_when_anything_changes(digits, tmp_path):
    model, held_out, x = digits
    calls = []
    loss = mean_loss_metric(held_out, F.cross_entropy)

    def evaluate(m):
        calls.append(1)
        return loss(m)

    def run(m, ratios=RATIOS, data_key="held-out"):
        return sensitivity(m, x, evaluate, ratios, higher_is_better=False, cache_dir=tmp_path, data_key=data_key)

    first = run(model)
    measured = len(calls)
    assert not first.cached and measured == 1 + len(first.curves) * len(RATIOS)
    second = run(model)
    assert second.cached and len(calls) == measured            # not one evaluation
    assert [c.metric for c in second.curves] == [c.metric for c in first.curves]
    assert isinstance(second, Sensitivity) and second.key == first.key
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.features[0].weight[0, 0, 0, 0] += 1e-3
    assert not run(changed).cached                             # other weights
    assert not run(model, ratios=(0.5,)).cached               # another grid
    assert not run(model, data_key="other data").cached        # other data
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 4


def test_same_inputs_give_identical_curves(digits, curves):
    model, held_out, x = digits
    again = sensitivity(model, x, mean_loss_metric(held_out, F.cross_entropy), RATIOS, higher_is_better=False)
    assert [c.metric for c in again.curves] == [c.metric for c in curves.curves]
    assert [c.order for c in again.curves] == [c.order for c in curves.curves]


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_allocation_meets_the_macs_budget_and_predicts_no_more_loss_than_uniform(digits, curves, fraction):
    model, _, x = digits
    target = f"macs={fraction}"
    chosen, uniform = allocate(model, x, curves, target), allocate(model, x, curves, target, "uniform")
    assert chosen.cost_fraction <= fraction and uniform.cost_fraction <= fraction
    assert chosen.predicted_loss <= uniform.predicted_loss
    assert len(set(uniform.ratios.values())) == 1
    pruned = copy.deepcopy(model)
    plan = prune_by_sensitivity(pruned, x, curves, target)
    macs = count_macs(pruned, x)[0]
    assert macs == plan.macs_after and macs <= fraction * count_macs(model, x)[0]
    assert plan.macs_after / plan.macs_before == pytest.approx(chosen.cost_fraction)
    assert plan.ratio == chosen.by_label()
    assert pruned(x).shape == model(x).shape


def test_rounds_remeasure_the_curves_on_the_cut_model_and_meet_the_target(digits, tmp_path):
    model, held_out, x = digits
    pruned, measured = copy.deepcopy(model), []

    def measure(m):
        measured.append(count_macs(m, x)[0])
        return sensitivity(m, x, mean_loss_metric(held_out, F.cross_entropy), RATIOS, higher_is_better=False)

    plans = prune_by_sensitivity_rounds(pruned, x, measure, "macs=0.2", rounds=3)
    dense = count_macs(model, x)[0]
    assert len(plans) == 3 and len(measured) == 3
    assert measured[0] == dense and measured[0] > measured[1] > measured[2]   # each round sees the cut model
    for r, plan in enumerate(plans, 1):                                        # round r: 0.2 ** (r / 3) of dense
        assert plan.macs_after <= 0.2 ** (r / 3) * dense * (1 + 1e-9)
    assert count_macs(pruned, x)[0] == plans[-1].macs_after <= 0.2 * dense
    assert pruned(x).shape == model(x).shape
    whole = copy.deepcopy(model)   # a target already met: the last round still gives a plan, cutting nothing
    (kept,) = prune_by_sensitivity_rounds(whole, x, measure, "macs=1.0", rounds=3)
    assert kept.macs_after == kept.macs_before == dense
    with pytest.raises(InvalidArgument, match="rounds must be a positive integer"):
        prune_by_sensitivity_rounds(copy.deepcopy(model), x, measure, "macs=0.2", rounds=0)
    with pytest.raises(InvalidArgument, match="measure must be a function"):
        prune_by_sensitivity_rounds(copy.deepcopy(model), x, "curves", "macs=0.2")


def test_allocation_meets_a_latency_budget_on_the_tables_prediction(digits, curves, tmp_path, monkeypatch):
    import secateurs.latency as latency

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "TIME_PER_POINT_MS", 2.0)
    model, _, x = digits
    table = latency.latency_table(model, x, threads=1)   # cached: allocate reads these very timings
    import secateurs.sensitivity as sens

    scored = sens._traced(model, x, curves)
    half = dict.fromkeys((c.index for c in curves.curves), 0.5)
    budget = table.predict(sens.chosen_shapes(scored, sens._chosen(scored, half, None)))   # reachable for sure
    assert budget < table.dense_ms
    chosen = allocate(model, x, curves, f"latency_ms={budget},threads=1")
    uniform = allocate(model, x, curves, f"latency_ms={budget},threads=1", "uniform")
    assert chosen.cost_fraction * table.dense_ms <= budget * (1 + 1e-9) and chosen.predicted_loss <= uniform.predicted_loss
    pruned = copy.deepcopy(model)
    plan = prune_by_sensitivity(pruned, x, curves, f"latency_ms={budget},threads=1")
    assert plan.ratio == chosen.by_label() and plan.macs_after < plan.macs_before
    with pytest.raises(InvalidArgument, match="rounds > 1 needs a macs, params or bytes target"):
        prune_by_sensitivity_rounds(copy.deepcopy(model), x, lambda m: curves, f"latency_ms={budget}", rounds=2)
    one = copy.deepcopy(model)   # one round takes any target prune_by_sensitivity takes
    (plan,) = prune_by_sensitivity_rounds(one, x, lambda m: curves, f"latency_ms={budget},threads=1", rounds=1)
    assert plan.ratio == chosen.by_label()


def test_allocation_meets_a_parameter_budget(digits, curves):
    model, _, x = digits
    pruned = copy.deepcopy(model)
    prune_by_sensitivity(pruned, x, curves, "params=0.4")
    assert count_parameters(pruned)[0] <= 0.4 * count_parameters(model)[0]


def test_plots_are_written_as_png_and_svg(curves, tmp_path):
    png, svg = save_plot(curves, tmp_path / "s.png"), save_plot(curves, tmp_path / "s.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = svg.read_text()
    assert "<svg" in text and all(c.label in text for c in curves.curves)


def _one_line_error(call, *words):
    with pytest.raises(InvalidArgument) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize("ratios,words", [
    ((), ["ratios", "non-empty"]),
    ([0.0, 0.5], ["ratios[0]", "(0, 1)", "0.0"]),
    ([0.5, 1.0], ["ratios[1]", "1.0"]),
    ([1.5], ["ratios[0]", "1.5"]),
    ("0.5", ["ratios", "'0.5'"]),
])
def test_bad_ratios_are_refused(digits, ratios, words):
    model, held_out, x = digits
    _one_line_error(lambda: sensitivity(model, x, _accuracy(held_out), ratios), *words)


def test_bad_options_are_refused(digits, curves, tmp_path):
    model, held_out, x = digits
    evaluate = _accuracy(held_out)
    _one_line_error(lambda: allocate(model, x, curves, "macs=0.5", "knapsack"), "allocation", "'knapsack'", "sensitivity")
    _one_line_error(lambda: prune_by_sensitivity(model, x, curves, "macs=0.5", "best"), "allocation", "'best'")
    _one_line_error(lambda: allocate(model, x, curves, "macs=1.5"), "target", "macs=1.5")
    _one_line_error(lambda: allocate(model, x, curves, "macs=0.001"), "cannot be met", "75%")
    _one_line_error(lambda: sensitivity(model, x, evaluate, mode="prune"), "mode", "'prune'")
    _one_line_error(lambda: sensitivity(model, x, evaluate, cache_dir=tmp_path), "cache_dir", "data_key")
    _one_line_error(lambda: sensitivity(model, x, lambda m: "good", (0.5,)), "evaluate", "number")
    _one_line_error(lambda: sensitivity(model, x, evaluate, (0.5,), method="nope"), "method", "'nope'")
    other = DigitsCNN(width=4).eval()
    _one_line_error(lambda: allocate(other, x, curves, "macs=0.5"), "do not fit this model")


# --- recipe, run, report and command line ---------------------------------------------------

SENSITIVE = """
model: {factory: "secateurs_recipe_tiny:build", weights: dense.safetensors}
data: {calibration: calib.safetensors, batch_size: 32}
seed: 2
stages:
  - prune: {structured: true, target: macs=0.5, allocation: sensitivity}
  - evaluate
"""


@pytest.mark.parametrize("stage,words", [
    ("{structured: true, target: macs=0.5, allocation: best}", ["stages[0].prune.allocation", "'sensitivity'"]),
    ("{structured: true, ratio: 0.5, allocation: sensitivity}", ["stages[0].prune", "target"]),
    ("{structured: true, target: macs=0.5, scope: global, allocation: sensitivity}", ["stages[0].prune", "scope"]),
    ("{sparsity: 0.5, allocation: sensitivity}", ["stages[0].prune", "structured: true"]),
    ("{structured: true, target: macs=0.5, rounds: 2}", ["stages[0].prune", "rounds is for allocation"]),
    ("{structured: true, target: macs=0.5, allocation: sensitivity, rounds: 0}", ["stages[0].prune.rounds"]),
])
def test_recipe_allocation_is_validated(project, stage, words):  # noqa: F811
    text = SENSITIVE.replace("{structured: true, target: macs=0.5, allocation: sensitivity}", stage)
    _one_line_error(lambda: parse_recipe(text, "r.yaml", base=project), "r.yaml:6", *words)


def test_a_run_with_sensitivity_allocation_reports_its_curves(project, tmp_path, one_thread):  # noqa: F811
    recipe = project / "sensitive.yaml"
    recipe.write_text(SENSITIVE)
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    curves = metrics["sensitivity"]
    assert set(curves) == {"conv1", "conv2", "fc1"} and all(points[0][0] == 0.0 for points in curves.values())
    prune = metrics["stages"][0]["result"]
    assert prune["macs_after"] <= 0.5 * prune["macs_before"]
    assert set(prune["ratio"]) == set(curves)
    assert list((run_dir / "sensitivity").glob("sensitivity-*.json"))
    report = build_report([run_dir], tmp_path / "report")
    assert 'id="run0_sensitivity"' in report.read_text()


def test_a_run_in_rounds_records_every_cut_and_resumes_from_them(project, tmp_path, one_thread):  # noqa: F811
    import secateurs.run as runner

    recipe = project / "rounds.yaml"
    recipe.write_text(SENSITIVE.replace("allocation: sensitivity}", "allocation: sensitivity, rounds: 2}"))
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    prune = metrics["stages"][0]["result"]
    assert prune["macs_after"] <= 0.5 * prune["macs_before"] and len(prune["ratio"]) == 2
    plans = json.loads((run_dir / "checkpoints" / "00-prune" / "plans.json").read_text())
    assert len(plans) == 2 and plans[1]["plan"]["macs_before"] == plans[0]["plan"]["macs_after"]
    assert len(list((run_dir / "sensitivity").glob("sensitivity-*.json"))) == 2   # measured again for round 2
    crashed = tmp_path / "crashed"

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(runner.STAGE_RUNNERS, "evaluate", crash)
        with pytest.raises(RuntimeError, match="power cut"):
            runner.run_recipe(recipe, crashed)
    resumed = runner.run_recipe(recipe, crashed, resume=True)   # evaluate runs on both cuts replayed
    assert resumed.ran == [1]
    assert runner.without_timing(resumed.metrics["stages"]) == runner.without_timing(metrics["stages"])


def test_command_line_writes_table_plot_and_reuses_its_cache(project, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sens"
    args = ["sensitivity", "--model", "secateurs_recipe_tiny:build", "--weights", str(project / "dense.safetensors"),
            "--calib", str(project / "calib.safetensors"), "--ratios", "0.5", "0.25", "--out", str(out)]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "measured in" in first and "conv1" in first
    assert {"sensitivity.json", "sensitivity.png", "sensitivity.svg", "cache"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "sensitivity.json").read_text())
    assert record["ratios"] == [0.25, 0.5] and record["metric_name"] == "cross_entropy loss"
    assert main(args) == 0
    assert "read from the cache" in capsys.readouterr().out
    assert main(args[:-4] + ["1.5", "--out", str(out)]) == 2
    assert "ratios[0] must be a fraction in (0, 1), got 1.5" in capsys.readouterr().err


def test_data_digest_tells_batches_apart():
    a = [(torch.zeros(2, 3), torch.tensor([0, 1]))]
    b = [(torch.zeros(2, 3), torch.tensor([1, 1]))]
    assert data_digest(a) == data_digest(copy.deepcopy(a)) != data_digest(b)
