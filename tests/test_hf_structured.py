"""Structured pruning of Hugging Face models built from random-init configs (no hub access)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from secateurs import hf  # noqa: E402
from secateurs.errors import FileProblem, MissingData  # noqa: E402
from secateurs.graph.groups import analyze  # noqa: E402
from secateurs.measure import count_macs  # noqa: E402
from secateurs.structured import prune_structured  # noqa: E402

transformers.logging.set_verbosity_error()


def _tokens(vocab: int = 96) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))}


def bert():
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, num_labels=3)
    return transformers.BertForSequenceClassification(config), _tokens()


def gpt2():
    config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config), _tokens()


def llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config), _tokens()


def vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, num_labels=5)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return transformers.ViTForImageClassification(config), {"pixel_values": pixels}


MODELS = {"bert": bert, "gpt2": gpt2, "llama": llama, "vit": vit}


def _build(name: str):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


def _logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@pytest.mark.parametrize("name", MODELS)
def test_nothing_unknown_and_every_layer_prunable(name):
    model, inputs = _build(name)
    analysis = analyze(model, inputs)
    assert analysis.unknown_ops == []
    kinds = [g.kind for g in analysis.groups if any(g.prunable)]
    assert kinds.count("head") == 2          # one head group per layer
    assert kinds.count("channel") >= 2       # the MLP of each layer (plus the residual stream)


@pytest.mark.parametrize("name", MODELS)
def test_half_the_macs(name, one_thread):
    model, inputs = _build(name)
    before = _logits(model, inputs)
    plan = prune_structured(model, inputs, target="macs=0.5")
    assert plan.macs_after <= 0.5 * plan.macs_before
    assert plan.macs_after >= 0.3 * plan.macs_before   # the search stops near the target, not far below
    assert plan.params_after < plan.params_before
    assert count_macs(model, inputs)[0] == plan.macs_after
    model.train()
    out = _logits(model, inputs)
    assert out.shape == before.shape
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.dim() > 1)


@pytest.mark.parametrize("name", MODELS)
def test_ratio_zero_is_identity(name):
    model, inputs = _build(name)
    reference = copy.deepcopy(model)
    prune_structured(model, inputs, 0.0)
    torch.testing.assert_close(_logits(model, inputs), _logits(reference, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_uneven_widths_save_through_the_plan(name, tmp_path):
    model, inputs = _build(name)
    plan = prune_structured(model, inputs, 0.4, scope="global")
    expected = _logits(model, inputs)
    how = hf.save_pretrained(model, tmp_path / "out", plan)
    if how == "secateurs":
        assert (tmp_path / "out" / hf.PLAN_FILE).is_file()
    loaded = hf.load_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded, inputs), expected)


def test_uniform_llama_reloads_with_plain_transformers(tmp_path):
    model, inputs = _build("llama")
    prune_structured(model, inputs, 0.5, scope="local")
    expected = _logits(model, inputs)
    assert hf.save_pretrained(model, tmp_path / "out") == "transformers"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["intermediate_size"] == 64
    assert config["num_key_value_heads"] == 1 and config["num_attention_heads"] == 2
    assert config["hidden_size"] == 32 and config["head_dim"] == 16
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(loaded, inputs), expected)


def test_uniform_bert_mlp_reloads_with_plain_transformers(tmp_path):
    model, inputs = _build("bert")
    prune_structured(model, inputs, 0.25, scope="local", units=("channel",), ignore=["*embeddings*", "*pooler*"])  # the pooler width is not in the config
    expected = _logits(model, inputs)
    assert hf.save_pretrained(model, tmp_path / "out") == "transformers"
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.intermediate_size == 96
    torch.testing.assert_close(_logits(loaded, inputs), expected)


def test_gpt2_tied_head_stays_tied():
    model, inputs = _build("gpt2")
    prune_structured(model, inputs, 0.5, scope="local")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.in_features == model.transformer.wte.embedding_dim == 32
    assert model.transformer.h[0].attn.split_size == 32     # two of four heads left


def test_gqa_heads_leave_whole_key_value_groups():
    model, inputs = _build("llama")
    prune_structured(model, inputs, 0.5, scope="local", units=("head",))
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.out_features == attention.v_proj.out_features == 16   # one kv head
    assert attention.q_proj.out_features == 32                                    # its two query heads
    assert attention.o_proj.in_features == 32


def test_save_pretrained_refuses_bad_output(tmp_path):
    model, inputs = _build("llama")
    plan = prune_structured(model, inputs, 0.4, scope="global")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(FileProblem, match="not empty"):
        hf.save_pretrained(model, tmp_path / "full", plan)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x.txt"]
    if hf.fit_config(model) is None:
        with pytest.raises(MissingData, match="plan"):
            hf.save_pretrained(model, tmp_path / "noplan")
        assert not (tmp_path / "noplan").exists()
    with pytest.raises(FileProblem, match="config.json"):
        hf.load_pretrained(tmp_path / "full")


def test_config_tells_the_pruned_sizes_in_place():
    model, inputs = _build("llama")
    prune_structured(model, inputs, 0.5, scope="local")
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    assert model.config.intermediate_size == 64 and model.config.hidden_size == 32


def test_heads_the_cut_would_break_are_frozen_and_the_rest_is_cut():
    # Phi-3 slices its fused q/k/v projection with bounds read from the config at run time:
    # its heads are frozen (named, with the failing line), its MLP channels are cut
    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=128, pad_token_id=0,
                                     bos_token_id=0, eos_token_id=0)
    model, inputs = transformers.Phi3ForCausalLM(config).eval(), _tokens()
    shape = _logits(model, inputs).shape
    with pytest.warns(UserWarning, match=r"(?s)kept whole.*self_attn.*units=\(\"channel\",\)"):
        plan = prune_structured(model, inputs, 0.5)
    assert plan.frozen and {f["kind"] for f in plan.frozen} == {"head"}
    assert all(f["module"].endswith("self_attn") and f["op"].startswith("modeling_phi3.py:") for f in plan.frozen)
    assert model.config.num_attention_heads == 4 and model.model.layers[0].self_attn.qkv_proj.out_features == 128
    assert model.model.layers[0].mlp.down_proj.in_features < 128
    assert _logits(model, inputs).shape == shape
