"""The block-by-block LLM engine: magnitude, Wanda, SparseGPT and OWL on tiny random transformers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secateurs.errors import IncompatibleLayer, InvalidArgument, MissingData
from secateurs.layers import weight_out_in
from secateurs.llm import LLMConfig, capture_inputs, find_block_layout, prune_block, prune_llm, run_block
from secateurs.llm import sparsegpt
from secateurs.llm.blocks import block_linears
from secateurs.llm.engine import new_stats, prune_linear
from secateurs.llm.stats import LayerStats

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 128


def llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


class PlainBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class PlainModel(nn.Module):
    """Embedding, a ModuleList of residual MLP blocks, a head: no transformers involved."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(PlainBlock(width) for _ in range(3))
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def token_batches(n: int = 8, length: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, length), generator=g) for _ in range(n)]


def dict_batches(**kw) -> list[dict]:
    return [dict(input_ids=x, attention_mask=torch.ones_like(x)) for x in token_batches(**kw)]


def pruned_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every linear of every block, as [out, in]."""
    layout = find_block_layout(model)
    found = {}
    for i, block in enumerate(layout.blocks):
        found.update({n: weight_out_in(m).detach() for n, m in block_linears(block, f"{i}.").items()})
    return found


# ------------------------------------------------------------------ finding blocks

@pytest.mark.parametrize("build, path", [(llama, "model.layers"), (gpt2, "transformer.h"),
                                         (bert, "encoder.layer"), (PlainModel, "blocks")])
def test_find_blocks_knows_the_layouts(build, path):
    layout = find_block_layout(build())
    assert layout.blocks_path == path and len(layout.blocks) >= 2


def test_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(IncompatibleLayer, match="no nn.ModuleList"):
        prune_llm(nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.Linear(8, 8)), token_batches(2))


# ------------------------------------------------------------------ masks

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_same_seed_and_data_give_identical_weights(method):
    first, second = llama(), llama()
    prune_llm(first, token_batches(4), method=method)
    prune_llm(second, token_batches(4), method=method)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_unstructured_sparsity_is_exact_in_every_row(method, sparsity):
    model = llama()
    plan = prune_llm(model, token_batches(2), method=method, sparsity=sparsity)
    rows = pruned_rows(model)
    assert len(plan.layers) == len(rows) == 14
    for name, w in rows.items():
        expected = int(sparsity * w.shape[1] + 1e-9)
        assert ((w == 0).sum(1) == expected).all(), name


@pytest.mark.parametrize("build", [llama, gpt2])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_holds_in_every_linear_of_every_block(build, method, pattern):
    n, m = (int(p) for p in pattern.split(":"))
    model = build()
    plan = prune_llm(model, token_batches(2), method=method, pattern=pattern)
    assert {r.sparsity for r in plan.layers} == {1 - n / m}
    for name, w in pruned_rows(model).items():
        groups = w.reshape(w.shape[0], -1, m)
        assert ((groups != 0).sum(-1) == n).all(), name


def test_ignored_linears_stay_dense():
    model, dense = llama(), llama()
    plan = prune_llm(model, token_batches(2), method="wanda", ignore=("*.mlp.down_proj", "*q_proj"))
    names = {r.name for r in plan.layers}
    assert "model.layers.0.mlp.down_proj" not in names and "model.layers.1.self_attn.q_proj" not in names
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, dense.model.layers[1].mlp.down_proj.weight)
    assert (model.model.layers[1].mlp.up_proj.weight == 0).float().mean() == 0.5


# ------------------------------------------------------------------ SparseGPT's reconstruction

@pytest.mark.parametrize("build", [llama, gpt2, bert])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_reconstructs_every_layer_at_least_as_well_as_magnitude_and_wanda(build, pattern):
    model = build()
    layout = find_block_layout(model)
    inputs = capture_inputs(model, layout, dict_batches())
    for block in layout.blocks:
        # every method prunes a copy of the same dense block from the same inputs
        errors = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            config = LLMConfig(method=method, pattern=pattern, measure_error=True)
            errors[method] = {r.name: r.error for r in prune_block(copy.deepcopy(block), inputs, config)}
        assert len(errors["sparsegpt"]) >= 4
        for name, error in errors["sparsegpt"].items():
            assert 0 < error <= min(errors["magnitude"][name], errors["wanda"][name]), name
        inputs = run_block(block, inputs)


def test_reported_error_is_the_reconstruction_error_on_the_calibration_inputs():
    model = PlainModel()
    layout = find_block_layout(model)
    inputs = capture_inputs(model, layout, token_batches(3))
    block, dense = layout.blocks[0], copy.deepcopy(layout.blocks[0])
    reports = prune_block(block, inputs, LLMConfig(method="sparsegpt", measure_error=True))
    x = torch.cat([h.reshape(-1, 32) for h in inputs.hidden])
    expected = (x @ (dense.up.weight - block.up.weight).t()).pow(2).sum().item()
    assert reports[0].name == "up" and reports[0].error == pytest.approx(expected, rel=1e-4)


def test_sparsegpt_prunes_dead_inputs_and_stays_finite():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    x[:, 3] = 0  # an input feature that never fires
    stats = LayerStats(16, with_hessian=True)
    stats.add(x)
    weight, _ = sparsegpt.prune_sparsegpt(torch.randn(8, 16), stats, LLMConfig(method="sparsegpt"), "dead")
    assert torch.isfinite(weight).all() and (weight[:, 3] == 0).all()
    assert ((weight == 0).sum(1) == 8).all()


# ------------------------------------------------------------------ engine vs whole model

LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def whole_model_reference(model: nn.Module, batches: list, config: LLMConfig) -> None:
    """For each block k: run the whole model (blocks < k pruned) to collect its linears' inputs, prune it."""
    layout = find_block_layout(model)
    for block in layout.blocks:
        groups = LLAMA_GROUPS if config.true_sequential else [sum(LLAMA_GROUPS, [])]
        for group in groups:
            linears = {n: block.get_submodule(n) for n in group}
            stats = {n: new_stats(m, config) for n, m in linears.items()}
            handles = [m.register_forward_hook(lambda mod, args, out, n=n: stats[n].add(args[0]))
                       for n, m in linears.items()]
            with torch.no_grad():
                for batch in batches:
                    model(batch, use_cache=False)
            for h in handles:
                h.remove()
            for n, m in linears.items():
                prune_linear(m, stats[n], config, n)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("sequential", [True, False])
