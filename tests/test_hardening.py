"""Hostile and careless inputs: each ends in one SecateursError line, with nothing changed."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import FileProblem, InvalidArgument, SecateursError


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


class Attention(nn.Module):
    """A hand-written attention block that keeps its head count in an int attribute."""

    def __init__(self, dim: int = 8, num_heads: int = 2):
        super().__init__()
        self.num_heads, self.flag = num_heads, True
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(self.qkv(x)[..., : self.proj.in_features])


@pytest.fixture
def saved(tmp_path):
    """A pruned MLP saved to a folder, and its plan.json as a dict."""
    model = mlp()
    plan = sc.prune_structured(model, ratio=0.5, example_inputs=torch.randn(2, 4))
    sc.save(model, tmp_path / "pruned", plan)
    return tmp_path / "pruned", json.loads((tmp_path / "pruned" / "plan.json").read_text())


def _load_tampered(folder, text: str):
    (folder / "plan.json").write_text(text)
    fresh = mlp()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(SecateursError) as info:
        sc.load(fresh, folder)
    assert "\n" not in str(info.value)
    after = fresh.state_dict()   # nothing was cut: the model is as it was
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    return str(info.value)


@pytest.mark.parametrize("text", ["{not json", "[]", "null", '"a string"', "17", "\xff"])
def test_plan_that_is_not_an_object_is_one_line(saved, text):
    folder, _ = saved
    assert "plan" in _load_tampered(folder, text)


def _edit(record: dict, key: str, value) -> str:
    record = copy.deepcopy(record)
    record["keeps"][key] = value
    return json.dumps(record)


@pytest.mark.parametrize("keep, words", [
    ([0, 3.0, 5, 6], "integer"), ([0, "3", 5, 6], "integer"), ([0, True, 5, 6], "integer"),
    ([3, 0, 5, 6], "sorted"), ([0, 3, 3, 6], "unique"), ([0, 3, 5, 99], "outside"), ([-1, 3, 5, 6], "greater"),
    ([], "keeps no position"), ([0, 3, 5, 7], "differently")])
def test_bad_keeps_are_refused_before_any_cut(saved, keep, words):
    folder, record = saved
    assert words in _load_tampered(folder, _edit(record, "0.bias:0", keep))


@pytest.mark.parametrize("key, words", [(":0", "module.parameter:dim"), ("0.weight", "module.parameter:dim"),
                                        ("nope.weight:0", "does not have"), ("0.weight:5", "dimensions")])
def test_bad_keep_names_are_refused(saved, key, words):
    folder, record = saved
    assert words in _load_tampered(folder, _edit(record, key, [0, 1]))


def test_masked_name_that_is_not_a_parameter_is_refused(saved):
    folder, record = saved
    assert "does not hold" in _load_tampered(folder, json.dumps({**record, "masked": ["0.forward"]}))
    assert "masked" in _load_tampered(folder, json.dumps({**record, "masked": [""]}))


@pytest.mark.parametrize("changes, words", [
    ({"forward": 1}, "not a width field"), ({"training": 0}, "not a width field"), ({"qkv": 1}, "no integer attribute"),
    ({"_private": 1}, "not a width field"), ({"num_heads": [1]}, "no integer attribute"),
    ({"num_heads": True}, "integer"), ({"num_heads": 1.0}, "integer"), ({"num_heads": 0}, "greater"),
    ({"num_heads": 5}, "only lowers"), ({"heads": 1}, "no integer attribute")])
def test_attributes_only_lower_known_head_counts(changes, words):
    model = Attention()
    with pytest.raises(InvalidArgument, match=words):
        sc.structured.replay(model, {"keeps": {}, "attributes": {"": changes}})
    assert model.num_heads == 2 and model.flag is True and type(model).forward is Attention.forward
    assert "forward" not in model.__dict__


def test_attributes_on_a_missing_module_are_refused():
    with pytest.raises(InvalidArgument, match="does not have"):
        sc.structured.replay(Attention(), {"attributes": {"nope": {"num_heads": 1}}})


def test_a_valid_head_count_still_replays():
    model = Attention()
    sc.structured.replay(model, {"keeps": {}, "attributes": {"": {"num_heads": 1}}})
    assert model.num_heads == 1


@pytest.mark.parametrize("blocks, words", [
    ({"removed": [""]}, "at least 1"), ({"removed": ["1", "1"]}, "unique"), ({"removed": [1]}, "string"),
    ({"removed": ["1"], "how": {"1": "explode"}}, "delete"), ({"removed": ["9"]}, "does not have"),
    ({"removed": ["x.y"]}, "does not have")])
def test_bad_block_records_are_refused(blocks, words):
    model = mlp()
    with pytest.raises(SecateursError, match=words):
        sc.blocks.replay_blocks(model, {"blocks": blocks})
    assert len(model) == 6


def test_a_good_plan_still_loads(saved):
    folder, _ = saved
    model = sc.load(mlp(), folder)
    assert model[0].out_features == 4


# ------------------------------------------------------------------ sparse safetensors metadata

def _sparse_file(tmp_path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


SPARSE_PARTS = {"w/values": torch.ones(3), "w/bitmask": torch.tensor([0b10110000], dtype=torch.uint8)}


@pytest.mark.parametrize("metadata, tensors, words", [
    ({"secateurs.sparse": '{"w": [2, 4]}'}, {"w/bitmask": SPARSE_PARTS["w/bitmask"]}, "lacks its values"),
    ({"secateurs.sparse": '{"w": [1000000000, 1000000000, 1000]}'}, SPARSE_PARTS, "does not fit shape"),
    ({"secateurs.sparse": '{"w": [2, 4]}'}, {**SPARSE_PARTS, "w/values": torch.ones(5)}, "5 values for 3"),
    ({"secateurs.sparse": '{"w": [2, -4]}'}, SPARSE_PARTS, "greater than or equal"),
    ({"secateurs.sparse": '{"w": [2.0, 4]}'}, SPARSE_PARTS, "integer"),
    ({"secateurs.sparse": "[1, 2]"}, SPARSE_PARTS, "object"),
    ({"secateurs.sparse": "{oops"}, SPARSE_PARTS, "JSON"),
    ({"secateurs.sparse": '{"w": [2, 4]}', "secateurs.aliases": '{"v": "nothing"}'}, SPARSE_PARTS, "alias"),
    ({"secateurs.aliases": '{"v": 3}'}, {"w": torch.ones(2)}, "string")])
def test_sparse_metadata_that_lies_is_one_line(tmp_path, metadata, tensors, words):
    path = _sparse_file(tmp_path, metadata, tensors)
    with pytest.raises(FileProblem, match=words) as info:
        sc.load_state(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_honest_sparse_metadata_decodes(tmp_path):
    path = _sparse_file(tmp_path, {"secateurs.sparse": '{"w": [2, 4]}', "secateurs.aliases": '{"v": "w"}'}, SPARSE_PARTS)
    state = sc.load_state(path)
    assert state["w"].tolist() == [[1, 0, 1, 1], [0, 0, 0, 0]] and state["v"] is state["w"]


# ------------------------------------------------------------------ a Hugging Face folder with corrupt weights

@pytest.mark.parametrize("stream", [False, True])
def test_corrupt_hf_weights_are_one_line(tmp_path, capsys, stream):
    transformers = pytest.importorskip("transformers")
    from secateurs.cli import main
    from secateurs.llm.tiny import train_tokenizer

    tokenizer = train_tokenizer(["in the beginning was the word and the word was good"] * 20, vocab=64)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                      max_position_embeddings=32)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "calib.txt").write_text("in the beginning was the word\n" * 20)
    capsys.readouterr()   # save_pretrained's progress bar
    code = main(["prune", "--hf", str(folder), "--calib", str(tmp_path / "calib.txt"), "--calib-windows", "2",
                 "--seqlen", "8", "--sparsity", "0.5", "--out", str(tmp_path / "out"), *(["--stream"] * stream)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "header" in err, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ recipes

def _recipe_error(tmp_path, text: str) -> str:
    from secateurs.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(SecateursError) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_billion_laughs_is_refused_quickly(tmp_path):
    import time

    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    start = time.perf_counter()
    message = _recipe_error(tmp_path, "\n".join(lines) + "\nmodel: {demo: digits}\nstages: [evaluate]\n")
    assert "expands to more than" in message and time.perf_counter() - start < 5


def test_a_few_aliases_are_still_fine(tmp_path):
    from secateurs.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text("model: {demo: digits}\nstages:\n  - finetune: &ft {epochs: 1}\n  - finetune: *ft\n")
    assert len(load_recipe(path).stages) == 2


@pytest.mark.parametrize("text, words", [
    ("a: &a [*a]\nmodel: {demo: digits}\nstages: [evaluate]\n", "contains it"),
    ("[" * 5000 + "]" * 5000 + "\n", "nested too deep"),
    ("# " + "x" * (1 << 20) + "\nmodel: {demo: digits}\nstages: [evaluate]\n", "at most"),
])
def test_recursive_deep_and_huge_yaml_is_one_line(tmp_path, text, words):
    assert words in _recipe_error(tmp_path, text)


@pytest.mark.parametrize("stage", ["finetune: {lr: .inf}", "finetune: {lr: .nan}", "distill: {temperature: .inf}",
                                   "finetune: {weight_decay: .inf}", "prune: {sparsity: .nan}"])
def test_non_finite_hyper_parameters_are_refused(tmp_path, stage):
    message = _recipe_error(tmp_path, f"model: {{demo: digits}}\nstages:\n  - {stage}\n")
    assert "recipe.yaml:3:" in message and ("finite" in message or "must be in" in message)


def test_a_seed_beyond_64_bits_is_refused(tmp_path):
    message = _recipe_error(tmp_path, f"model: {{demo: digits}}\nseed: {2**64}\nstages: [evaluate]\n")
    assert "recipe.yaml:2: seed:" in message


# ------------------------------------------------------------------ outputs that cannot mix

def test_a_second_writer_of_a_locked_folder_stops_at_once(tmp_path):
    from secateurs.io import output_lock

    with output_lock(tmp_path / "out"):
        with pytest.raises(FileProblem, match=r"being written by another secateurs process \(pid \d+"):
            with output_lock(tmp_path / "out"):
                pass
    with output_lock(tmp_path / "out"):   # released: free again, and no lock file is left behind
        pass
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    from secateurs.io import output_lock

    (tmp_path / ".out.secateurs-lock").write_text('{"pid": 1}')   # nobody holds its flock
    with output_lock(tmp_path / "out") as out:
        assert out == tmp_path / "out"


def test_cli_run_into_a_folder_another_run_holds_is_one_line_exit_2(tmp_path, capsys):
    from secateurs.cli import main
    from secateurs.io import output_lock

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {demo: digits}\nstages: [evaluate]\n")
    with output_lock(tmp_path / "run"):
        code = main(["run", str(recipe), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("secateurs: error: output folder") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_save_refuses_a_folder_with_files_unless_overwrite(tmp_path):
    model = mlp()
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileProblem, match="not empty"):
        sc.save(model, folder)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    sc.save(model, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "model.sparse.safetensors", "notes.txt",
                                                        "plan.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileProblem) as info:
        sc.save(mlp(), tmp_path / "file" / "out")
    assert "\n" not in str(info.value)


def test_a_failed_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    from secateurs import checkpoint

    def full_disk(*args, **kwargs):
        import errno
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_weights", full_disk)
    with pytest.raises(FileProblem, match="No space left"):
        sc.save(mlp(), tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == []


# ------------------------------------------------------------------ data and numerics in a recipe run

FACTORY = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with a model factory, its weights and a recipe that reads data.safetensors."""
    from safetensors.torch import save_file

    (tmp_path / "secateurs_hardening_mlp.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    from secateurs_hardening_mlp import build

    save_file(build().state_dict(), str(tmp_path / "dense.safetensors"))
    (tmp_path / "recipe.yaml").write_text(
        'model: {factory: "secateurs_hardening_mlp:build", weights: dense.safetensors}\n'
        "data: {calibration: data.safetensors, batch_size: 8}\nstages:\n  - finetune: {epochs: 1, lr: 1.0e-3}\n"
        "  - evaluate\n")
    return tmp_path


def _run(project, capsys, inputs, targets, recipe: str | None = None) -> str:
    from safetensors.torch import save_file

    from secateurs.cli import main

    save_file({"inputs": inputs, "targets": targets}, str(project / "data.safetensors"))
    if recipe is not None:
        (project / "recipe.yaml").write_text((project / "recipe.yaml").read_text().replace("lr: 1.0e-3", recipe))
    code = main(["run", str(project / "recipe.yaml"), "--out", str(project / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
Y = torch.arange(32) % 3


@pytest.mark.parametrize("inputs, targets, words", [
    (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), "holds no examples"),
    (torch.tensor(1.0), torch.tensor(1), "single number (0-d)"),
    (X, torch.tensor(1), "single number (0-d)"),
    (X, Y + 3, "class indices in [0, 3)"),
    (X, -Y - 1, "class indices in [0, 3)"),
    (X, Y.float(), "integer class labels"),
    (X, Y.bool(), "neither class indices"),
    (X, Y[:5], "32 inputs but 5 targets"),
])
def test_degenerate_data_stops_before_anything_is_written(project, capsys, inputs, targets, words):
    assert words in _run(project, capsys, inputs, targets)
    assert not (project / "run").exists()


def test_a_diverging_loss_stops_the_run_naming_the_stage(project, capsys):
    err = _run(project, capsys, X * 1e6, Y, recipe="lr: 1.0e+30")
    assert "stage 0 (finetune)" in err and "NaN" in err
    assert not (project / "run" / "checkpoints" / "00-finetune").exists()


def test_good_data_still_runs(project, capsys):
    from safetensors.torch import save_file

    save_file({"inputs": X, "targets": Y}, str(project / "data.safetensors"))
    result = sc.run_recipe(project / "recipe.yaml", project / "run")
    assert result.ran == [0, 1]


# ------------------------------------------------------------------ user code and the command line

RAISING = '''
from torch import nn


def broken():
    raise RuntimeError("CUDA out of memory\\nmore lines")


def fine():
    return nn.Sequential(nn.Linear(4, 3))
'''


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    (tmp_path / "secateurs_hardening_user.py").write_text(RAISING)
    (tmp_path / "secateurs_hardening_import.py").write_text("raise ValueError('bad config at import')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    sc.io.save_weights(nn.Sequential(nn.Linear(4, 3)), tmp_path / "w.safetensors")
    return tmp_path


def _cli(argv: list[str], capsys) -> str:
    from secateurs.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("factory, words", [
    ("secateurs_hardening_user:broken", "your factory 'secateurs_hardening_user:broken' raised RuntimeError: CUDA out"),
    ("secateurs_hardening_import:build", "raised ValueError: bad config at import"),
    ("../relmodels:mlp", "is not a module name"),
])
def test_a_factory_that_fails_is_reported_as_the_users(user_project, capsys, factory, words):
    from safetensors.torch import save_file

    save_file({"inputs": X, "targets": Y}, str(user_project / "calib.safetensors"))
    err = _cli(["prune", "--model", factory, "--weights", "w.safetensors", "--calib", "calib.safetensors", "--sparsity", "0.5", "--out", "out"], capsys)
    assert words in err and not (user_project / "out").exists()


def test_an_empty_calibration_file_is_refused_by_prune(user_project, capsys):
    from safetensors.torch import save_file

    save_file({"inputs": torch.zeros(0, 4), "targets": torch.zeros(0, dtype=torch.long)},
              str(user_project / "calib.safetensors"))
    err = _cli(["prune", "--model", "secateurs_hardening_user:fine", "--weights", "w.safetensors", "--calib", "calib.safetensors",
                "--sparsity", "0.5", "--out", "out"], capsys)
    assert "holds no examples" in err and not (user_project / "out").exists()


# ------------------------------------------------------------------ the Python API's front doors

@pytest.mark.parametrize("make, example, words", [
    (lambda: nn.DataParallel(mlp()), torch.randn(2, 4), "wrapped in DataParallel: prune model.module"),
    (lambda: mlp().to("meta"), torch.randn(2, 4), "meta device"),
    (lambda: nn.Sequential(nn.ReLU()), torch.randn(2, 4), "no parameters: nothing to prune"),
    (mlp, "a string", "example_inputs must be a tensor"),
    (mlp, torch.tensor(1.0), "0-d tensor"),
    (mlp, torch.randn(2, 5), "your model raised RuntimeError on example_inputs of shape (2, 5)"),
])
def test_structured_front_door_refuses_in_one_line(make, example, words):
    model = make()
    for target in ({"ratio": 0.5}, {"target": "macs=0.5"}):
        with pytest.raises(InvalidArgument) as info:
            sc.prune_structured(model, example, **target)
        assert words in str(info.value) and "\n" not in str(info.value)


def test_masks_refuse_a_meta_model_but_take_data_parallel():
    with pytest.raises(InvalidArgument, match="meta device"):
        sc.prune(mlp().to("meta"), "l1", 0.5)
    wrapped = nn.DataParallel(mlp())
    sc.prune(wrapped, "l1", 0.5)
    assert float((wrapped.module[0].weight == 0).float().mean()) == pytest.approx(0.5)


def test_run_into_a_used_folder_names_resume_not_a_missing_overwrite(project, capsys):
    from safetensors.torch import save_file

    from secateurs.cli import main

    save_file({"inputs": X, "targets": Y}, str(project / "data.safetensors"))
    (project / "run").mkdir()
    (project / "run" / "notes.txt").write_text("mine")
    code = main(["run", str(project / "recipe.yaml"), "--out", str(project / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err and "--overwrite" not in err
    assert [p.name for p in (project / "run").iterdir()] == ["notes.txt"]


def test_a_tampered_hf_plan_is_one_line(tmp_path):
    transformers = pytest.importorskip("transformers")
    from secateurs.hf import load_pretrained, save_pretrained

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertModel(config)
    plan = sc.prune_structured(model, torch.randint(0, 50, (1, 8)), 0.5)
    save_pretrained(model, tmp_path / "bert", plan)
    path = tmp_path / "bert" / "secateurs_plan.json"
    for text in ("{nope", "[]", json.dumps({"keeps": {"embeddings.word_embeddings.weight:1": [3, 1]}})):
        path.write_text(text)
        with pytest.raises(SecateursError) as info:
            load_pretrained(tmp_path / "bert")
        assert "\n" not in str(info.value)
