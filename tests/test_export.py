"""ONNX export: pruned models written as ONNX run in onnxruntime as they do in torch; bad input refused."""
from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch

import secateurs as sc
from secateurs.errors import FileProblem, IncompatibleLayer, InvalidArgument
from secateurs.examples import zoo
from secateurs.quantize import quantize_int8

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from secateurs.export import export_onnx  # noqa: E402

from .test_cli import project, run  # noqa: E402,F401  (the CLI's user project: a factory and weights)


def _ort(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@pytest.mark.parametrize("name", ["resnet18", "vit_sdpa", "lstm_classifier", "densenet"])
def test_pruned_zoo_model_runs_in_onnxruntime_at_any_batch(name, tmp_path, one_thread):
    model, x = zoo.ZOO[name]()
    model.eval()
    sc.prune_structured(model, x, 0.5)
    report = export_onnx(model, x, tmp_path / "m.onnx")
    assert report.dynamic_batch and report.bytes == (tmp_path / "m.onnx").stat().st_size > 0
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    x = _first(x)
    for rows in (1, 5):   # neither is the batch it was traced with
        batch = x[torch.arange(rows) % x.shape[0]]
        got = _ort(tmp_path / "m.onnx", batch)[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(batch).numpy(), atol=1e-4, rtol=1e-3)
    assert not list(tmp_path.glob(".secateurs-*"))   # no staging file left behind


def test_masks_are_folded_into_the_file_and_the_model_keeps_them(tmp_path, one_thread):
    model, x = zoo.ZOO["resnet18"]()
    sc.prune(model, "magnitude", 0.6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = export_onnx(model, x, tmp_path / "m.onnx", dynamic_batch=False)
    assert report.batches_checked == [_first(x).shape[0]]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # masks still there
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer]
    convs = [w for w in weights if w.ndim == 4]
    assert convs and all(np.mean(w == 0) == pytest.approx(0.6, abs=0.01) for w in convs)
    assert not any("mask" in t.name for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer)


def test_refusals_name_the_problem_and_write_nothing(tmp_path, one_thread):
    model, x = zoo.ZOO["gated_mlp"]()
    existing = tmp_path / "m.onnx"
    existing.write_text("a user's file")
    with pytest.raises(FileProblem, match="exists .*overwrite"):
        export_onnx(model, x, existing)
    assert existing.read_text() == "a user's file"
    with pytest.raises(FileProblem, match="is a directory"):
        export_onnx(model, x, tmp_path)
    with pytest.raises(InvalidArgument, match="opset must be an integer >= 7"):
        export_onnx(model, x, tmp_path / "o.onnx", opset=3)
    with pytest.raises(InvalidArgument, match="no tensor"):
        export_onnx(model, (), tmp_path / "o.onnx")
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(IncompatibleLayer, match="int8 dynamic-quantized layers do not export"):
        export_onnx(quantize_int8(mlp), torch.randn(2, 8), tmp_path / "o.onnx")

    class Branchy(torch.nn.Module):   # data-dependent control flow: torch.export cannot trace it
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(IncompatibleLayer, match="torch.onnx.export failed"):
        export_onnx(Branchy(), torch.randn(2, 3), tmp_path / "o.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_command_line_exports_a_pruned_folder(project, capsys):  # noqa: F811
    code, _, err = run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors", "--structured",
                        "--ratio", "0.5", "--input-shape", "4,12", "--out", "sp"], capsys)
    assert code == 0, err
    code, out, err = run(["export", "sp", "--model", "usermodels:build", "--input-shape", "1,12",
                          "--out", "sp.onnx"], capsys)
    assert code == 0, err
    assert "wrote sp.onnx" in out and "dynamic batch" in out
    from usermodels import build
    pruned = sc.load(build(), project / "sp")
    x = torch.randn(7, 12)
    np.testing.assert_allclose(_ort(project / "sp.onnx", x)[0], pruned(x).detach().numpy(), atol=1e-5)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("argv,message", [
    (["export", "nowhere", "--out", "a.onnx"], "model folder nowhere does not exist"),
    (["export", "sp", "--out", "sp/m.onnx"], "is inside the input folder sp"),
    (["export", "sp", "--out", "taken.onnx"], "exists (pass overwrite=True / --overwrite"),
    (["export", "sp", "--out", "a.onnx", "--opset", "2"], "opset must be an integer >= 7"),
    (["export", "sp", "--out", "a.onnx", "--input-shape", "1,x"], "--input-shape must be positive integers"),
])
def test_command_line_bad_input_is_one_line_exit_2(project, capsys, argv, message):  # noqa: F811
    assert run(["prune", "--model", "usermodels:build", "--weights", "w.safetensors", "--structured",
                "--ratio", "0.5", "--input-shape", "4,12", "--out", "sp"], capsys)[0] == 0
    (project / "taken.onnx").write_text("keep")
    before = _digest(project / "sp")
    argv = argv + ["--model", "usermodels:build"] + ([] if "--input-shape" in argv else ["--input-shape", "1,12"])
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert _digest(project / "sp") == before and (project / "taken.onnx").read_text() == "keep"
    assert not (project / "a.onnx").exists()



