"""Sparsity training for structured pruning and per-group caps: the bn_scale criterion,
the group-lasso and slimming penalties, and max_ratio / per-group ratios in prune_structured."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs as sc
from secateurs.criteria import get_criterion
from secateurs.criteria.bn_scale import BNScale
from secateurs.errors import InvalidArgument, MissingData
from secateurs.examples.digits import DigitsCNN, load_digits
from secateurs.graph.groups import analyze
from secateurs.recover import GroupLassoPenalty, SlimmingPenalty, finetune
from secateurs.structured import prune_structured

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvNet(nn.Module):
    """conv-BN-ReLU twice, pooled, an MLP head with a LayerNorm: groups with and without a BN."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.fc1, self.norm = nn.Linear(12, 10), nn.LayerNorm(10)
        self.fc2, self.head = nn.Linear(10, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x))).mean((2, 3))
        x = F.relu(self.fc2(self.norm(self.fc1(x))))
        return self.head(x)


def conv_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    model = ConvNet()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.copy_(torch.randn(bn.num_features))
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def image(batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(1)),)


def removed_by_member(plan, member: str) -> list[int]:
    return next(g.removed for g in plan.groups if member in g.members)


# --- bn_scale -----------------------------------------------------------------------------

def test_bn_scale_scores_are_the_absolute_batchnorm_scales():
    model = conv_net()
    scores = get_criterion("bn_scale")(model, sc.select_targets(model), None)
    assert set(scores) == {"bn1.weight", "bn2.weight"}
    assert torch.equal(scores["bn1.weight"], model.bn1.weight.detach().abs())
    with_ln = BNScale(norms=("batchnorm", "layernorm"))(model, [], None)
    assert set(with_ln) == {"bn1.weight", "bn2.weight", "norm.weight"}


def test_bn_scale_removes_the_channels_with_the_smallest_gamma():
    model, inputs = conv_net(), image()
    gammas = model.bn1.weight.detach().abs().numpy().copy()
    reference = copy.deepcopy(model)
    plan = prune_structured(model, inputs, 0.5, method="bn_scale")
    assert sorted(removed_by_member(plan, "bn1.weight:0")) == sorted(np.argsort(gammas, kind="stable")[:4].tolist())
    # a group without a norm member (fc2's outputs) falls back to the squared L2 norm, as "l2" does
    l2 = prune_structured(reference, inputs, 0.5, method="l2")
    assert removed_by_member(plan, "fc2.weight:0") == removed_by_member(l2, "fc2.weight:0")
    assert model(*inputs).shape == (2, 4)


def test_bn_scale_is_refused_for_weight_pruning_and_bad_norm_kinds():
    with pytest.raises(InvalidArgument, match="prune_structured"):
        sc.prune(conv_net(), "bn_scale", 0.5)
    with pytest.raises(InvalidArgument, match="norms"):
        BNScale(norms=("batchnorm", "instancenorm"))


# --- penalties ----------------------------------------------------------------------------

def test_group_lasso_is_the_scaled_norm_of_every_slice_of_each_unit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    penalty = GroupLassoPenalty(model, (torch.randn(2, 3),), strength=0.5)
    # the only prunable group is the 4 hidden neurons: row of layer 0, its bias, column of layer 2
    first, second = model[0], model[2]
    norms = (first.weight.pow(2).sum(1) + first.bias.pow(2) + second.weight.pow(2).sum(0)).sqrt()
    expected = 0.5 * (np.sqrt(3 + 1 + 2) * norms).sum()
    assert len(penalty.units) == 4
    assert torch.allclose(penalty(), expected)
    penalty().backward()
    assert first.weight.grad is not None and second.weight.grad is not None


def test_slimming_penalty_is_l1_on_the_batchnorm_scales():
    model = conv_net()
    penalty = SlimmingPenalty(model, strength=0.1)
    expected = 0.1 * (model.bn1.weight.abs().sum() + model.bn2.weight.abs().sum())
    assert torch.allclose(penalty(), expected)


