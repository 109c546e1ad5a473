"""The command line: the demo, pruning a user's model, and every user mistake."""
from __future__ import annotations

import hashlib
import json
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


def test_demo_meets_its_accuracy_targets(tmp_path, capsys):
    code, out, err = run(["demo", "--out", str(tmp_path / "demo")], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    for side in (before, after):
        assert set(side) >= {"accuracy", "params", "nonzeros", "macs", "size_bytes", "latency_ms"}
    assert before["accuracy"] >= 0.95
    assert after["accuracy"] >= before["accuracy"] - 0.01
    assert metrics["plan"]["achieved_sparsity"] == pytest.approx(0.7, abs=1e-4)
    assert after["size_bytes"] < 0.5 * before["size_bytes"]
    assert "before" in out and "after" in out


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
    (["--structured", "--sparsity", "0.5", "--input-shape", "1,12"], "--structured takes --ratio or --target"),
    (["--structured", "--input-shape", "1,12"], "exactly one of --ratio"),
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


def test_structured_demo_really_shrinks(tmp_path, capsys):
    code, _, err = run(["demo", "--structured", "--out", str(tmp_path / "sd")], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "sd" / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert after["macs"] <= 0.5 * before["macs"] and after["params"] < before["params"]
    assert after["accuracy"] >= before["accuracy"] - 0.02
