"""Beyond Wanda and SparseGPT: RIA, DSnoT, N:M channel permutation and ALPS, against hand computations."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secateurs.errors import InvalidArgument, MissingData
from secateurs.layers import weight_out_in
from secateurs.llm import METHODS, LLMConfig, find_block_layout, prune_llm
from secateurs.llm.blocks import block_linears
from secateurs.llm.dsnot import refine_mask, row_errors
from secateurs.llm.permute import block_pairs, permute_pair, round_robin
from secateurs.llm.ria import relative_importance, ria_scores
from secateurs.llm.stats import LayerStats
from tests import test_cli_hf as cli_hf
from tests.test_llm_engine import VOCAB, bert, llama

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
zoo = cli_hf.zoo  # the module-scoped fixture of tests/test_cli_hf.py: random-init HF folders and texts


def batches(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 16), generator=generator) for _ in range(n)]


def layer_problem(rows: int = 8, columns: int = 16, tokens: int = 64, seed: int = 0):
    """A weight, calibration inputs with uneven channel scales, and their statistics."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, columns, generator=generator) * (0.2 + 3 * torch.rand(columns, generator=generator))
    weight = torch.randn(rows, columns, generator=generator)
    stats = LayerStats(columns, with_hessian=True)
    stats.add(x)
    return weight, x, stats


def error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||(W - W') X^T||^2, the reconstruction error by hand."""
    return float(((weight - pruned).double() @ x.double().t()).pow(2).sum())


def assert_nm(weight: torch.Tensor, n: int, m: int) -> None:
    kept = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
    assert bool((kept <= n).all())


# ------------------------------------------------------------------ RIA

def test_ria_score_matches_a_hand_computation():
    weight = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, -1.0]])
    norms = torch.tensor([4.0, 1.0, 9.0])
    # row sums 3 and 5, column sums 4, 3, 1
    hand = torch.tensor([[1 / 3 + 1 / 4, 2 / 3 + 2 / 3, 0.0], [3 / 5 + 3 / 4, 1 / 5 + 1 / 3, 1 / 5 + 1.0]])
    assert torch.allclose(relative_importance(weight), hand)
    assert torch.allclose(ria_scores(weight, norms), hand * norms.sqrt())


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_ria_prunes_exactly_and_leaves_kept_weights_alone(pattern):
    weight, _, stats = layer_problem()
    config = LLMConfig(method="ria", sparsity=0.5, pattern=pattern)
    pruned, _ = METHODS["ria"].prune(weight.clone(), stats, config, "layer")
    assert ((pruned == 0).sum(1) == 8).all()
    if pattern:
        assert_nm(pruned, 2, 4)
    keep = pruned != 0
    assert torch.equal(pruned[keep], weight[keep])


# ------------------------------------------------------------------ DSnoT

@pytest.mark.parametrize("method, pattern", [("magnitude", None), ("wanda", "2:4"), ("sparsegpt", None)])
def test_dsnot_error_never_rises_and_keeps_the_pattern(method, pattern):
    weight, x, stats = layer_problem()
    config = LLMConfig(method=method, sparsity=0.5, pattern=pattern)
    pruned, _ = METHODS[method].prune(weight.clone(), stats, config, "layer")
    refined, history = refine_mask(weight, pruned, stats.hessian, config.nm)
    scale = 2 / x.shape[0]  # H = (2/n) X^T X
    assert history[0] == pytest.approx(scale * error(weight, pruned, x), rel=1e-4)
    assert history[-1] == pytest.approx(scale * error(weight, refined, x), rel=1e-4)
    assert all(later <= earlier for earlier, later in zip(history, history[1:]))
    assert len(history) > 1 and history[-1] < history[0]  # these problems do have improving swaps
    assert torch.equal((refined == 0).sum(1), (pruned == 0).sum(1))
    if pattern:
        assert_nm(refined, 2, 4)
    assert bool((row_errors(weight, refined, stats.hessian) <= row_errors(weight, pruned, stats.hessian) + 1e-6).all())


