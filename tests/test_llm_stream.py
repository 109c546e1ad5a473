"""Streaming pruning of saved Hugging Face checkpoints: same weights as in memory, safe folders."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from secateurs.errors import FileProblem, MissingData
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