@pytest.mark.parametrize("build, error", [
    (lambda m: GroupLassoPenalty(m, image(), strength=-1.0), InvalidArgument),
    (lambda m: GroupLassoPenalty(m), MissingData),
    (lambda m: GroupLassoPenalty(m, image(), units=("block",)), InvalidArgument),
    (lambda m: SlimmingPenalty(m, strength=float("nan")), InvalidArgument),
    (lambda m: SlimmingPenalty(nn.Linear(2, 2)), InvalidArgument),
])
def test_penalty_arguments_are_checked(build, error):
    with pytest.raises(error):
        build(conv_net())


def test_group_lasso_training_zeroes_whole_units_that_pruning_then_removes_exactly():
    data = load_digits()
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    example = (data.test_x[:2],)
    penalty = GroupLassoPenalty(model, example, strength=2e-3)
    finetune(model, data.train_batches(64), epochs=4, lr=0.05, optimizer="sgd", penalty=penalty)
    norms = penalty.unit_norms().detach()
    zeroed = {unit for unit, norm in zip(penalty.units, norms.tolist()) if norm < 1e-2}
    assert len(zeroed) >= 20  # of 168 prunable units, every slice of each near zero
    model.eval()
    x = data.test_x[:64]
    before = model(x).detach()
    total = sum(g.size for g in analyze(model, example).groups if g.prunable_units)
    plan = prune_structured(model, example, (len(zeroed) + 0.5) / total, scope="global", max_ratio=1.0)
    assert {(g.index, i) for g in plan.groups for i in g.removed} == zeroed
    assert (model(x) - before).abs().max() < 1e-3 * before.abs().max()


# --- max_ratio and per-group ratios ---------------------------------------------------------

def test_max_ratio_caps_every_group_locally_and_globally():
    model, inputs = conv_net(), image()
    plan = prune_structured(copy.deepcopy(model), inputs, 0.75, max_ratio=0.25)
    assert all(len(g.removed) <= int(0.25 * g.units) for g in plan.groups)
    assert any(len(g.removed) == int(0.25 * g.units) for g in plan.groups)
    plan = prune_structured(copy.deepcopy(model), inputs, 0.6, scope="global", max_ratio=0.5)
    assert all(len(g.removed) <= g.units // 2 for g in plan.groups)


def test_max_ratio_dict_caps_only_the_matching_groups():
    model, inputs = conv_net(), image()
    plan = prune_structured(model, inputs, 0.5, max_ratio={"conv1*": 0.0, "fc2.*": 0.25})
    assert removed_by_member(plan, "bn1.weight:0") == []
    assert len(removed_by_member(plan, "fc2.weight:0")) == 4          # 16 units, capped at 25%
    assert len(removed_by_member(plan, "bn2.weight:0")) == 6          # 12 units, uncapped 50%


def test_target_search_honours_max_ratio():
    model, inputs = conv_net(), image()
    plan = prune_structured(model, inputs, target="params=0.5", max_ratio={"bn1.*": 0.125})
    assert len(removed_by_member(plan, "bn1.weight:0")) <= 1
    assert plan.params_after <= 0.5 * plan.params_before


def test_per_group_ratio_dict_in_local_scope():
    model, inputs = conv_net(), image()
    plan = prune_structured(model, inputs, {"bn2.*": 0.5})
    assert len(removed_by_member(plan, "bn2.weight:0")) == 6
    assert removed_by_member(plan, "bn1.weight:0") == [] and removed_by_member(plan, "fc2.weight:0") == []
    assert plan.ratio == {"bn2.*": 0.5}
    assert model(*inputs).shape == (2, 4)


@pytest.mark.parametrize("kwargs, match", [
    ({"ratio": 0.5, "max_ratio": 1.5}, "max_ratio"),
    ({"ratio": 0.5, "max_ratio": {"conv1*": -0.1}}, "max_ratio"),
    ({"ratio": 0.5, "max_ratio": {}}, "max_ratio"),
    ({"ratio": 0.5, "max_ratio": {3: 0.5}}, "max_ratio"),
    ({"ratio": {"bn2.*": 0.5}, "scope": "global"}, "scope='local'"),
    ({"ratio": {"bn2.*": 1.0}}, "ratio"),
    ({"ratio": "half"}, "ratio"),
])
def test_bad_ratio_and_cap_values_are_refused(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        prune_structured(conv_net(), image(), **kwargs)