def test_block_engine_matches_a_whole_model_reference(method, sequential):
    engine, reference = llama(), llama()
    batches = token_batches(4)
    config = LLMConfig(method=method, true_sequential=sequential)
    prune_llm(engine, batches, config)
    whole_model_reference(reference, batches, config)
    for (name, a), b in zip(engine.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_true_sequential_sees_the_pruned_attention():
    sequential, parallel = llama(), llama()
    prune_llm(sequential, token_batches(4), method="wanda", true_sequential=True)
    prune_llm(parallel, token_batches(4), method="wanda", true_sequential=False)
    block = (sequential.model.layers[0], parallel.model.layers[0])
    assert torch.equal(block[0].self_attn.q_proj.weight, block[1].self_attn.q_proj.weight)  # first group
    assert not torch.equal(block[0].mlp.down_proj.weight, block[1].mlp.down_proj.weight)


# ------------------------------------------------------------------ architectures and saving

@pytest.mark.parametrize("build", [llama, gpt2])
def test_saved_causal_lm_reloads_in_plain_transformers_with_the_same_logits(build, tmp_path):
    model = build()
    prune_llm(model, dict_batches(n=4), method="sparsegpt", pattern="2:4")
    model.save_pretrained(tmp_path)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits)


def test_bert_encoder_prunes_and_reloads(tmp_path):
    model = bert()
    plan = prune_llm(model, dict_batches(n=4), method="wanda", sparsity=0.5)
    assert len(plan.layers) == 12 and all(r.sparsity == 0.5 for r in plan.layers)
    model.save_pretrained(tmp_path)
    loaded, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = dict_batches(n=1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_plain_module_list_model_with_tensor_batches():
    model = PlainModel()
    plan = prune_llm(model, token_batches(3), method="sparsegpt", sparsity=0.5)
    assert [r.name for r in plan.layers] == [f"blocks.{i}.{n}" for i in range(3) for n in ("up", "down")]
    assert all(r.sparsity == 0.5 for r in plan.layers)


# ------------------------------------------------------------------ OWL

def test_owl_keeps_the_mean_ratio_and_spares_the_block_with_outliers():
    model = llama()
    with torch.no_grad():  # outlier features entering block 1's linears
        model.model.layers[1].input_layernorm.weight[:4] *= 30
        model.model.layers[1].post_attention_layernorm.weight[:4] *= 30
    plan = prune_llm(model, token_batches(4), method="wanda", sparsity=0.6, owl=0.2)
    first, second = plan.block_sparsity
    assert sum(plan.block_sparsity) / 2 == pytest.approx(0.6)  # plain mean over blocks (same sizes)
    assert second < first and first - second == pytest.approx(0.2)
    for report in plan.layers:
        block = int(report.name.split(".")[2])
        width = weight_out_in(model.get_submodule(report.name)).shape[1]
        assert report.sparsity == int(plan.block_sparsity[block] * width + 1e-9) / width


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("overrides, match", [
    (dict(method="obs"), "method must be one of"),
    (dict(sparsity=1.0), "sparsity must be a number in"),
    (dict(sparsity=-0.1), "sparsity must be a number in"),
    (dict(pattern="2-4"), "pattern must look like"),
    (dict(pattern="4:2"), "needs 0 < N < M"),
    (dict(pattern="2:4", owl=0.1), "owl must be"),
    (dict(blocksize=6, pattern="2:4"), "blocksize must be a multiple"),
    (dict(damp=0), "damp must be"),
    (dict(compare="column"), "compare must be one of"),
    (dict(sparsty=0.5), "unknown LLM option"),
])
def test_bad_options_are_refused_with_a_clear_message(overrides, match):
    with pytest.raises(InvalidArgument, match=match):
        prune_llm(PlainModel(), token_batches(1), **overrides)


def test_bad_calibration_data_is_refused():
    with pytest.raises(MissingData, match="at least one calibration batch"):
        prune_llm(PlainModel(), [])
    with pytest.raises(InvalidArgument, match="each calibration batch"):
        prune_llm(PlainModel(), ["some text"])


def test_nm_on_a_width_not_divisible_by_m_names_the_layer():
    model = PlainModel(width=30)
    with pytest.raises(IncompatibleLayer, match="blocks.0.up: input width 30"):
        prune_llm(model, token_batches(1), method="sparsegpt", pattern="4:8")


def test_capture_works_with_the_blocks_on_the_meta_device():
    model = llama()
    layout = find_block_layout(model)
    expected = capture_inputs(model, layout, token_batches(2))
    layout.blocks.to("meta")  # as when streaming: the blocks' weights are not loaded yet
    captured = capture_inputs(model, layout, token_batches(2))
    for a, b in zip(captured.hidden, expected.hidden):
        assert torch.equal(a, b)
    cos, sin = captured.kwargs[0]["position_embeddings"]
    assert cos.shape[-2] == 32 and captured.kwargs[0].get("use_cache") in (None, False)


def test_sparsegpt_raises_the_damping_when_cholesky_fails():
    stats = LayerStats(4, with_hessian=True, tokens=10)
    stats.hessian = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.02]))  # not positive definite at 1% damping
    weight, note = sparsegpt.prune_sparsegpt(torch.randn(3, 4), stats, LLMConfig(method="sparsegpt"), "layer")
    assert note == "damping raised to 0.1" and torch.isfinite(weight).all()
    stats.hessian[3, 3] = -100.0
    with pytest.raises(IncompatibleLayer, match="not positive definite"):
        sparsegpt.prune_sparsegpt(torch.randn(3, 4), stats, LLMConfig(method="sparsegpt"), "layer")


