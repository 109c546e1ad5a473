"""Optional experiment logging of `secateurs run`: TensorBoard event files and MLflow runs, read back."""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from secateurs.cli import main
from secateurs.errors import SecateursError
from secateurs.run import run_recipe
from secateurs.tracking import open_run_log, scalars, series

MODEL_SOURCE = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))
'''

RECIPE = """
model: {factory: "secateurs_logging_tiny:build", weights: dense.safetensors}
data: {calibration: calib.safetensors, batch_size: 32}
logging: {LOGGING}
stages:
  - finetune: {epochs: 2}
  - prune: {structured: true, target: macs=0.5}
  - evaluate
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("logging")
    (root / "secateurs_logging_tiny.py").write_text(MODEL_SOURCE)
    sys.path.insert(0, str(root))
    from secateurs_logging_tiny import build

    save_file(build().state_dict(), str(root / "dense.safetensors"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    save_file({"inputs": x, "targets": (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()},
              str(root / "calib.safetensors"))
    return root


def recipe(project, logging: str) -> str:
    path = project / f"recipe-{abs(hash(logging))}.yaml"
    path.write_text(RECIPE.replace("{LOGGING}", logging))
    return str(path)


def test_tensorboard_gets_costs_per_stage_and_losses_per_epoch(project, tmp_path, one_thread):
    pytest.importorskip("tensorboard", reason="the logging extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_recipe(recipe(project, "{tensorboard: tb}"), tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("model/accuracy")]
    assert [step for step, _ in accuracy] == [0, 1, 2, 3]
    assert accuracy[-1][1] == pytest.approx(result.metrics["final"]["accuracy"])
    losses = result.metrics["stages"][0]["result"]["loss"]
    assert [e.value for e in events.Scalars("00-finetune/loss")] == pytest.approx(losses) and len(losses) == 2
    macs = [e.value for e in events.Scalars("model/macs")]
    assert macs[2] < macs[0] and events.Scalars("01-prune/budget/predicted")[0].value == macs[2]


def test_mlflow_run_holds_params_metrics_and_history(project, tmp_path, monkeypatch, one_thread):
    mlflow = pytest.importorskip("mlflow", reason="the logging extra (mlflow-skinny) is not installed")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # a local file store, for the test
    result = run_recipe(recipe(project, "{mlflow: mlruns}"), tmp_path / "run")
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("secateurs")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["seed"] == "0" and run.data.params["stages.1.prune.target"] == "macs=0.5"
    assert run.data.metrics["model/accuracy"] == pytest.approx(result.metrics["final"]["accuracy"])
    history = client.get_metric_history(run.info.run_id, "00-finetune/loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        result.metrics["stages"][0]["result"]["loss"])


def test_a_missing_library_is_one_line_naming_the_extra(project, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)       # import mlflow now raises ImportError
    with pytest.raises(SecateursError, match=r"logging: mlflow needs the mlflow package: pip install 'secateurs\[logging\]'"):
        open_run_log({"mlflow": "mlruns"}, tmp_path, "run", {})
    assert main(["run", recipe(project, "{mlflow: mlruns}"), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "secateurs[logging]" in err
    assert not (tmp_path / "cli").exists()                 # refused before anything was written


def test_an_unknown_logger_is_a_recipe_error(project, tmp_path):
    assert main(["run", recipe(project, "{wandb: x}"), "--out", str(tmp_path / "r")]) == 2


def test_records_flatten_to_numeric_tags():
    record = {"a": 1, "b": {"c": 2.5, "d": "text", "e": True, "f": float("nan")}, "loss": [1.0, 0.5]}
    assert dict(scalars(record, "s")) == {"s/a": 1.0, "s/b/c": 2.5}
    assert dict(series(record)) == {"loss": [1.0, 0.5]}
