"""Streaming pruning of saved Hugging Face checkpoints: same weights as in memory, safe folders."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from secateurs.errors import FileProblem, InvalidArgument, MissingData, WeightsMismatch
from secateurs.llm import LLMConfig, prune_llm
from secateurs.llm import stream
from secateurs.llm.stream import prune_pretrained

transformers = pytest.importorskip("transformers")
VOCAB = 128
TOKENIZER_CONFIG = '{"model_max_length": 64}\n'


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA with tied embeddings, saved in several shards, plus a tokenizer file."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("llama") / "src"
    transformers.LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="60KB")
    (folder / "tokenizer_config.json").write_text(TOKENIZER_CONFIG)
    return folder


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 16), generator=generator) for _ in range(2)]


def in_memory(folder: Path, batches, config: LLMConfig, auto=transformers.AutoModelForCausalLM):
    model = auto.from_pretrained(folder).eval()
    prune_llm(model, batches, config)
    return model


@pytest.mark.parametrize("options", [dict(method="wanda"), dict(method="sparsegpt"),
                                     dict(method="sparsegpt", pattern="2:4"), dict(method="wanda", owl=0.2)],
                         ids=["wanda", "sparsegpt", "sparsegpt-2:4", "wanda-owl"])
def test_streaming_matches_in_memory_and_reloads(llama_dir, batches, tmp_path, one_thread, options):
    assert len(list(llama_dir.glob("*.safetensors"))) > 3  # really sharded
    before = folder_hash(llama_dir)
    config = LLMConfig(**options)
    plan = prune_pretrained(llama_dir, tmp_path / "out", batches, config)
    assert folder_hash(llama_dir) == before

    expected = in_memory(llama_dir, batches, config)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    want, got = expected.state_dict(), pruned.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        assert torch.equal(pruned(batches[0]).logits, expected(batches[0]).logits)

    assert len(plan.layers) == 3 * 7 and all(abs(r.sparsity - 0.5) < 0.02 for r in plan.layers if not config.owl)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(shards) == 4 and sorted(set(index["weight_map"].values())) == shards  # a shard per block + the rest
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == TOKENIZER_CONFIG
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_encoder_streams_like_in_memory(tmp_path, batches, one_thread):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(tmp_path / "src", max_shard_size="100KB")
    calibration = [dict(input_ids=b, attention_mask=torch.ones_like(b)) for b in batches]
    prune_pretrained(tmp_path / "src", tmp_path / "out", calibration, LLMConfig(method="sparsegpt"))
    expected = in_memory(tmp_path / "src", calibration, LLMConfig(method="sparsegpt"), auto=transformers.AutoModel)
    pruned = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    want, got = expected.state_dict(), pruned.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_failure_midway_writes_nothing(llama_dir, batches, tmp_path, monkeypatch):
    calls = []

    def failing(block, inputs, config, prefix=""):
        calls.append(prefix)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the second block")
        return []

    monkeypatch.setattr(stream, "prune_block", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prune_pretrained(llama_dir, tmp_path / "out", batches, LLMConfig())
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging folder


@pytest.mark.parametrize("case", ["missing", "no_config", "out_is_src", "out_in_src", "out_not_empty", "no_batches"])
def test_bad_inputs_fail_and_write_nothing(llama_dir, batches, tmp_path, case):
    src, out = llama_dir, tmp_path / "out"
    expected = FileProblem
    if case == "missing":
        src = tmp_path / "nowhere"
    elif case == "no_config":
        src = tmp_path / "bare"
        src.mkdir()
        (src / "model.safetensors").write_bytes(b"")
    elif case == "out_is_src":
        out = llama_dir
    elif case == "out_in_src":
        out = llama_dir / "pruned"
    elif case == "out_not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "no_batches":
        batches, expected = [], MissingData
    before, listing = folder_hash(llama_dir), sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(expected, match=r"src=|config.json|overwrite|inside|not empty|calibration batch"):
        prune_pretrained(src, out, batches, LLMConfig())
    assert folder_hash(llama_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_folder_without_safetensors_is_refused(tmp_path, batches):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    config.save_pretrained(tmp_path / "src")
    with pytest.raises(FileProblem, match="safetensors"):
        prune_pretrained(tmp_path / "src", tmp_path / "out", batches, LLMConfig())
    assert not (tmp_path / "out").exists()


def test_dtype_prunes_and_writes_in_that_dtype(llama_dir, batches, tmp_path, one_thread):
    config = LLMConfig(method="wanda")
    prune_pretrained(llama_dir, tmp_path / "out", batches, config, dtype=torch.float64)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float64"
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    expected = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64).eval()
    prune_llm(expected, batches, config)
    want, got = expected.state_dict(), pruned.state_dict()
    assert all(got[k].dtype == torch.float64 and torch.equal(got[k], want[k]) for k in want)


def _break_checkpoint(folder: Path, case: str) -> None:
    """Damage a copy of a sharded checkpoint the way `case` says."""
    from safetensors.torch import load_file, save_file

    index_path = folder / stream.INDEX_FILE
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    name = "model.layers.0.mlp.down_proj.weight"
    shard = folder / weight_map[name]
    if case == "missing_tensor":
        del weight_map[name]
    elif case == "wrong_shape":
        tensors = load_file(shard)
        tensors[name] = tensors[name][:, :-1].contiguous()
        save_file(tensors, shard, metadata={"format": "pt"})
    elif case == "missing_shard":
        shard.unlink()
    elif case == "not_in_its_shard":
        weight_map[name] = next(s for s in sorted(set(weight_map.values())) if s != shard.name)
    elif case == "corrupt_shard":
        shard.write_bytes(b"\xff" * 64)
    elif case == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:-100])
    index_path.write_text(json.dumps(index))


DAMAGE = {
    "missing_tensor": (WeightsMismatch, "lacks parameters of LlamaForCausalLM: model.layers.0.mlp.down_proj"),
    "wrong_shape": (WeightsMismatch, r"down_proj.weight is \[64, 127\], expected \[64, 128\]"),
    "missing_shard": (FileProblem, "shard model-.* named in .* is missing"),
    "not_in_its_shard": (FileProblem, "are in the index of .* but not in their shards"),
    "corrupt_shard": (FileProblem, "cannot read the safetensors header .* exceeds the file size"),
    "truncated_shard": (FileProblem, "cannot read the safetensors header .* shorter than its header says"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_checkpoint_is_refused_before_any_work(llama_dir, batches, tmp_path, case):
    error, message = DAMAGE[case]
    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    _break_checkpoint(src, case)
    with pytest.raises(error, match=message) as caught:
        prune_pretrained(src, tmp_path / "out", batches, LLMConfig())
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("options, message", [
    (dict(dtype="float16"), "dtype must be None or a floating torch dtype.*got 'float16'"),
    (dict(dtype=torch.int8), "dtype must be .* got torch.int8"),
    (dict(shard_bytes=0), "shard_bytes must be a positive integer .* got 0"),
    (dict(method="obs"), "method must be one of .* got 'obs'"),
], ids=["dtype-string", "dtype-int", "shard-bytes", "method"])
def test_bad_options_are_refused(llama_dir, batches, tmp_path, options, message):
    with pytest.raises(InvalidArgument, match=message):
        prune_pretrained(llama_dir, tmp_path / "out", batches, **options)
    assert list(tmp_path.iterdir()) == []


def test_only_the_block_being_pruned_is_in_memory(llama_dir, batches, tmp_path, monkeypatch, one_thread):
    skeleton, real_blocks, outside_real = [], [], []
    build, prune = stream.build_skeleton, stream.prune_block

    def watching(block, inputs, config, prefix=""):
        model = skeleton[0]
        real_blocks.append([i for i, b in enumerate(model.model.layers)
                            if any(p.device.type != "meta" for p in b.parameters())])
        outside_real.append([n for n, p in model.named_parameters() if ".layers." not in n and p.device.type != "meta"])
        return prune(block, inputs, config, prefix)

    monkeypatch.setattr(stream, "build_skeleton", lambda folder: skeleton.append(build(folder)) or skeleton[0])
    monkeypatch.setattr(stream, "prune_block", watching)
    prune_pretrained(llama_dir, tmp_path / "out", batches, LLMConfig())
    assert real_blocks == [[0], [1], [2]]
    assert outside_real == [[], [], []]  # embeddings and head are dropped once the first inputs are captured


def test_single_file_untied_checkpoint_copies_the_rest_byte_for_byte(batches, tmp_path, one_thread):
    from safetensors import safe_open

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    assert (tmp_path / "src" / "model.safetensors").is_file()  # one file, no index
    prune_pretrained(tmp_path / "src", tmp_path / "out", batches, LLMConfig(method="magnitude"))

    expected = in_memory(tmp_path / "src", batches, LLMConfig(method="magnitude"))
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    want, got = expected.state_dict(), pruned.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert pruned.lm_head.weight is not pruned.model.embed_tokens.weight
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as dense, \
            safe_open(str(tmp_path / "out" / index["weight_map"]["lm_head.weight"]), "pt") as copied:
        assert sorted(copied.keys()) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
        assert all(torch.equal(copied.get_tensor(k), dense.get_tensor(k)) for k in copied.keys())
