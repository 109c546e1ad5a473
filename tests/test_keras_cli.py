"""`secateurs prune --keras`: the PyTorch path's options, outputs and one-line errors, for a .keras file."""
from __future__ import annotations

import json

import pytest

from tests.test_keras_common import _one_torch_thread, fresh, keras, layers, np, sk, to_numpy  # noqa: F401

from secateurs.cli import main  # noqa: E402


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's trained-looking Keras model and calibration data, in .npz and .safetensors form."""
    import torch
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    fresh()
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(8, 3, padding="same", name="conv"),
                              layers.BatchNormalization(name="bn"), layers.ReLU(), layers.MaxPooling2D(),
                              layers.Flatten(), layers.Dense(16, activation="relu", name="fc"),
                              layers.Dense(3, name="head")])
    model.save(tmp_path / "model.keras")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 8, 8, 1)).astype("float32"), rng.integers(0, 3, 40)
    np.savez(tmp_path / "calib.npz", inputs=x, targets=y)
    save_file({"inputs": torch.from_numpy(x), "targets": torch.from_numpy(y)}, str(tmp_path / "calib.safetensors"))
    (tmp_path / "broken.keras").write_bytes(b"not a zip file")
    return tmp_path


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unstructured_writes_a_plain_keras_model_plan_and_metrics(project, capsys):
    code, out, err = run(["prune", "--keras", "model.keras", "--method", "taylor", "--sparsity", "0.5",
                          "--calib", "calib.npz", "--out", "pruned"], capsys)
    assert code == 0, err
    assert {p.name for p in (project / "pruned").iterdir()} == {"model.keras", "model.sparse.safetensors",
                                                                "plan.json", "metrics.json"}
    metrics = json.loads((project / "pruned" / "metrics.json").read_text())
    assert set(metrics) == {"before", "after", "plan", "keras"} and metrics["keras"]["backend"] == sk.backend()
    assert metrics["after"]["nonzeros"] < metrics["before"]["nonzeros"]
    assert metrics["after"]["macs"] == metrics["before"]["macs"] > metrics["after"]["nonzero_macs"]
    plan = json.loads((project / "pruned" / "plan.json").read_text())
    assert plan["method"] == "taylor" and plan["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert [layer["name"] for layer in plan["layers"]] == ["conv/kernel", "fc/kernel"]      # head left alone
    loaded = keras.saving.load_model(project / "pruned" / "model.keras")      # plain Keras, the zeros in place
    zeros = {layer["name"]: layer["zeros"] for layer in plan["layers"]}
    assert (to_numpy(loaded.get_layer("fc").kernel.value) == 0).sum() == zeros["fc/kernel"] > 0
    sparse = sk.io.load_weights(keras.saving.load_model(project / "model.keras"), project / "pruned" / "model.sparse.safetensors")
    assert all(np.array_equal(to_numpy(a.value), to_numpy(b.value)) for a, b in zip(sparse.weights, loaded.weights))
    assert "taylor" in out and "model.keras" in out


def test_nm_pattern_and_structured_target(project, capsys):
    code, _, err = run(["prune", "--keras", "model.keras", "--pattern", "2:4", "--skip-incompatible",
                        "--out", "nm"], capsys)
    assert code == 0, err
    assert json.loads((project / "nm" / "plan.json").read_text())["pattern"] == "2:4"
    code, out, err = run(["prune", "--keras", "model.keras", "--structured", "--target", "macs=0.5",
                          "--calib", "calib.safetensors", "--method", "taylor", "--out", "small"], capsys)
    assert code == 0, err
    metrics = json.loads((project / "small" / "metrics.json").read_text())
    assert metrics["after"]["macs"] <= 0.5 * metrics["before"]["macs"]
    assert metrics["after"]["params"] < metrics["before"]["params"]
    small = keras.saving.load_model(project / "small" / "model.keras")
    assert small.get_layer("conv").filters < 8 and "structured" in out and "taylor" in out


BAD = [
    (["--keras", "missing.keras", "--sparsity", "0.5"], "Keras model file missing.keras does not exist"),
    (["--keras", "calib.npz", "--sparsity", "0.5"], "is not a .keras file"),
    (["--keras", "broken.keras", "--sparsity", "0.5"], "cannot load Keras model broken.keras"),
    (["--keras", "model.keras", "--method", "nope", "--sparsity", "0.5"], "unknown method 'nope'"),
    (["--keras", "model.keras", "--sparsity", "1.5"], r"sparsity must be in \[0, 1\)"),
    (["--keras", "model.keras", "--pattern", "2:4"], r"conv/kernel \(width 1\)"),
    (["--keras", "model.keras", "--weights", "w.safetensors", "--sparsity", "0.5"], "--weights does not apply with --keras"),
    (["--keras", "model.keras", "--owl", "0.1", "--sparsity", "0.5"], "--owl does not apply with --keras"),
    (["--keras", "model.keras", "--method", "taylor", "--sparsity", "0.5"], "criterion 'taylor' needs calibration data"),
    (["--keras", "model.keras", "--structured", "--target", "latency_ms=2"], "macs=, params= or bytes="),
    (["--keras", "model.keras", "--structured", "--sparsity", "0.5"], "--structured takes --remove"),
    (["--keras", "model.keras", "--sparsity", "0.5", "--calib", "missing.npz"], "calibration file missing.npz does not exist"),
    (["--keras", "model.keras", "--keras", "model.keras", "--model", "m:f", "--sparsity", "0.5"], "not allowed with"),
    (["--keras", "model.keras", "--sparsity", "0.5", "--types", "lstm"], "unknown layer type 'lstm'"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m[:28] for _, m in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(project, capsys, argv, message):
    code, out, err = run(["prune", *argv, "--out", "out"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("secateurs") and ": error: " in err
    assert __import__("re").search(message, err), err
    assert not (project / "out").exists()


def test_non_empty_output_directory_needs_overwrite(project, capsys):
    (project / "out").mkdir()
    (project / "out" / "keep.txt").write_text("x")
    code, _, err = run(["prune", "--keras", "model.keras", "--sparsity", "0.5", "--out", "out"], capsys)
    assert code == 2 and "not empty" in err and sorted(p.name for p in (project / "out").iterdir()) == ["keep.txt"]
    code, _, err = run(["prune", "--keras", "model.keras", "--sparsity", "0.5", "--out", "out", "--overwrite"], capsys)
    assert code == 0 and (project / "out" / "model.keras").is_file()