def test_a_one_layer_llama_is_pruned():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1)
    plan = prune_llm(transformers.LlamaForCausalLM(config), token_batches(2), method="sparsegpt")
    assert len(plan.layers) == 7 and plan.block_sparsity == [0.5]


def test_padding_tokens_are_left_out_of_the_statistics():
    from secateurs.llm.engine import collect_stats
    ids = token_batches(2, length=16, seed=3)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 10:] = 0  # sample 0 is 10 tokens long, padded to 16
    padded, unpadded = bert(), bert()
    prune_llm(padded, [dict(input_ids=ids[0], attention_mask=mask), dict(input_ids=ids[1])], method="wanda")
    prune_llm(unpadded, [dict(input_ids=ids[0][:1, :10]), dict(input_ids=ids[0][1:]), dict(input_ids=ids[1])],
              method="wanda")
    for (name, a), b in zip(padded.state_dict().items(), unpadded.state_dict().values()):
        assert torch.equal(a == 0, b == 0), name
    model = bert()
    layout = find_block_layout(model)
    inputs = capture_inputs(model, layout, [dict(input_ids=ids[0], attention_mask=mask)])
    linears = block_linears(layout.blocks[0])
    stats = collect_stats(layout.blocks[0], inputs, linears, LLMConfig(method="sparsegpt"))
    assert {s.tokens for s in stats.values()} == {26}