def test_dsnot_takes_the_one_improving_swap_by_hand():
    # one row, two inputs, one pruned: x0 = x1 always, so H = 2 * [[1, 1], [1, 1]] / ...:
    # with W = [1, 3] and W' = [0, 3] the error is 1; swapping (keep w0, drop w1) gives 9: no swap.
    x = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    stats = LayerStats(2, with_hessian=True)
    stats.add(x)
    weight = torch.tensor([[1.0, 3.0]])
    kept_small, history = refine_mask(weight, torch.tensor([[0.0, 3.0]]), stats.hessian)
    assert torch.equal(kept_small, torch.tensor([[0.0, 3.0]])) and len(history) == 1
    # the wrong way round (W' = [1, 0], error 9) is swapped to the right one (error 1)
    fixed, history = refine_mask(weight, torch.tensor([[1.0, 0.0]]), stats.hessian)
    assert torch.equal(fixed, torch.tensor([[0.0, 3.0]]))
    assert history == pytest.approx([9 * 5, 1 * 5])  # (2/n) * sum x^2 = (2/2) * 5


# ------------------------------------------------------------------ ALPS

@pytest.mark.parametrize("sparsity, pattern", [(0.5, None), (0.75, None), (0.5, "2:4")])
def test_alps_meets_the_constraint_and_beats_magnitude_and_wanda(sparsity, pattern):
    weight, x, stats = layer_problem(rows=8, columns=32)
    config = LLMConfig(method="alps", sparsity=sparsity, pattern=pattern)
    pruned, _ = METHODS["alps"].prune(weight.clone(), stats, config, "layer")
    assert ((pruned == 0).sum(1) == round(32 * config.target)).all()
    if pattern:
        assert_nm(pruned, 2, 4)
    for baseline in ("magnitude", "wanda"):
        other, _ = METHODS[baseline].prune(weight.clone(), stats, LLMConfig(method=baseline, sparsity=sparsity,
                                                                            pattern=pattern), "layer")
        assert error(weight, pruned, x) <= error(weight, other, x)


# ------------------------------------------------------------------ permutation

def test_round_robin_deals_the_ranking_over_the_groups():
    importance = torch.tensor([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    # two groups of 4: ranks 0, 2, 4, 6 in the first, 1, 3, 5, 7 in the second
    assert round_robin(importance, 4).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("build, expected", [(llama, 2), (bert, 2)])
def test_permutation_keeps_the_model_exactly_equivalent(build, expected):
    model = build()
    ids = batches(1)[0]
    before = model(ids).last_hidden_state if build is bert else model(ids).logits
    block = find_block_layout(model).blocks[0]
    pairs = block_pairs(block)
    assert len(pairs) == expected  # the MLP and the value -> output projection per head
    weights = {n: weight_out_in(m).detach().clone() for n, m in block_linears(block).items()}
    for pair in pairs:
        columns = weight_out_in(block.get_submodule(pair.consumer)).shape[1]
        stats = LayerStats(columns)
        stats.add(torch.rand(5, columns) * torch.linspace(0.1, 5, columns))
        assert permute_pair(pair, block, stats, 4)
    changed = [n for n, m in block_linears(block).items() if not torch.equal(weights[n], weight_out_in(m))]
    assert len(changed) >= 3
    after = model(ids).last_hidden_state if build is bert else model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)


def test_prune_llm_composes_ria_permutation_and_dsnot_at_2_4():
    model = llama()
    plan = prune_llm(model, batches(), method="ria", pattern="2:4", permute=True, refine="dsnot")
    assert plan.layers and all(r.sparsity == 0.5 for r in plan.layers)
    for name, module in block_linears(find_block_layout(model).blocks, "model.layers.").items():
        assert_nm(weight_out_in(module), 2, 4)
    assert all("dsnot" in r.note for r in plan.layers)


def test_dsnot_after_wanda_lowers_the_first_blocks_errors():
    plain, refined = llama(), llama()
    a = prune_llm(plain, batches(), method="wanda", sparsity=0.6, measure_error=True)
    b = prune_llm(refined, batches(), method="wanda", sparsity=0.6, measure_error=True, refine="dsnot")
    first = [i for i, r in enumerate(a.layers) if r.name.startswith("model.layers.0.")]
    assert all(b.layers[i].error <= a.layers[i].error * (1 + 1e-4) for i in first)
    assert sum(b.layers[i].error for i in first) < sum(a.layers[i].error for i in first)


def test_permutation_lowers_the_2_4_error_of_the_first_block_mlp():
    plain, permuted = llama(), llama()
    a = prune_llm(plain, batches(), method="wanda", pattern="2:4", measure_error=True)
    b = prune_llm(permuted, batches(), method="wanda", pattern="2:4", measure_error=True, permute=True)
    down = next(i for i, r in enumerate(a.layers) if r.name == "model.layers.0.mlp.down_proj")
    assert b.layers[down].error < a.layers[down].error


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("options, message", [
    (dict(refine="nope"), "refine must be None or one of"),
    (dict(permute=True), "needs an N:M pattern"),
    (dict(permute="yes", pattern="2:4"), "permute must be a bool"),
])
def test_bad_options_name_the_problem(options, message):
    model = llama()
    dense = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgument, match=message):
        prune_llm(model, batches(), **options)
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("options", [dict(method="alps"), dict(method="ria"), dict(method="magnitude", refine="dsnot")])
def test_calibrated_methods_need_batches(options):
    with pytest.raises(MissingData, match="calibration"):
        prune_llm(llama(), None, **options)


