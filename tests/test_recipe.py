"""Recipes: schema errors with their place in the file, resumable and repeatable runs, int8 quantization."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import secateurs
from secateurs import run as runner
from secateurs.cli import main
from secateurs.errors import FileProblem, InvalidArgument
from secateurs.quantize import int8_bytes, int8_state, load_int8, quantize_int8, quantized_layers, save_int8
from secateurs.recipe import load_recipe

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "recipe.yaml"

MODEL_SOURCE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.relu(self.fc1(x.flatten(1))))


def build():
    torch.manual_seed(0)
    return Tiny()
'''

PIPELINE = """
model: {factory: "secateurs_recipe_tiny:build", weights: dense.safetensors}
data: {calibration: calib.safetensors, batch_size: 32}
seed: 3
stages:
  - finetune: {epochs: 1}
  - prune: {structured: true, target: macs=0.5, recalibrate_bn: true}
  - distill: {epochs: 1, temperature: 2.0}
  - prune: {sparsity: 0.5, method: taylor}
  - quantize
  - evaluate
  - save: {}
"""
DISTILL = 2   # index of the distill stage above


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A folder with a model factory, its dense weights, labelled data and the pipeline recipe."""
    root = tmp_path_factory.mktemp("project")
    (root / "secateurs_recipe_tiny.py").write_text(MODEL_SOURCE)
    import sys

    sys.path.insert(0, str(root))
    from secateurs_recipe_tiny import build

    save_file(build().state_dict(), str(root / "dense.safetensors"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 8, 8, generator=g)
    y = (x[:, :, :4].mean((1, 2, 3)) > 0).long() * 2 + (x[:, :, :, :4].mean((1, 2, 3)) > 0).long()
    save_file({"inputs": x, "targets": y}, str(root / "calib.safetensors"))
    (root / "recipe.yaml").write_text(PIPELINE)
    yield root
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
def reference(project, tmp_path_factory, one_thread):
    """One uninterrupted run of the pipeline."""
    return runner.run_recipe(project / "recipe.yaml", tmp_path_factory.mktemp("runs") / "reference")


def _recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------ schema

BAD = [
    # (stages part of the recipe, line of the mistake, expected message)
    ("  - prune: {sparsity: 1.5}", 3, "stages[0].prune.sparsity: must be in [0, 1), got 1.5"),
    ("  - prune: {sparsty: 0.5}", 3, "stages[0].prune.sparsty: unknown key; expected one of method, structured, sparsity"),
    ("  - finetune: {epochs: many}", 3, "stages[0].finetune.epochs: input should be a valid integer"),
    ("  - finetune: {lr: yes}", 3, "stages[0].finetune.lr: expected a number, got True"),
    ("  - evaluate\n  - quantise: {}", 4, "stages[1]: unknown stage 'quantise'; expected one of prune, finetune, distill"),
    ("  - prune: {method: foo, sparsity: 0.5}", 3, "stages[0].prune.method: unknown method 'foo'; expected one of"),
    ("  - prune: {structured: true}", 3, "stages[0].prune: structured pruning needs exactly one of ratio"),
    ("  - prune: {structured: true, target: flops=0.5}", 3, "target must look like 'macs=0.5'"),
    ("  - prune: {structured: true, target: latency_ms=-1}", 3, "or 'latency_ms=5' (milliseconds"),
    ("  - distill: {alpha: 2}", 3, "stages[0].distill.alpha: must be in [0, 1], got 2"),
    ("  - quantize\n  - finetune: {}", 4, "stages[1]: finetune cannot follow quantize"),
    ("  - save: {path: ../elsewhere}", 3, "stages[0].save.path: must be a folder name inside the run directory"),
    ("  - prune: {sparsity: 0.5}\n    finetune: {}", 3, "stages[0]: a stage is a mapping with one key"),
]


@pytest.mark.parametrize("stages, line, expected", BAD)
def test_a_bad_recipe_is_one_line_naming_file_line_and_path(tmp_path, stages, line, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {{demo: digits}}\nstages:\n{stages}\n")
    with pytest.raises(InvalidArgument) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: ")
    assert expected in message


def test_unknown_top_level_key_is_reported_before_what_it_leaves_missing(tmp_path):
    path = _recipe(tmp_path, "modle: {demo: digits}\nstages: [evaluate]\n")
    with pytest.raises(InvalidArgument, match=r"recipe.yaml:1: modle: unknown key; expected one of model, data, seed"):
        load_recipe(path)


def test_yaml_syntax_error_and_repeated_key_give_line_and_column(tmp_path):
    with pytest.raises(InvalidArgument, match=r"recipe.yaml:3:\d+: YAML syntax error"):
        load_recipe(_recipe(tmp_path, "model: {demo: digits}\nstages:\n  - prune: {sparsity: [0.5}\n"))
    with pytest.raises(InvalidArgument, match=r"recipe.yaml:2:\d+: YAML syntax error: key 'seed' appears twice"):
        load_recipe(_recipe(tmp_path, "seed: 1\nseed: 2\n"))


def test_missing_input_file_names_the_key_and_the_resolved_path(tmp_path):
    path = _recipe(tmp_path, "model: {factory: 'pkg:build', weights: nope.safetensors}\n"
                             "data: {calibration: calib.safetensors}\nstages: [evaluate]\n")
    with pytest.raises(InvalidArgument, match=rf"recipe.yaml:1: model.weights: file not found: {tmp_path / 'nope.safetensors'}"):
        load_recipe(path)


def test_defaults_filled_paths_resolved_and_unquoted_nm_pattern_kept(project, tmp_path):
    recipe = load_recipe(project / "recipe.yaml")
    config = recipe.to_config()
    assert config["model"]["weights"] == str(project / "dense.safetensors")
    assert config["stages"][0] == {"finetune": {"epochs": 1, "lr": 1e-3, "optimizer": "adam", "weight_decay": 0.0}}
    # YAML 1.1 would read 2:4 as the base-60 integer 124
    plain = load_recipe(_recipe(tmp_path, "model: {demo: digits}\nstages:\n  - prune: {pattern: 2:4}\n"))
    assert plain.stages[0].options.pattern == "2:4"
    assert [s.name for s in load_recipe(EXAMPLE).stages] == ["prune", "distill", "quantize", "evaluate", "save"]


def test_budget_targets_and_logging_are_part_of_the_schema(tmp_path):
    text = ("model: {demo: digits}\nlogging: {tensorboard: tb, mlflow: 'http://localhost:5000'}\nstages:\n"
            "  - prune: {structured: true, target: 'latency_ms=5,threads=2'}\n  - prune: {structured: true, target: bytes=0.5}\n")
    recipe = load_recipe(_recipe(tmp_path, text))
    assert [s.options.target for s in recipe.stages] == ["latency_ms=5,threads=2", "bytes=0.5"]
    assert recipe.to_config()["logging"] == {"tensorboard": "tb", "mlflow": "http://localhost:5000"}
    with pytest.raises(InvalidArgument, match=r"recipe.yaml:2: logging.wandb: unknown key; expected one of tensorboard, mlflow"):
        load_recipe(_recipe(tmp_path, "model: {demo: digits}\nlogging: {wandb: x}\nstages: [evaluate]\n"))


def test_cli_bad_recipe_exits_2_with_one_line_and_writes_nothing(project, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {demo: digits}\nstages:\n  - prune: {sparsity: 1.5}\n")
    out = tmp_path / "run"
    assert main(["run", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stages[0].prune.sparsity: must be in [0, 1), got 1.5" in err
    assert not out.exists()
    # an output folder holding an input is refused the same way
    assert main(["run", str(project / "recipe.yaml"), "--out", str(project)]) == 2
    assert "would overwrite input" in capsys.readouterr().err
    assert sorted(p.name for p in project.iterdir() if not p.name.startswith("__")) == [
        "calib.safetensors", "dense.safetensors", "recipe.yaml", "secateurs_recipe_tiny.py"]


def test_unusable_data_or_model_is_refused_before_anything_is_written(project, tmp_path):
    save_file({"inputs": torch.randn(8, 1, 8, 8)}, str(tmp_path / "unlabelled.safetensors"))
    recipe = _recipe(tmp_path, f"""
        model: {{factory: "secateurs_recipe_tiny:build", weights: {project / 'dense.safetensors'}}}
        data: {{calibration: unlabelled.safetensors}}
        stages: [evaluate]
        """)
    with pytest.raises(FileProblem, match="has no 'targets' tensor"):
        runner.run_recipe(recipe, tmp_path / "out")
    recipe.write_text(recipe.read_text().replace("unlabelled", "wrong") + "\n")
    save_file({"inputs": torch.randn(8, 3, 5, 5), "targets": torch.zeros(8, dtype=torch.long)},
              str(tmp_path / "wrong.safetensors"))
    with pytest.raises(InvalidArgument, match=r"does not run on the example input \(1, 3, 5, 5\)"):
        runner.run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ runs

def test_run_directory_holds_config_hash_seed_versions_metrics_and_checkpoints(project, reference):
    out = reference.out_dir
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config == load_recipe(project / "recipe.yaml").to_config()
    run = json.loads((out / "run.json").read_text())
    assert run["config_hash"] == reference.config_hash == runner.config_hash(load_recipe(project / "recipe.yaml"))
    assert run["seed"] == 3
    assert {"python", "torch", "numpy", "secateurs"} <= set(run["versions"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["stages"]] == [s.name for s in load_recipe(project / "recipe.yaml").stages]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "00-finetune", "01-prune", "02-distill", "03-prune", "04-quantize", "05-evaluate", "06-save"]
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))
    # costs per stage: the structured cut halves the MACs, int8 shrinks the file
    stages = metrics["stages"]
    assert stages[1]["measurement"]["macs"] <= 0.5 * metrics["dense"]["measurement"]["macs"]
    assert stages[4]["measurement"]["size_bytes"] < stages[3]["measurement"]["dense_size_bytes"]
    assert stages[5]["result"]["accuracy"] == stages[5]["measurement"]["accuracy"]


def test_saved_model_loads_back_float_and_int8(project, reference, one_thread):
    from secateurs_recipe_tiny import build

    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = secateurs.load(build(), reference.out_dir / "model").eval()
    assert model.fc1.in_features < 256 and float((model.fc1.weight == 0).float().mean()) >= 0.5 - 1e-3
    quantized = load_int8(secateurs.load(build(), reference.out_dir / "model").eval(),
                          reference.out_dir / "model" / "model.int8.safetensors")
    assert quantized_layers(quantized) == ["fc1", "head"]
    with torch.no_grad():
        assert (quantized(x) - model(x)).abs().max() < 0.1 * model(x).abs().max()


def test_same_recipe_and_seed_give_bit_identical_masks_and_metrics(project, reference, tmp_path, one_thread):
    again = runner.run_recipe(project / "recipe.yaml", tmp_path / "again")
    assert runner.without_timing(again.metrics) == runner.without_timing(reference.metrics)
    for checkpoint in (reference.out_dir / "checkpoints").iterdir():
        first = load_file(str(checkpoint / "state.safetensors"))
        second = load_file(str(tmp_path / "again" / "checkpoints" / checkpoint.name / "state.safetensors"))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)
    masks = load_file(str(reference.out_dir / "checkpoints" / "03-prune" / "state.safetensors"))
    assert {k for k in masks if k.endswith("_prune_mask")} == {"conv1.weight_prune_mask", "conv2.weight_prune_mask",
                                                               "fc1.weight_prune_mask"}


def test_resume_after_a_crash_continues_from_the_last_finished_stage(project, reference, tmp_path, monkeypatch,
                                                                      one_thread):
    out = tmp_path / "crashed"

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setitem(runner.STAGE_RUNNERS, "distill", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        runner.run_recipe(project / "recipe.yaml", out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["00-finetune", "01-prune"]
    assert [s["stage"] for s in json.loads((out / "metrics.json").read_text())["stages"]] == ["finetune", "prune"]
    monkeypatch.undo()
    resumed = runner.run_recipe(project / "recipe.yaml", out, resume=True)
    assert resumed.resumed_from == DISTILL
    assert resumed.ran == list(range(DISTILL, len(reference.metrics["stages"])))
    assert runner.without_timing(resumed.metrics["stages"]) == runner.without_timing(reference.metrics["stages"])
    # nothing left to do: a second resume runs no stage and keeps the metrics
    assert runner.run_recipe(project / "recipe.yaml", out, resume=True).ran == []


def test_resume_refuses_a_changed_recipe_and_a_folder_without_a_run(project, reference, tmp_path, capsys):
    changed = tmp_path / "changed.yaml"
    changed.write_text((project / "recipe.yaml").read_text().replace("seed: 3", "seed: 4").replace(
        "dense.safetensors", str(project / "dense.safetensors")).replace(
        "calib.safetensors", str(project / "calib.safetensors")))
    with pytest.raises(InvalidArgument, match="config hash .* differs"):
        runner.run_recipe(changed, reference.out_dir, resume=True)
    with pytest.raises(FileProblem, match="holds no run.json"):
        runner.run_recipe(project / "recipe.yaml", tmp_path / "empty", resume=True)
    assert main(["run", str(project / "recipe.yaml"), "--out", str(reference.out_dir)]) == 2
    assert "is not empty" in capsys.readouterr().err


# ------------------------------------------------------------------------ quantize

def test_int8_quantizes_linear_only_keeps_zeros_and_round_trips(project, tmp_path, one_thread):
    from secateurs_recipe_tiny import build

    model = build().eval()
    secateurs.prune(model, "magnitude", 0.5, prune_last=True)
    quantized = quantize_int8(model)
    assert quantized_layers(quantized) == ["fc1", "head"]
    assert isinstance(quantized.conv1, torch.nn.Conv2d)          # convolutions are left in float
    state = int8_state(quantized)
    assert state["fc1.weight"].dtype == torch.int8
    assert torch.equal(state["fc1.weight"] == 0, model.fc1.weight == 0)   # symmetric: pruned stays zero
    assert int8_bytes(quantized) < secateurs.io.dense_bytes(model)
    save_int8(quantized, tmp_path / "q.safetensors")
    loaded = load_int8(build().eval(), tmp_path / "q.safetensors")
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(x), quantized(x))


def test_a_save_stage_with_onnx_writes_a_checked_file(project, tmp_path, one_thread):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    recipe = project / "onnx.yaml"
    recipe.write_text(PIPELINE.replace("  - save: {}", "  - save: {onnx: true}").replace(
        "dense.safetensors", str(project / "dense.safetensors")).replace(
        "calib.safetensors", str(project / "calib.safetensors")))
    result = runner.run_recipe(recipe, tmp_path / "run")
    save = result.metrics["stages"][-1]["result"]
    assert "model.onnx" in save["files"] and save["onnx"]["max_abs_diff"] < 1e-4
    onnx.checker.check_model(str(tmp_path / "run" / "model" / "model.onnx"))
