"""Exact sparsity, N:M patterns, global bounds and monotone masks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import secateurs as sc
from secateurs.errors import IncompatibleLayer, InvalidArgument
from secateurs.select import weight_rows
from tests.conftest import tiny_batches, tiny_cnn


def pruned(sparsity: float, size: int) -> int:
    """The one rounding rule (docs/concepts.md): floor(sparsity * size)."""
    return int(sparsity * size + 1e-9)


def zeros_of(model: nn.Module) -> dict[str, float]:
    return {mp.name: float((mp.param == 0).float().mean()) for mp in sc.masked_params(model)}


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.9])
def test_layer_scope_hits_exact_count_in_every_layer(sparsity):
    model = tiny_cnn()
    plan = sc.prune(model, "l1", sparsity)
    for layer in plan.layers:
        param = model.get_parameter(layer.name)
        assert int((param == 0).sum()) == pruned(sparsity, param.numel())
        assert layer.zeros == pruned(sparsity, param.numel())


def test_layer_scope_removes_the_lowest_magnitudes():
    model = tiny_cnn()
    original = model.conv2.weight.detach().clone()
    sc.prune(model, "l1", 0.5)
    kept = original[model.conv2.weight != 0].abs()
    removed = original[model.conv2.weight == 0].abs()
    assert removed.max() <= kept.min()


def test_global_scope_hits_exact_total_and_ranks_across_layers():
    model = tiny_cnn()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = sc.prune(model, "l1", 0.6, scope="global")
    total = sum(layer.numel for layer in plan.layers)
    assert sum(layer.zeros for layer in plan.layers) == pruned(0.6, total)
    kept = torch.cat([originals[l.name][model.get_parameter(l.name) != 0].abs() for l in plan.layers])
    removed = torch.cat([originals[l.name][model.get_parameter(l.name) == 0].abs() for l in plan.layers])
    assert removed.max() <= kept.min()
    assert len({round(l.sparsity, 3) for l in plan.layers}) > 1  # not uniform


def test_global_scope_respects_min_and_max_ratio():
    model = tiny_cnn()
    with torch.no_grad():
        model.fc1.weight.mul_(100)  # fc1 would be spared entirely without a minimum
    plan = sc.prune(model, "l1", 0.5, scope="global", min_ratio=0.2, max_ratio=0.7)
    for layer in plan.layers:
        assert 0.2 - 1e-9 <= layer.sparsity <= 0.7 + 1e-3
    assert plan.achieved == pytest.approx(0.5, abs=1e-3)


def test_impossible_global_bounds_are_rejected_with_the_reachable_range():
    with pytest.raises(InvalidArgument, match="cannot be met.*allow"):
        sc.prune(tiny_cnn(), "l1", 0.9, scope="global", max_ratio=0.5)


@settings(max_examples=25, deadline=None)
@given(sparsity=st.floats(0.0, 0.99), scope=st.sampled_from(["layer", "global", "row"]))
def test_sparsity_is_exact_for_any_ratio(sparsity, scope):
    model = tiny_cnn()
    plan = sc.prune(model, "l2", sparsity, scope=scope)
    zeros = sum(int((model.get_parameter(l.name) == 0).sum()) for l in plan.layers)
    total = sum(l.numel for l in plan.layers)
    if scope == "global":
        assert zeros == pruned(sparsity, total)
    elif scope == "layer":
        assert zeros == sum(pruned(sparsity, l.numel) for l in plan.layers)
    else:
        for l in plan.layers:
            rows = weight_rows(model.get_parameter(l.name), next(t for t in sc.select_targets(model) if t.name == l.name))
            assert ((rows == 0).sum(1) == pruned(sparsity, rows.shape[1])).all()


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "3:8"])
def test_nm_pattern_holds_in_every_block(pattern):
    n, m = map(int, pattern.split(":"))
    model = tiny_cnn()
    plan = sc.prune(model, "l1", pattern=pattern, skip_incompatible=True)
    assert plan.sparsity == pytest.approx(1 - n / m)
    names = {l.name for l in plan.layers}
    expected = {"conv2.weight", "fc1.weight"} | ({"conv1.weight"} if 4 % m == 0 else set())
    assert names == expected  # conv1 has 4 inputs: skipped where M does not divide 4
    for target in sc.select_targets(model, include=sorted(expected)):
        rows = weight_rows(target.param.detach(), target)
        blocks = (rows != 0).reshape(-1, m).sum(1)
        assert (blocks == n).all(), target.name


def test_nm_on_conv_groups_along_input_channels():
    conv = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Conv2d(4, 2, 1))
    sc.prune(conv, "l1", pattern="2:4")
    w = conv[0].weight.detach()  # [out, in, kh, kw]: 2 of every 4 input channels at each position
    per_block = (w != 0).reshape(4, 2, 4, 3, 3).sum(2)
    assert (per_block == 2).all()


def test_nm_keeps_the_largest_in_each_block():
    lin = nn.Sequential(nn.Linear(8, 2), nn.Linear(2, 2))
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[1., -5, 3, 2, 0.1, 0.2, -0.3, 9], [4, 3, 2, 1, 1, 2, 3, 4]]))
    sc.prune(lin, "l1", pattern="2:4")
    expected = torch.tensor([[0., -5, 3, 0, 0, 0, -0.3, 9], [4, 3, 0, 0, 0, 0, 3, 4]])
    assert torch.equal(lin[0].weight.detach(), expected)


def test_nm_width_that_does_not_divide_names_the_layer():
    with pytest.raises(IncompatibleLayer, match=r"conv1\.weight \(width 4\)|fc1|not divisible|8"):
        sc.prune(tiny_cnn(), "l1", pattern="3:8")
    with pytest.raises(IncompatibleLayer, match=r"conv1\.weight"):
        sc.prune(tiny_cnn(), "l1", pattern="2:8")


def test_pattern_and_inconsistent_sparsity_conflict():
    with pytest.raises(InvalidArgument, match="pattern 2:4 means sparsity 0.5"):
        sc.prune(tiny_cnn(), "l1", 0.7, pattern="2:4")


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "a:b", "2:4:8"])
def test_malformed_patterns_are_rejected(bad):
    with pytest.raises(InvalidArgument, match="pattern"):
        sc.prune(tiny_cnn(), "l1", pattern=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", None])
def test_sparsity_outside_range_is_rejected(bad):
    with pytest.raises(InvalidArgument, match="sparsity"):
        sc.prune(tiny_cnn(), "l1", bad)


def test_unknown_method_and_scope_name_the_value():
    with pytest.raises(InvalidArgument, match="unknown method 'snip'"):
        sc.prune(tiny_cnn(), "snip", 0.5)
    with pytest.raises(InvalidArgument, match="unknown scope 'local'"):
        sc.prune(tiny_cnn(), "l1", 0.5, scope="local")


def test_masks_only_grow_across_calls():
    model = tiny_cnn()
    sc.prune(model, "random", 0.3, seed=1)
    first = {mp.name: mp.mask.clone() for mp in sc.masked_params(model)}
    sc.prune(model, "random", 0.6, seed=2)
    for mp in sc.masked_params(model):
        assert not (mp.mask & ~first[mp.name]).any()
        assert float((~mp.mask).float().mean()) == pytest.approx(0.6, abs=0.01)


def test_row_scope_prunes_each_output_row_equally():
    model = tiny_cnn()
    sc.prune(model, "l1", 0.5, scope="row", include=["fc1"])
    assert ((model.fc1.weight == 0).sum(1) == 128).all()


def test_normalize_keeps_every_layer_alive_for_channel_criteria():
    model = tiny_cnn()
    batches = tiny_batches()
    plan = sc.prune(model, "activation", 0.5, scope="global", normalize="mean", data=batches)
    assert all(layer.sparsity < 1.0 for layer in plan.layers)


def test_data_aware_prune_end_to_end():
    model = tiny_cnn()
    plan = sc.prune(model, "taylor", 0.5, data=tiny_batches(), loss_fn=F.cross_entropy)
    assert plan.achieved == pytest.approx(0.5, abs=1e-3)
    assert model(tiny_batches()[0][0]).shape == (8, 10)
