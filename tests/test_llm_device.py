"""Blocks onloaded to a device one at a time (the CPU stands in for the accelerator here), fp32
statistics, and no wasted work: magnitude runs no forward pass, the default one pass per block."""
from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from torch import nn

from secateurs.errors import InvalidArgument, MissingData
from secateurs.llm import engine, prune_llm
from secateurs.llm.stats import LayerStats
from secateurs.llm.stream import prune_pretrained
import tests.test_cli_hf as cli_hf
from tests.test_llm_engine import dict_batches, llama, token_batches

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
zoo = cli_hf.zoo  # the module-scoped fixture of tests/test_cli_hf.py: random-init HF folders and texts
CALIB, run = cli_hf.CALIB, cli_hf.run


@contextlib.contextmanager
def counting_forwards():
    """Counts every nn.Module forward call anywhere while active."""
    calls = {"n": 0}

    def count(module, args):
        calls["n"] += 1
    handle = nn.modules.module.register_module_forward_pre_hook(count)
    try:
        yield calls
    finally:
        handle.remove()


def block_calls(model: nn.Module) -> list[int]:
    """Per decoder layer, a live count of its forward calls."""
    counts = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


# ------------------------------------------------------------------ the device

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("offload", [False, True])
def test_pruning_on_a_device_gives_the_weights_of_pruning_in_place(method, offload):
    here, there = llama(), llama()
    batches = dict_batches(n=3)
    prune_llm(here, batches, method=method)
    plan = prune_llm(there, batches, method=method, device="cpu", offload_inputs=offload)
    assert plan.config.device == "cpu"
    for (name, a), b in zip(here.state_dict().items(), there.state_dict().values()):
        assert torch.equal(a, b), name


def test_one_block_is_on_the_device_at_a_time(monkeypatch):
    events = []
    real = engine.onloaded

    @contextlib.contextmanager
    def recording(block, device):
        events.append(("on", device))
        with real(block, device):
            yield block
        events.append(("off", device))
    monkeypatch.setattr(engine, "onloaded", recording)
    model = llama()
    prune_llm(model, token_batches(2), method="wanda", device="cpu")
    assert events == [("on", "cpu"), ("off", "cpu")] * len(model.model.layers)


def test_statistics_are_fp32_whatever_the_model_dtype():
    stats = LayerStats(8, with_hessian=True)
    stats.add(torch.randn(4, 5, 8, dtype=torch.bfloat16))
    assert stats.sumsq.dtype == stats.hessian.dtype == torch.float32
    model = llama().to(torch.bfloat16)
    prune_llm(model, token_batches(2), method="sparsegpt", device="cpu")
    w = model.model.layers[1].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16 and ((w == 0).sum(1) == w.shape[1] // 2).all()


def test_a_model_whose_blocks_are_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = llama()
    with pytest.raises(InvalidArgument, match="on the meta device .*--stream"):
        prune_llm(model, token_batches(1), method="magnitude", device="cpu")


@pytest.mark.parametrize("device, match", [("nonsense", "must name a torch device"),
                                           ("meta", "holds no data"),
                                           ("cuda:7", "cuda:7")])
def test_a_bad_device_is_refused_before_any_work(device, match):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    model = llama()
    dense = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgument, match=match):
        prune_llm(model, token_batches(1), device=device)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_the_stream_prunes_on_the_device_as_in_memory(tmp_path):
    dense = llama()
    dense.save_pretrained(tmp_path / "dense")
    batches = dict_batches(n=3)
    expected = copy.deepcopy(dense)
    prune_llm(expected, batches, method="wanda", sparsity=0.5)
    prune_pretrained(tmp_path / "dense", tmp_path / "out", batches, method="wanda", sparsity=0.5,
                     device="cpu", offload_inputs=True)
    streamed = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    for (name, a), b in zip(expected.state_dict().items(), streamed.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ no wasted work

def test_magnitude_runs_no_forward_pass_and_needs_no_data():
    model, dense = llama(), llama()
    with counting_forwards() as calls:
        plan = prune_llm(model, None, method="magnitude", sparsity=0.5)
    assert calls["n"] == 0 and len(plan.layers) == 14
    with_data = llama()
    prune_llm(with_data, token_batches(2), method="magnitude", sparsity=0.5)  # data given: still ignored
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), with_data.state_dict().values()))
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, dense.model.layers[0].mlp.up_proj.weight)
    with counting_forwards() as calls:
        prune_llm(llama(), token_batches(2), method="wanda")
    assert calls["n"] > 0  # the counter does count


