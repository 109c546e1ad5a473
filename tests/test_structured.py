"""Structured pruning on the zoo: really smaller, same output shapes, exact round trips."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import secateurs as sc
from secateurs.errors import InvalidArgument
from secateurs.examples import zoo
from secateurs.graph.groups import analyze
from secateurs.measure import count_macs, count_parameters
from secateurs.structured import prune_structured

PRUNABLE = list(zoo.ZOO)


def build(name):
    model, inputs = zoo.ZOO[name]()
    return model.eval(), inputs


@pytest.mark.parametrize("name", PRUNABLE)
def test_zoo_model_is_really_smaller_and_still_works(name, tmp_path):
    """The structured issue's zoo check: about half the MACs, and everything still works."""
    model, inputs = build(name)
    with torch.no_grad():
        before = model(*inputs)
    macs, params = count_macs(model, inputs)[0], count_parameters(model)[0]
    plan = prune_structured(model, inputs, target="macs=0.5")
    assert 0.4 <= plan.macs_after / macs <= 0.5
    out = model(*inputs)
    assert out.shape == before.shape
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert count_parameters(model)[0] == plan.params_after < params
    assert count_macs(model, inputs)[0] == plan.macs_after < macs
    # save -> load into a fresh model from the factory gives identical outputs
    sc.save(model, tmp_path / "saved", plan)
    fresh, _ = build(name)
    sc.load(fresh, tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(*inputs), model.eval()(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", PRUNABLE)
def test_zero_ratio_changes_nothing(name):
    model, inputs = build(name)
    original = copy.deepcopy(model)
    prune_structured(model, inputs, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), original(*inputs), rtol=0, atol=0)
    assert count_parameters(model) == count_parameters(original)


@pytest.mark.parametrize("name", ["resnet18", "vit", "gated_mlp"])
def test_macs_target_is_met(name):
    model, inputs = build(name)
    macs = count_macs(model, inputs)[0]
    plan = prune_structured(model, inputs, target="macs=0.5")
    assert 0.35 <= plan.macs_after / macs <= 0.5


class FusedSplit(nn.Module):
    """One projection sliced in two halves by a stored width: the cut must update `half`."""

    def __init__(self):
        super().__init__()
        self.proj, self.out, self.half = nn.Linear(8, 16), nn.Linear(8, 2), 8

    def forward(self, x):
        h = self.proj(x)
        return self.out(h[:, :self.half] * torch.sigmoid(h[:, self.half:]))


class LiteralSplit(FusedSplit):
    """The same split with the width written in the code: no attribute can follow the cut."""

    def forward(self, x):
        h = self.proj(x)
        return self.out(h[:, :8] * torch.sigmoid(h[:, 8:]))


def test_a_stored_width_is_found_by_rehearsal_and_updated():
    model, x = FusedSplit().eval(), torch.randn(4, 8)
    plan = prune_structured(model, x, 0.5)
    assert model.half == 4 and model.proj.out_features == 8
    assert plan.attributes == {"": {"half": 4}} and plan.frozen == []
    assert model(x).shape == (4, 2)


def test_a_cut_that_would_break_the_model_is_refused_before_touching_it():
    from secateurs.errors import IncompatibleLayer
    model, x = LiteralSplit().eval(), torch.randn(4, 8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(IncompatibleLayer, match="would break this model.*left unchanged") as error:
        prune_structured(model, x, 0.5)
    assert "\n" not in str(error.value) and "h[:, :8]" in str(error.value) and "ignore=['proj.weight']" in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.proj.out_features == 16


class RolledFeatures(nn.Module):
    """Linear -> torch.roll over the features -> Linear: roll has no rule."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.second(torch.roll(self.first(x), 1, dims=1))


def test_unknown_ops_are_reported_not_guessed():
    model = RolledFeatures()
    analysis = analyze(model, torch.randn(2, 4))
    assert any("roll" in name for name in analysis.unknown_ops)  # named, so analyze can say which op blocks
    hidden = next(g for g in analysis.groups if ("first.weight", 0) in g.members)
    assert not hidden.prunable_units and "unknown op" in hidden.reason


def test_fused_gate_up_rows_stay_paired():
    model, inputs = build("gated_mlp")
    analysis = analyze(model, inputs)
    hidden = [g for g in analysis.groups if ("blocks.0.gate_up.weight", 0) in g.members][0]
    assert hidden.size == model.blocks[0].gate_up.out_features // 2
    prune_structured(model, inputs, 0.5)
    assert model.blocks[0].gate_up.out_features == 2 * model.blocks[0].down.in_features


def test_heads_are_removed_whole_and_gqa_stays_consistent():
    model, inputs = build("gqa_attention")
    attn = model.blocks[0].attn
    ratio = attn.n_heads // attn.n_kv_heads
    prune_structured(model, inputs, 0.5, units=["head"])
    assert attn.n_kv_heads == 1 and attn.n_heads == ratio
    assert attn.q_proj.out_features == attn.n_heads * attn.head_dim
    assert attn.k_proj.out_features == attn.n_kv_heads * attn.head_dim


def test_bad_arguments_name_the_problem():
    model, inputs = build("resnet18")
    with pytest.raises(InvalidArgument, match="ratio must be in"):
        prune_structured(model, inputs, 1.0)
    with pytest.raises(InvalidArgument, match="exactly one of ratio"):
        prune_structured(model, inputs)
    with pytest.raises(InvalidArgument, match="target must look like"):
        prune_structured(model, inputs, target="flops=2")
    with pytest.raises(InvalidArgument, match="unknown unit kind 'block'"):
        prune_structured(model, inputs, 0.5, units=["block"])


class RandomNet(nn.Module):
    """Conv/BN/ReLU stages joined by residual adds or concatenations, then a linear head."""

    def __init__(self, widths, joins):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stages = nn.ModuleList()
        self.joins = joins
        channels = widths[0]
        for width, join in zip(widths[1:], joins):
            out = channels if join == "add" else width
            self.stages.append(nn.Sequential(nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()))
            channels = channels + out if join == "cat" else out
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        x = self.stem(x)
        for stage, join in zip(self.stages, self.joins):
            y = stage(x)
            x = x + y if join == "add" else torch.cat([x, y], 1) if join == "cat" else y
        return self.head(x.mean((2, 3)))


@settings(max_examples=12, deadline=None)
@given(widths=st.lists(st.integers(2, 6), min_size=2, max_size=4),
       joins=st.lists(st.sampled_from(["add", "cat", "seq"]), min_size=3, max_size=3),
       seed=st.integers(0, 1000))
def test_removing_units_equals_zeroing_them(widths, joins, seed):
    torch.manual_seed(seed)
    model = RandomNet(widths, joins[:len(widths) - 1]).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1); m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6)
    zeroed = copy.deepcopy(model)
    plan = prune_structured(model, x, 0.5, method="random", seed=seed)
    with torch.no_grad():
        for key, kept in plan.keeps.items():
            name, _, dim = key.rpartition(":")
            param = zeroed.get_parameter(name)
            drop = torch.ones(param.shape[int(dim)], dtype=torch.bool)
            drop[kept] = False
            param.index_fill_(int(dim), drop.nonzero().flatten(), 0.0)
        torch.testing.assert_close(model(x), zeroed(x), rtol=1e-5, atol=1e-5)