def test_head_pruned_hugging_face_llama_exports_with_keyword_inputs(tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = {"input_ids": torch.randint(0, 128, (2, 16))}
    outside = [n for n, _ in model.named_parameters() if ".layers." not in n]
    sc.prune_structured(model, ids, 0.5, ignore=outside)
    assert model.config.num_key_value_heads == 1
    export_onnx(model, ids, tmp_path / "llama.onnx")
    export_onnx(model, ids["input_ids"], tmp_path / "positional.onnx")   # a plain tensor: no cache either
    other = torch.randint(0, 128, (3, 16))
    with torch.no_grad():
        expected = model(input_ids=other).logits.numpy()
    for name in ("llama.onnx", "positional.onnx"):
        np.testing.assert_allclose(_ort(tmp_path / name, other)[0], expected, atol=1e-4, rtol=1e-3)


def test_command_line_exports_a_hugging_face_folder(tmp_path, capsys, one_thread):
    transformers = pytest.importorskip("transformers")
    from secateurs.hf import save_pretrained

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4)
    model = transformers.BertModel(config).eval()
    ids = {"input_ids": torch.randint(0, 128, (2, 16))}
    outside = [n for n, _ in model.named_parameters() if ".layer." not in n]
    sc.prune_structured(model, ids, 0.5, units=["channel"], ignore=outside)   # MLP channels: plain transformers
    save_pretrained(model, tmp_path / "bert")
    code, out, err = run(["export", str(tmp_path / "bert"), "--hf", "--seqlen", "12",
                          "--out", str(tmp_path / "bert.onnx")], capsys)
    assert code == 0, err
    other = torch.randint(0, 128, (3, 12))
    with torch.no_grad():
        expected = model(input_ids=other).last_hidden_state.numpy()
    np.testing.assert_allclose(_ort(tmp_path / "bert.onnx", other)[0], expected, atol=1e-4, rtol=1e-3)
    code, _, err = run(["export", str(tmp_path / "bert"), "--hf", "--input-shape", "1,3",
                        "--out", str(tmp_path / "x.onnx")], capsys)
    assert code == 2 and "--input-shape is for --model" in err and not (tmp_path / "x.onnx").exists()


class _SideInputs(torch.nn.Module):
    """Keyword inputs, a side input whose first dimension is not the batch, and a bool output."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, scale, offset):
        y = self.linear(x * scale + offset)
        return y, y.sum(-1) > 0


def test_keyword_inputs_in_any_order_side_inputs_and_bool_outputs(tmp_path, one_thread):
    torch.manual_seed(0)
    model = _SideInputs()
    inputs = {"offset": torch.randn(4), "scale": torch.tensor(2.0), "x": torch.randn(2, 4)}   # not forward's order
    report = export_onnx(model, inputs, tmp_path / "m.onnx")
    assert report.batches_checked == [1, 2, 3] and report.converted_from is None
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "scale", "offset"]
    assert session.get_inputs()[2].shape == [4]                      # the side input keeps its size


def test_half_precision_models_are_exported_in_float32(tmp_path, one_thread):
    torch.manual_seed(0)
    model = _SideInputs().to(torch.bfloat16)
    inputs = {"x": torch.randn(2, 4), "scale": torch.tensor(2.0), "offset": torch.randn(4)}
    report = export_onnx(model, {k: v.to(torch.bfloat16) for k, v in inputs.items()}, tmp_path / "m.onnx")
    assert report.converted_from == "bfloat16"
    assert next(model.parameters()).dtype == torch.bfloat16          # the user's model is left as it was
    got = _ort(tmp_path / "m.onnx", inputs["x"], inputs["scale"], inputs["offset"])[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model.float()(**inputs)[0].numpy(), atol=1e-5)


def test_an_opset_the_exporter_does_not_honour_is_refused(tmp_path, one_thread):
    with pytest.raises(IncompatibleLayer, match="not the requested 99"):
        export_onnx(_SideInputs(), (torch.randn(2, 4), torch.tensor(1.0), torch.randn(4)), tmp_path / "sub" / "m.onnx",
                    opset=99)
    assert not (tmp_path / "sub").exists()                           # nothing left, not even the folder
