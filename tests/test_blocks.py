"""Whole-block removal: candidates, block influence and loss scores, physical removal with
Hugging Face bookkeeping, identity stand-ins, and save -> load replay."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs as sc
from secateurs.blocks import SkippedBlock, block_influence, find_blocks, prune_blocks
from secateurs.errors import IncompatibleLayer, InvalidArgument, MissingData
from secateurs.examples.zoo import ZOO, resnet_bottleneck
from secateurs.measure import count_parameters
from secateurs.structured import prune_structured

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")


def resnet():
    torch.manual_seed(0)
    return resnet_bottleneck(layers=(2, 2), width=8, num_classes=10).eval()


def images(batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(0))}


def parameters_of(model: nn.Module, names: list[str]) -> int:
    return sum(p.numel() for name in names for p in model.get_submodule(name).parameters())


def zero_branch(block: nn.Module) -> None:
    """Make a pre-norm encoder block the identity: its attention and MLP outputs become zero."""
    with torch.no_grad():
        for layer in (block.attn.attn.out_proj, block.mlp[2]):
            layer.weight.zero_()
            layer.bias.zero_()


def check_trains(model: nn.Module, inputs: tuple) -> None:
    model.train()
    model(*inputs).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()


# --- candidates and scores ------------------------------------------------------------------

def test_candidates_are_the_shape_preserving_residual_blocks():
    assert find_blocks(resnet(), images()) == ["stages.0.1", "stages.1.1"]
    vit, inputs = ZOO["vit"]()
    assert find_blocks(vit, inputs) == ["blocks.0", "blocks.1"]
    assert find_blocks(tiny_llama(), tokens()) == [f"model.layers.{i}" for i in range(4)]


def test_an_identity_like_block_has_zero_influence_and_goes_first():
    vit, inputs = ZOO["vit"]()
    vit.eval()
    zero_branch(vit.blocks[1])
    scores = block_influence(vit, ["blocks.0", "blocks.1"], [inputs[0]])
    assert abs(scores["blocks.1"]) < 1e-9 and scores["blocks.0"] > 1e-3
    before = vit(*inputs)
    plan = prune_blocks(vit, inputs, n=1, data=[inputs[0]])
    assert plan.removed == ["blocks.1"] and plan.how == {"blocks.1": "delete"}
    assert len(vit.blocks) == 1
    assert torch.allclose(vit(*inputs), before, atol=1e-6)   # it did nothing, so nothing changes


def test_loss_score_is_the_loss_increase_when_skipped():
    vit, inputs = ZOO["vit"]()
    vit.eval()
    zero_branch(vit.blocks[0])
    batches = [(inputs[0], torch.tensor([1, 7]))]
    without_second = copy.deepcopy(vit)
    del without_second.blocks[1]
    with torch.no_grad():
        base = F.cross_entropy(vit(*inputs), batches[0][1])
        increase = float(F.cross_entropy(without_second(*inputs), batches[0][1]) - base)
    plan = prune_blocks(vit, inputs, ratio=0.5, method="loss", data=batches, loss_fn=F.cross_entropy)
    assert abs(plan.scores["blocks.0"]) < 1e-6
    assert plan.scores["blocks.1"] == pytest.approx(increase, abs=1e-6) and abs(increase) > 1e-4
    assert plan.removed == [min(plan.scores, key=plan.scores.get)]


# --- removal ------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [lambda: (resnet(), images()), lambda: ZOO["vit"]()])
def test_removed_blocks_are_gone_and_the_model_still_trains(build):
    model, inputs = build()
    model.eval()
    shape = model(*inputs).shape
    params, _ = count_parameters(model)
    candidates = find_blocks(model, inputs)
    plan = prune_blocks(model, inputs, n=1)
    assert len(plan.removed) == 1 and set(plan.scores) == set(candidates)
    assert plan.params_before == params
    assert plan.params_before - plan.params_after == parameters_of(build()[0], plan.removed)
    assert count_parameters(model)[0] == plan.params_after
    assert model(*inputs).shape == shape
    check_trains(model, inputs)


def test_llama_loses_layers_and_its_cache_still_works():
    model, inputs = tiny_llama(), tokens()
    logits_shape = model(**inputs).logits.shape
    plan = prune_blocks(model, inputs, n=2)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert plan.params_before - plan.params_after == parameters_of(tiny_llama(), plan.removed)
    assert model(**inputs).logits.shape == logits_shape
    # generating with the KV cache gives the tokens a full recomputation gives
    cached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()


def test_identity_stand_in_matches_deletion():
    deleted, skipped, inputs = tiny_llama(), tiny_llama(), tokens()
    plan = prune_blocks(deleted, inputs, n=1)
    prune_blocks(skipped, inputs, candidates=plan.removed, n=1, how="identity")
    assert isinstance(skipped.get_submodule(plan.removed[0]), SkippedBlock)
    assert skipped.config.num_hidden_layers == 4
    assert torch.allclose(skipped(**inputs).logits, deleted(**inputs).logits, atol=1e-5)


def test_code_that_counts_its_own_layers_gets_an_identity():
    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.depth = 3
            self.layers = nn.ModuleList(Residual() for _ in range(3))

        def forward(self, x):
            for i in range(self.depth):
                x = self.layers[i](x)
            return x

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.fc(x)

    torch.manual_seed(0)
    model = Counted()
    x = torch.randn(2, 4)
    plan = prune_blocks(model, (x,), n=1)
    assert plan.how == {plan.removed[0]: "identity"}
    assert len(model.layers) == 3 and model(x).shape == (2, 4)


# --- save and load --------------------------------------------------------------------------

def test_save_load_replays_the_removed_blocks(tmp_path):
    vit, inputs = ZOO["vit"]()
    vit.eval()
    plan = prune_blocks(vit, inputs, n=1)
    sc.save(vit, tmp_path / "vit", plan)
    loaded = sc.load(ZOO["vit"]()[0], tmp_path / "vit").eval()
    assert torch.equal(loaded(*inputs), vit(*inputs))


def test_save_load_replays_blocks_then_channels_in_order(tmp_path):
    model, inputs = tiny_llama(), tokens()
    blocks = prune_blocks(model, inputs, n=1, how="identity")
    blocks_deleted = prune_blocks(model, inputs, n=1)
    channels = prune_structured(model, inputs, 0.25)
    sc.save(model, tmp_path / "llm", [blocks, blocks_deleted, channels])
    loaded = sc.load(tiny_llama(), tmp_path / "llm").eval()
    assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_pruned_llama_reloads_with_plain_transformers(tmp_path):
    model, inputs = tiny_llama(), tokens()
    prune_blocks(model, inputs, n=2)
    model.save_pretrained(tmp_path / "hf")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert reloaded.config.num_hidden_layers == 2
    assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({}, InvalidArgument, "exactly one of n"),
    ({"n": 1, "ratio": 0.5}, InvalidArgument, "exactly one of n"),
    ({"n": 3}, InvalidArgument, "n must be an integer in \\[0, 2\\]"),
    ({"ratio": 1.5}, InvalidArgument, "ratio"),
    ({"n": 1, "method": "cosine"}, InvalidArgument, "block score"),
    ({"n": 1, "how": "drop"}, InvalidArgument, "how"),
    ({"n": 1, "method": "loss"}, MissingData, "loss_fn"),
    ({"n": 1, "candidates": ["stages.1.0"]}, IncompatibleLayer, "input's shape"),
    ({"n": 1, "candidates": ["head.fc"]}, InvalidArgument, "not a child"),
    ({"n": 1, "candidates": "stages.0.1"}, InvalidArgument, "list of module names"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        prune_blocks(resnet(), images(), **kwargs)


def test_a_model_without_repeated_blocks_has_no_candidate():
    with pytest.raises(IncompatibleLayer, match="no candidate block"):
        prune_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(2, 4),), n=1)