def test_magnitude_streams_without_a_forward_pass(tmp_path):
    llama().save_pretrained(tmp_path / "dense")
    with counting_forwards() as calls:
        plan = prune_pretrained(tmp_path / "dense", tmp_path / "out", [], method="magnitude", sparsity=0.5)
    assert calls["n"] == 0 and len(plan.layers) == 14


def test_methods_that_need_data_say_so():
    with pytest.raises(MissingData, match="'wanda' needs at least one calibration batch"):
        prune_llm(llama(), None, method="wanda")
    with pytest.raises(MissingData, match="needs at least one calibration batch"):
        prune_llm(llama(), None, method="magnitude", owl=0.1)


@pytest.mark.parametrize("options, passes, probe", [
    ({}, 2, 0),                          # statistics, then the pruned block's outputs
    ({"measure_error": True}, 3, 0),     # + the error measured after pruning
    ({"true_sequential": True}, 5, 1),   # a statistics pass per group (4 in LLaMA, found on one batch) + outputs
])
def test_wanda_runs_the_references_pass_count_by_default(options, passes, probe):
    model = llama()
    counts = block_calls(model)
    batches = token_batches(3)
    prune_llm(model, batches, method="wanda", **options)
    n = len(batches)
    # block 0 is also entered once per batch by the capture; the last block gives no next inputs
    assert counts == [passes * n + n + probe] + [passes * n + probe] * (len(counts) - 2) + [(passes - 1) * n + probe]


# ------------------------------------------------------------------ the command line

def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


def test_cli_prunes_block_by_block_on_the_device_while_streaming(zoo, tmp_path, capsys):
    common = ["prune", "--hf", zoo / "llama", "--calib", zoo / "calib.txt", *CALIB, "--sparsity", "0.5"]
    code, _, err = run([*common, "--device", "cpu", "--offload-inputs", "--stream", "--out", tmp_path / "s"], capsys)
    assert code == 0, err
    assert run([*common, "--out", tmp_path / "m"], capsys)[0] == 0
    streamed, in_memory = _weights(tmp_path / "s"), _weights(tmp_path / "m")
    assert streamed.keys() == in_memory.keys()
    for name, tensor in in_memory.items():
        assert torch.equal(streamed[name], tensor), name
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["config"]["device"] == "cpu" and metrics["mode"] == "stream"
    assert "blocks pruned on cpu" in (tmp_path / "s" / "report.md").read_text()


def test_cli_magnitude_needs_no_calibration_file_and_runs_no_forward_pass(zoo, tmp_path, capsys):
    with counting_forwards() as calls:
        code, _, err = run(["prune", "--hf", zoo / "llama", "--method", "magnitude", "--sparsity", "0.5",
                            "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert calls["n"] == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["calibrated"] is False and "calibration" not in metrics["seconds"]
    assert metrics["sparsity"]["pruned_layers"] == pytest.approx(0.5)
    assert "no forward pass" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--device", "nonsense"], "device must name a torch device"),
    (["--structured", "--ratio", "0.25", "--device", "cpu"], "device='cpu' does not apply to structured"),
    (["--method", "wanda", "--no-calib"], "needs calibration text (CLI: --calib FILE)"),
    (["--structured", "--ratio", "0.25", "--true-sequential"], "true_sequential=True does not apply to structured"),
])
def test_cli_bad_device_options_are_one_line_exit_2(zoo, tmp_path, capsys, extra, message):
    argv = {"--hf": zoo / "llama", "--calib": zoo / "calib.txt", "--out": tmp_path / "out", "--sparsity": "0.5"}
    if "--no-calib" in extra:
        del argv["--calib"]
        extra = [e for e in extra if e != "--no-calib"]
    if "--structured" in extra:
        del argv["--sparsity"]
    code, _, err = run(["prune", *[a for kv in argv.items() for a in kv], *CALIB, *extra], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