# ------------------------------------------------------------------ the command line

def test_cli_composes_ria_permutation_and_dsnot_and_reloads(zoo, tmp_path, capsys):
    flags = ["--method", "ria", "--pattern", "2:4", "--permute", "--refine", "dsnot"]
    metrics = cli_hf.prune_cli(zoo, "llama", tmp_path / "out", capsys, *flags, eval_file=False)
    assert metrics["config"]["refine"] == "dsnot" and metrics["config"]["permute"] is True
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    expected = cli_hf.pruned_in_memory(zoo, "llama", method="ria", pattern="2:4", permute=True, refine="dsnot")
    ids = cli_hf.sample_ids()
    torch.testing.assert_close(cli_hf.outputs(reloaded, ids), cli_hf.outputs(expected, ids))
    for layer, weight in cli_hf.block_weights(reloaded).items():
        assert ((weight != 0).reshape(-1, 4).sum(1) <= 2).all(), layer


@pytest.mark.parametrize("flags, message", [
    (["--sparsity", "0.5", "--refine", "nope"], "refine must be None or one of ['dsnot'], got 'nope'"),
    (["--sparsity", "0.5", "--permute"], "permute must be a bool and needs an N:M pattern"),
    (["--structured", "--ratio", "0.3", "--refine", "dsnot"], "refine='dsnot' does not apply to structured"),
])
def test_cli_bad_quality_options_are_one_line_exit_2(zoo, tmp_path, capsys, flags, message):
    before = cli_hf.digest(zoo)
    code, _, err = cli_hf.run(["prune", "--hf", zoo / "llama", "--calib", zoo / "calib.txt", *cli_hf.CALIB, *flags,
                               "--out", tmp_path / "out"], capsys)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert cli_hf.digest(zoo) == before and not (tmp_path / "out").exists()


def test_stream_permutes_and_refines_as_in_memory(zoo, tmp_path, capsys):
    flags = ["--method", "wanda", "--pattern", "2:4", "--permute", "--refine", "dsnot", "--stream"]
    metrics = cli_hf.prune_cli(zoo, "llama", tmp_path / "out", capsys, *flags, eval_file=False)
    assert metrics["mode"] == "stream"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    expected = cli_hf.pruned_in_memory(zoo, "llama", method="wanda", pattern="2:4", permute=True, refine="dsnot")
    ids = cli_hf.sample_ids()
    torch.testing.assert_close(cli_hf.outputs(reloaded, ids), cli_hf.outputs(expected, ids))
