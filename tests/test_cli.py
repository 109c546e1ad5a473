"""The command line: the demo, pruning a user's model, and every user mistake."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from secateurs.cli import main
from tests.conftest import merge_argv

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))

    def odd():
        return nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def not_a_model():
        return 42

    def cnn():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
""")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project: a factory module, trained-looking weights and calibration data."""
    (tmp_path / "usermodels.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    from torch import nn
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    odd = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    save_file({k: v.contiguous() for k, v in odd.state_dict().items()}, str(tmp_path / "odd.safetensors"))
    save_file({"inputs": torch.randn(40, 12), "targets": torch.randint(0, 3, (40,))}, str(tmp_path / "calib.safetensors"))
    return tmp_path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_writes_model_plan_and_metrics(project, capsys):
    code, out, err = run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors",
                          "--method", "taylor", "--sparsity", "0.5", "--calib", "calib.safetensors",
                          "--out", "pruned"], capsys)
    assert code == 0, err
    files = {p.name for p in (project / "pruned").iterdir()}
    assert files == {"model.safetensors", "model.sparse.safetensors", "plan.json", "metrics.json"}
    metrics = json.loads((project / "pruned" / "metrics.json").read_text())
    assert metrics["after"]["nonzeros"] < metrics["before"]["nonzeros"]
    assert metrics["after"]["macs"] == metrics["before"]["macs"] > 0
    plan = json.loads((project / "pruned" / "plan.json").read_text())
    assert plan["method"] == "taylor" and plan["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert [l["name"] for l in plan["layers"]] == ["0.weight", "2.weight"]  # head left alone
    assert "taylor" in out


def test_prune_with_nm_pattern_and_no_calibration(project, capsys):
    code, _, err = run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors",
                        "--pattern", "2:4", "--out", "nm"], capsys)
    assert code == 0, err
    from safetensors.torch import load_file
    w = load_file(str(project / "nm" / "model.safetensors"))["0.weight"]
    assert ((w != 0).reshape(-1, 4).sum(1) == 2).all()


BAD = [
    (["--method", "snip", "--sparsity", "0.5"], "unknown method 'snip'"),
    (["--sparsity", "1.0"], "sparsity must be in [0, 1), got 1.0"),
    (["--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
    (["--sparsity", "half"], "not a number: 'half'"),
    (["--pattern", "2:4", "--model", "usermodels:odd", "--weights", "odd.safetensors"],
     "needs input widths divisible by 4; these are not: 2.weight (width 6)"),
    (["--pattern", "2-4"], "pattern must look like 'N:M'"),
    (["--sparsity", "0.5", "--weights", "missing.safetensors"], "weights file not found"),
    (["--sparsity", "0.5", "--calib", "missing.safetensors"], "weights file not found: missing.safetensors"),
    (["--sparsity", "0.5", "--model", "usermodels:odd"], "do not match the model"),
    (["--sparsity", "0.5", "--model", "nosuchpkg.models:build"], "cannot import module 'nosuchpkg.models'"),
    (["--sparsity", "0.5", "--model", "usermodels:missing"], "has no attribute 'missing'"),
    (["--sparsity", "0.5", "--model", "usermodels:not_a_model"], "returned int, not a torch.nn.Module"),
    (["--method", "taylor", "--sparsity", "0.5"], "criterion 'taylor' needs calibration data"),
    (["--sparsity", "0.5", "--out", "."], "would overwrite input"),
    (["--sparsity", "0.5", "--scope", "everywhere"], "invalid choice: 'everywhere'"),
    (["--sparsity", "0.9", "--max-ratio", "0.5"], "cannot be met"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(project, capsys, extra, message):
    args = ["prune"] + merge_argv({"--model": "usermodels:build", "--weights": "w.safetensors", "--out": "out"}, extra)
    before = {p.name: digest(p) for p in project.iterdir() if p.is_file()}
    code, out, err = run(args, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (project / "out").exists()
    after = {p.name: digest(p) for p in project.iterdir() if p.is_file()}
    assert after == before
    assert not [p for p in project.iterdir() if p.name.startswith(".secateurs-")]


def test_pickled_weights_are_refused_without_trust_flag(project, capsys):
    from usermodels import build
    torch.save({"state": build().state_dict(), "note": object}, project / "w.pt")
    code, _, err = run(["prune", "--model", "usermodels:build", "--weights", "w.pt", "--sparsity", "0.5",
                        "--out", "out"], capsys)
    assert code == 2 and "refusing to unpickle" in err and "--trust-pickle" in err
    assert not (project / "out").exists()


def test_non_empty_output_needs_overwrite(project, capsys):
    (project / "out").mkdir()
    (project / "out" / "old.txt").write_text("keep")
    args = ["prune", "--model", "usermodels:build", "--weights", "w.safetensors", "--sparsity", "0.5", "--out", "out"]
    code, _, err = run(args, capsys)
    assert code == 2 and "not empty" in err
    code, _, err = run(args + ["--overwrite"], capsys)
    assert code == 0, err
    assert (project / "out" / "old.txt").read_text() == "keep"
    assert (project / "out" / "model.safetensors").exists()


def test_real_process_exit_status_and_single_line(project):
    result = subprocess.run([sys.executable, "-m", "secateurs", "prune", "--model", "usermodels:build",
                             "--weights", "w.safetensors", "--sparsity", "2", "--out", "out"],
                            capture_output=True, text=True, cwd=project)
    assert result.returncode == 2
    assert result.stderr.strip() == "secateurs: error: sparsity must be in [0, 1), got 2.0"
    usage = subprocess.run([sys.executable, "-m", "secateurs", "prune"], capture_output=True, text=True, cwd=project)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`secateurs demo` once, as a real process with its output piped (as in a log): the folder and what it printed."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = subprocess.run([sys.executable, "-m", "secateurs", "demo", "--out", str(out)], capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_demo_cuts_channels_to_its_mac_budget_and_recovers(demo_run):
    out, _ = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    for side in (before, after):
        assert set(side) >= {"accuracy", "params", "nonzeros", "macs", "size_bytes", "latency_ms", "latency_iqr_ms"}
        assert side["latency_ms"] > 0 and side["latency_iqr_ms"] >= 0 and side["latency_runs"] >= 1
    assert before["accuracy"] >= 0.95 and after["accuracy"] >= before["accuracy"] - 0.02
    assert after["macs"] <= 0.25 * before["macs"] and after["params"] < 0.4 * before["params"]
    assert after["size_bytes"] < 0.4 * before["size_bytes"]
    assert metrics["plan"]["budget"]["target"] == "macs=0.25"
    assert metrics["latency"] == {"batch": 256, "threads": 1, "timer": "torch.utils.benchmark",
                                  "spread": "latency_iqr_ms: interquartile range of the timed blocks"}
    import secateurs as sc
    from secateurs.examples.digits import DigitsCNN

    model = sc.load(DigitsCNN(), out)     # the saved model is the smaller one
    assert sum(p.numel() for p in model.parameters()) == after["params"]


def test_demo_shows_unstructured_and_2_of_4_beside_it(demo_run):
    out, stdout = demo_run
    variants = {v["name"]: v for v in json.loads((out / "metrics.json").read_text())["variants"]}
    assert list(variants) == ["structured", "unstructured", "2:4"]
    for v in variants.values():
        cut, recovered = (s["measurement"] for s in v["stages"])
        assert recovered["accuracy"] >= 0.95 and cut["latency_ms"] is None and recovered["latency_ms"] > 0
    unstructured = variants["unstructured"]["stages"][-1]["measurement"]
    assert unstructured["nonzeros"] < 0.35 * unstructured["params"] and unstructured["size_bytes"] < 0.4 * 364_408
    rows = {line.split("│")[1].strip(): line for line in stdout.splitlines() if line.count("│") > 5}
    assert set(rows) == {"dense", "structured (macs=0.25)", "unstructured (70%)", "2:4"}
    for label in ("structured (macs=0.25)", "unstructured (70%)", "2:4"):
        assert re.search(r"\d+\.\d\d% → \d+\.\d\d%", rows[label])          # accuracy right after the cut -> recovered
        assert re.search(r"\d+\.\d+ ± \d+\.\d+ .*\d\.\d\dx", rows[label])   # latency with its spread, then speedup
    speedups = [re.search(r"(\d\.\d\d)x(, within noise)?", rows[label]) for label in rows]
    assert all(s is not None for s in speedups)


def test_demo_prints_a_line_per_stage_in_a_log_and_the_paths(demo_run):
    out, stdout = demo_run
    lines = stdout.splitlines()
    starts = [line for line in lines if line.endswith(" ...")]
    expected = ("dense CNN: ", "structured: ", "unstructured: ", "2:4: ", "timing 4 models on a batch of 256 images",
                "writing the structured model")
    assert len(starts) == len(expected) and all(line.startswith(e) for line, e in zip(starts, expected)), starts
    assert sum(line.strip().startswith("done in") for line in lines) == len(starts)
    assert not any("\r" in line or "\x1b" in line for line in lines)   # no bars or escape codes in a log
    assert f"model:   {out / 'model.safetensors'}" in stdout and f"metrics: {out / 'metrics.json'}" in stdout
    assert f"report:  {out / 'report' / 'report.html'}" in stdout
    page = (out / "report" / "report.html").read_text()
    assert 'id="pareto"' in page and 'id="latency"' in page and 'id="run0_widths"' in page


def test_structured_demo_alone_is_quicker(tmp_path, capsys):
    code, out, err = run(["demo", "--structured", "--epochs", "1", "--keep", "macs=0.5", "--out",
                          str(tmp_path / "sd")], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "sd" / "metrics.json").read_text())
    assert [v["name"] for v in metrics["variants"]] == ["structured"]
    assert metrics["after"]["macs"] <= 0.5 * metrics["before"]["macs"] and "unstructured" not in out


def test_demo_rejects_bad_method(tmp_path, capsys):
    code, _, err = run(["demo", "--method", "bogus", "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "unknown method 'bogus'" in err
    assert not (tmp_path / "d").exists()


def test_structured_prune_and_reload(project, capsys):
    code, _, err = run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors", "--structured",
                        "--target", "macs=0.6", "--input-shape", "4,12", "--out", "sp"], capsys)
    assert code == 0, err
    metrics = json.loads((project / "sp" / "metrics.json").read_text())
    assert metrics["after"]["macs"] <= 0.6 * metrics["before"]["macs"]
    assert metrics["after"]["params"] < metrics["before"]["params"]
    import secateurs as sc
    from usermodels import build
    fresh = sc.load(build(), project / "sp")
    assert fresh[0].out_features < 16 and fresh(torch.randn(2, 12)).shape == (2, 3)



def test_structured_latency_target_is_timed_at_the_threads_flag(project, capsys):
    code, _, err = run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors", "--structured",
                        "--target", "latency_ms=1000", "--threads", "1", "--input-shape", "4,12", "--out", "lat"], capsys)
    assert code == 0, err
    budget = json.loads((project / "lat" / "metrics.json").read_text())["plan"]["budget"]
    assert budget["target"] == "latency_ms=1000,threads=1" and budget["threads"] == 1
    assert budget["predicted"] <= 1000 and budget["measured"] > 0


def test_structured_round_to_keeps_widths_multiples(project, capsys):
    code, _, err = run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors", "--structured",
                        "--ratio", "0.5", "--round-to", "8", "--input-shape", "4,12", "--out", "r8"], capsys)
    assert code == 0, err
    keeps = json.loads((project / "r8" / "metrics.json").read_text())["plan"]["keeps"]
    assert keeps and all(len(kept) % 8 == 0 for kept in keeps.values())


STRUCTURED_BAD = [
    (["--structured", "--sparsity", "0.5", "--input-shape", "1,12"], "--structured takes --remove (--ratio) or --keep"),
    (["--structured", "--input-shape", "1,12"], "exactly one of --remove F (--ratio"),
    (["--structured", "--target", "flops=0.5", "--input-shape", "1,12"], "target must look like"),
    (["--structured", "--ratio", "1.5", "--input-shape", "1,12"], "ratio must be in [0, 1)"),
    (["--structured", "--ratio", "0.5", "--input-shape", "1,x"], "--input-shape must be positive integers"),
    (["--structured", "--ratio", "0.5"], "needs an example input"),
    (["--structured", "--ratio", "0.5", "--round-to", "0", "--input-shape", "1,12"], "must be a positive integer"),
]


@pytest.mark.parametrize("extra,message", STRUCTURED_BAD, ids=[m for _, m in STRUCTURED_BAD])
def test_structured_bad_input(project, capsys, extra, message):
    code, _, err = run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors", "--out", "out", *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (project / "out").exists()


def test_analyze_lists_groups_and_blockers(project, capsys):
    code, out, err = run(["analyze", "--model", "usermodels:build", "--input-shape", "2,12"], capsys)
    assert code == 0, err
    assert "groups of coupled channels" in out and "0.weight[0]" in out and "model input or output" in out
    code, _, err = run(["analyze", "--model", "usermodels:build", "--input-shape", "2,7"], capsys)
    assert code == 2 and "does not run on an input of shape 2,7" in err




# ------------------------------------------------------------------ habits: shapes, spellings, help


def test_a_forgotten_batch_dimension_is_added_with_a_note(project, capsys):
    code, out, err = run(["prune", "--model", "usermodels:cnn", "--weights", "cnn.safetensors", "--structured",
                          "--keep", "macs=0.5", "--input-shape", "1,8,8", "--out", "sp"], capsys)
    assert code == 0, err
    assert "note: the model does not run on --input-shape 1,8,8 but does on 1,1,8,8" in out
    metrics = json.loads((project / "sp" / "metrics.json").read_text())
    assert metrics["after"]["macs"] <= 0.5 * metrics["before"]["macs"]


@pytest.mark.parametrize("command", [
    ["prune", "--model", "usermodels:cnn", "--weights", "cnn.safetensors", "--structured", "--keep", "macs=0.5",
     "--out", "out"],
    ["analyze", "--model", "usermodels:cnn"],
])
def test_an_input_shape_the_model_cannot_take_is_one_line(project, capsys, command):
    code, out, err = run(command + ["--input-shape", "3,9,9"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "does not run on an input of shape 3,9,9 (nor with a batch of 1 in front)" in err
    assert not (project / "out").exists()


@pytest.fixture
def cnn_weights(project):
    from usermodels import cnn

    save_file(cnn().state_dict(), str(project / "cnn.safetensors"))


@pytest.fixture(autouse=True)
def _cnn(request):
    if "project" in request.fixturenames:
        request.getfixturevalue("cnn_weights")


HABITS = [
    (["--target", "macs=0.5"], "--keep / --target macs=0.5 removes whole channels: add --structured"),
    (["--keep", "macs=0.5"], "--keep / --target macs=0.5 removes whole channels: add --structured"),
    (["--ratio", "0.3"], "--ratio 0.3 removes whole channels: add --structured"),
    (["--remove", "0.5", "--sparsity", "0.5"], "--remove and --sparsity say the same thing"),
    (["--structured", "--remove", "0.5", "--ratio", "0.5", "--input-shape", "1,12"],
     "--remove and --ratio say the same thing"),
    (["--structured", "--keep", "macs=0.5", "--target", "macs=0.5", "--input-shape", "1,12"],
     "--keep and --target say the same thing"),
    (["--structured", "--keep", "flops=0.5", "--input-shape", "1,12"], "target must look like"),
]


@pytest.mark.parametrize("extra,message", HABITS, ids=[m for _, m in HABITS])
def test_structured_options_without_structured_and_double_spellings_are_one_line(project, capsys, extra, message):
    code, _, err = run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors", "--out", "out", *extra],
                       capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (project / "out").exists()


def test_remove_and_keep_mean_what_sparsity_ratio_and_target_mean(project, capsys):
    plans = {}
    for name, extra in [("remove", ["--remove", "0.5"]), ("sparsity", ["--sparsity", "0.5"]),
                        ("sremove", ["--structured", "--remove", "0.25", "--input-shape", "1,12"]),
                        ("ratio", ["--structured", "--ratio", "0.25", "--input-shape", "1,12"]),
                        ("keep", ["--structured", "--keep", "macs=0.6", "--input-shape", "1,12"]),
                        ("target", ["--structured", "--target", "macs=0.6", "--input-shape", "1,12"])]:
        code, _, err = run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors", "--out", name,
                            *extra], capsys)
        assert code == 0, err
        plans[name] = json.loads((project / name / "plan.json").read_text())
    assert plans["remove"]["achieved_sparsity"] == plans["sparsity"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert plans["sremove"]["keeps"] == plans["ratio"]["keeps"]
    assert plans["keep"]["keeps"] == plans["target"]["keeps"] and plans["keep"]["budget"]["target"] == "macs=0.6"


@pytest.fixture
def _help(monkeypatch, capsys):
    """`secateurs COMMAND --help` at 120 columns: what it prints."""
    monkeypatch.setenv("COLUMNS", "120")

    def show(command: str) -> str:
        with pytest.raises(SystemExit) as exit:
            main([command, "--help"])
        assert exit.value.code == 0
        return capsys.readouterr().out
    return show


@pytest.mark.parametrize("command", ["demo", "prune", "analyze", "run", "report", "sensitivity", "export"])
def test_help_is_one_line_per_option_with_its_default(_help, command):
    text = _help(command)
    options = text[text.index("options:"):]
    lines = [line for line in options.splitlines()[1:] if line.strip() and not line.endswith(":")]
    # every line names an option: no help text runs onto a second line
    assert all(line.lstrip().startswith("-") for line in lines), [line for line in lines if not line.lstrip().startswith("-")]
    assert all(len(line.split("  ", 1)) == 2 or line.strip() == "-h, --help  show this help message and exit"
               for line in lines)


def test_help_shows_defaults_and_explains_every_option(_help):
    prune_help, demo_help, sensitivity_help = _help("prune"), _help("demo"), _help("sensitivity")
    for text in (prune_help, sensitivity_help):
        for option in ("--batch-size", "--max-batches", "--seed" if text is prune_help else "--method"):
            line = next(line for line in text.splitlines() if line.lstrip().startswith(option))
            assert len(line.split(None, 2)) == 3, line      # the option, its metavar, and a help text
    assert "--batch-size N" in prune_help and "(default: 32)" in prune_help
    assert "(default: magnitude; l2 with --structured)" in prune_help
    assert "(default: taylor)" in demo_help and "(default: 6)" in demo_help and "(default: macs=0.25)" in demo_help
    assert "--seed N           seed of the scoring batches and training (default: 0)" in demo_help
    assert "(default: 0.1 0.2 ... 0.9)" in sensitivity_help
    assert "--remove F" in prune_help and "--keep COST=F" in prune_help and "same as --keep" in prune_help


# ------------------------------------------------------------------ prune evaluates, report reads it


def test_prune_records_accuracy_and_loss_when_the_calibration_data_has_targets(project, capsys):
    code, out, err = run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors", "--sparsity", "0.5",
                          "--calib", "calib.safetensors", "--out", "pruned"], capsys)
    assert code == 0, err
    metrics = json.loads((project / "pruned" / "metrics.json").read_text())
    for side in ("before", "after"):
        assert 0 <= metrics[side]["accuracy"] <= 1 and metrics[side]["loss"] > 0
    assert metrics["evaluated_on"] == "the calibration data (40 samples, not held out)"
    assert "accuracy and loss: on the calibration data" in out
    assert [layer["name"] for layer in metrics["layers"]["after"]] == ["0", "2", "4"]
    code, _, err = run(["report", "pruned", "--out", "report"], capsys)
    assert code == 0, err
    assert 'id="pareto"' in (project / "report" / "report.html").read_text()
    save_file({"inputs": torch.randn(8, 12)}, str(project / "unlabelled.safetensors"))
    code, _, err = run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors", "--sparsity", "0.5",
                        "--calib", "unlabelled.safetensors", "--out", "plain"], capsys)
    assert code == 0, err
    metrics = json.loads((project / "plain" / "metrics.json").read_text())
    assert metrics["after"]["accuracy"] is None and "loss" not in metrics["after"] and "evaluated_on" not in metrics


def test_a_latency_budget_is_reported_with_its_spread(project, capsys):
    code, out, err = run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors", "--structured",
                          "--keep", "latency_ms=1000", "--input-shape", "4,12", "--out", "lat"], capsys)
    assert code == 0, err
    assert re.search(r"budget latency_ms=1000,threads=1: the pruned model measures \d\.\d+ ± \d\.\d+ ms at 1 "
                     r"thread\(s\): met; it keeps \d+% of the MACs", out), out


def test_a_budget_met_only_within_noise_says_so():
    from secateurs.measure import budget_text

    budget = {"key": "latency_ms", "limit": 1.0, "target": "latency_ms=1,threads=1"}
    dense = {"macs": 100}
    line = lambda median, iqr: budget_text(budget, {"latency_ms": median, "latency_iqr_ms": iqr, "threads": 1,  # noqa: E731
                                                    "latency_runs": 20, "macs": 40}, dense)
    assert line(0.5, 0.1).endswith("met; it keeps 40% of the MACs")
    assert "met only within noise" in line(0.98, 0.1)
    assert "missed, within noise" in line(1.02, 0.1)
    assert ": missed;" in line(1.5, 0.1)
    macs = {"key": "macs", "limit": 50.0, "dense": 100, "measured": 49, "target": "macs=0.5"}
    assert budget_text(macs, {}, dense) == "budget macs=0.5: 49.0% of the dense macs (49 of 100): met"


# ------------------------------------------------------------------ sensitivity and analyze


def test_sensitivity_table_lines_up_and_its_progress_reads_in_a_log(project, capsys):
    code, out, err = run(["sensitivity", "--model", "usermodels:build", "--weights", "w.safetensors", "--calib",
                          "calib.safetensors", "--ratios", "0.25", "0.5", "0.75", "--out", "sens"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "sensitivity (l2, zero): one point per group and ratio ..."
    assert any(line.strip().startswith("done in") for line in lines)
    rows = [line for line in lines if line.count("│") == 7 and "group" not in line]
    numbers = [cell.strip() for row in rows for cell in row.split("│")[4:7]]
    assert rows and all(re.fullmatch(r"\d+\.\d+", n) for n in numbers), numbers
    assert len({len(n.split(".")[1]) for n in numbers}) == 1, numbers     # one number of decimals for all
    assert len({len(row) for row in rows}) == 1
    assert "25% removed" in out and "cross_entropy loss with one group pruned (dense: " in out


def test_print_analyze_is_a_short_summary():
    import secateurs as sc
    from secateurs.examples.digits import DigitsCNN

    text = str(sc.analyze(DigitsCNN(), torch.randn(1, 1, 8, 8)))
    lines = text.splitlines()
    assert lines[0] == "5 groups of coupled channels in 29 ops; 4 can be cut (288 units):"
    assert lines[1].split()[:4] == ["group", "0", "32", "channels"] and "features.0.weight[0]" in lines[1]
    assert lines[-2:] == ["blocked: 1 by model input or output",
                          "(6 kernel / table-row axes left out: they are not channels)"]
    assert len(lines) == 7 and "Graph(" not in text
    assert repr(sc.analyze(DigitsCNN(), torch.randn(1, 1, 8, 8))) == "<Analysis: 29 ops, 11 groups, 4 prunable>"
