"""When to prune: iterative rounds, the AGP schedule, sparsity penalties and thresholds."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs as sc
from secateurs.schedule import iterative_sparsities


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 32)     # 384 weights
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 24)     # 768 weights
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.bn(self.fc1(x))))))


def make(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def batches(n: int, seed: int = 0, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 12, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def zero_counts(model: nn.Module) -> dict[str, int]:
    """Pruned weights per masked layer, after checking that every one of them is zero."""
    counts = {}
    for mp in sc.masked_params(model):
        assert torch.count_nonzero(mp.param.detach()[~mp.mask]) == 0, f"{mp.name}: a pruned weight moved"
        counts[mp.name] = int((~mp.mask).sum())
    return counts


PRUNED = {"fc1.weight": 384, "fc2.weight": 768}


def expected_counts(sparsity: float) -> dict[str, int]:
    return {name: int(sparsity * numel + 1e-9) for name, numel in PRUNED.items()}  # floor, the one rule


# --- iterative ---------------------------------------------------------------------------

def test_iterative_sparsities_remove_the_same_share_each_round():
    rounds = iterative_sparsities(0.875, 3)
    assert rounds == pytest.approx([0.5, 0.75, 0.875])
    assert rounds[-1] == 0.875
    assert iterative_sparsities(0.6, 1) == [pytest.approx(0.6)]


def test_iterative_prune_reaches_final_sparsity_with_recovery_between_rounds():
    model = make()
    data = batches(4)
    targets = iterative_sparsities(0.875, 3)
    seen = []

    def recover(m, round_index):
        assert m is model
        seen.append((round_index, zero_counts(m), {mp.name: (~mp.mask).clone() for mp in sc.masked_params(m)}))
        sc.finetune(m, data, epochs=1, lr=1e-2, optimizer="sgd", weight_decay=1e-2)

    plans = sc.iterative_prune(model, 0.875, 3, recover=recover, method="magnitude")

    assert [s[0] for s in seen] == [0, 1, 2]
    for (round_index, counts, _), plan, target in zip(seen, plans, targets):
        assert plan.sparsity == pytest.approx(target)
        assert counts == expected_counts(target), f"round {round_index}"
        assert {layer.name: layer.zeros for layer in plan.layers} == expected_counts(target)
    for (_, _, earlier), (_, _, later) in zip(seen, seen[1:]):   # recovery kept every zero
        for name in earlier:
            assert torch.all(later[name][earlier[name]]), name
    assert zero_counts(model) == {"fc1.weight": 336, "fc2.weight": 672}   # 7/8 of 384 and 768
    assert plans[-1].achieved == 0.875
    assert sc.sparsity_of(model) == {"fc1.weight": 0.875, "fc2.weight": 0.875}


# --- AGP ---------------------------------------------------------------------------------

def test_agp_sparsity_follows_the_cubic_formula():
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3 with s_i=0.1, s_f=0.9, t0=10, t1=30
    assert sc.agp_sparsity(0, 0.1, 0.9, 10, 30) == 0.1
    assert sc.agp_sparsity(10, 0.1, 0.9, 10, 30) == 0.1
    assert sc.agp_sparsity(15, 0.1, 0.9, 10, 30) == pytest.approx(0.9 - 0.8 * 0.421875)   # (3/4)^3
    assert sc.agp_sparsity(20, 0.1, 0.9, 10, 30) == pytest.approx(0.8)                    # 0.9 - 0.8/8
    assert sc.agp_sparsity(30, 0.1, 0.9, 10, 30) == 0.9
    assert sc.agp_sparsity(99, 0.1, 0.9, 10, 30) == 0.9
    values = [sc.agp_sparsity(t, 0.0, 0.8, 0, 40) for t in range(41)]
    assert values == sorted(values)
    steps = [b - a for a, b in zip(values, values[1:])]
    assert steps == sorted(steps, reverse=True)     # prunes fast early, slowly near the end


def test_agp_in_a_user_loop_prunes_every_frequency_steps_and_ends_at_end_step():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    sc.keep_sparse(opt, model)
    agp = sc.AGP(model, 0.8, initial_sparsity=0.1, start_step=1, end_step=11, frequency=4)
    pruned_at, counts_after = [], {}
    for step, (x, y) in enumerate(batches(15), start=1):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if agp.step() is not None:
            pruned_at.append(step)
        counts_after[step] = zero_counts(model)

    assert pruned_at == [1, 5, 9, 11]          # start, every 4 steps, and end_step itself
    last = 0
    for step in range(1, 16):
        last = step if step in pruned_at else last
        expected = expected_counts(sc.agp_sparsity(last, 0.1, 0.8, 1, 11)) if last else {}
        assert counts_after[step] == expected, f"step {step}"
    assert counts_after[11] == expected_counts(0.8)
    assert [p.sparsity for p in agp.plans] == [pytest.approx(sc.agp_sparsity(t, 0.1, 0.8, 1, 11))
                                               for t in pruned_at]


def test_agp_through_finetune_on_step_ends_at_final_sparsity():
    model = make()
    agp = sc.AGP(model, 0.75, end_step=12, frequency=3)
    sc.finetune(model, batches(6), epochs=2, lr=1e-2, on_step=agp.step)   # 12 optimizer steps
    assert [p.sparsity for p in agp.plans] == [pytest.approx(sc.agp_sparsity(t, 0.0, 0.75, 0, 12))
                                               for t in (3, 6, 9, 12)]
    assert zero_counts(model) == expected_counts(0.75)   # finetune kept the zeros it was given


# --- penalties and thresholds ---------------------------------------------------------------

class Small(nn.Module):
    """conv (2 channels, 2x2) -> fc (2 -> 3) -> head (3 -> 2), weights set by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.fc = nn.Linear(2, 3)
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[[1.0, -2.0], [0.0, 3.0]]],
                                                 [[[-1.0, 1.0], [1.0, -1.0]]]]))
            self.fc.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -5.0]]))
            self.head.weight.fill_(100.0)     # the head is not penalised by default

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


@pytest.mark.parametrize("kind, value", [
    ("l1", (1 + 2 + 0 + 3) + (1 + 1 + 1 + 1) + (3 + 4 + 5)),                  # 22
    ("l2", (1 + 4 + 0 + 9) + (1 + 1 + 1 + 1) + (9 + 16 + 25)),                # 68
    ("group_lasso", math.sqrt(14) + 2 + (5 + 0 + 5)),                         # per output channel
])
def test_sparsity_penalty_matches_hand_computation(kind, value):
    model = Small()
    penalty = sc.SparsityPenalty(model, kind, strength=0.5)
    result = penalty()
    assert result.item() == pytest.approx(0.5 * value)
    result.backward()
    assert model.head.weight.grad is None
    assert model.conv.weight.grad is not None and model.fc.weight.grad is not None


def test_l1_penalty_gradient_is_strength_times_sign():
    model = Small()
    sc.SparsityPenalty(model, "l1", strength=0.25)().backward()
    assert torch.equal(model.fc.weight.grad, 0.25 * torch.sign(model.fc.weight.detach()))


def test_training_with_l1_penalty_drives_more_weights_to_zero():
    data = batches(10, size=32)
    sparsity = {}
    for strength in (0.0, 1e-2):
        model = make()
        penalty = sc.SparsityPenalty(model, "l1", strength) if strength else None
        sc.finetune(model, data, epochs=5, lr=1e-2, optimizer="adam", penalty=penalty)
        sparsity[strength] = sc.threshold_prune(model, 1e-2).sparsity
    assert sparsity[1e-2] > 3 * sparsity[0.0]
    assert sparsity[1e-2] > 0.2


def test_threshold_prune_masks_exactly_weights_at_or_below_threshold():
    model = make()
    with torch.no_grad():   # a grid of magnitudes with some weights exactly at the threshold
        for layer in (model.fc1, model.fc2, model.head):
            grid = torch.arange(layer.weight.numel(), dtype=torch.float32) % 9 * 0.125 - 0.5
            layer.weight.copy_(grid.reshape(layer.weight.shape))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    plan = sc.threshold_prune(model, 0.25)

    masks = {mp.name: mp.mask for mp in sc.masked_params(model)}
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    for name, mask in masks.items():
        weight = before[name]
        assert torch.any(weight.abs() == 0.25)
        assert torch.equal(mask, weight.abs() > 0.25), name
        assert torch.equal(dict(model.named_parameters())[name].detach(), weight * mask)
    assert torch.equal(model.head.weight.detach(), before["head.weight"])
    assert {layer.name: layer.zeros for layer in plan.layers} == {
        name: int((before[name].abs() <= 0.25).sum()) for name in masks}
    assert plan.sparsity == plan.achieved


# --- bad arguments -----------------------------------------------------------------------

@pytest.mark.parametrize("call, words", [
    (lambda m: sc.AGP(m, 0.5, start_step=10, end_step=10), "start_step.*end_step.*10 and 10"),
    (lambda m: sc.AGP(m, 0.5, start_step=20, end_step=10), "start_step.*end_step.*20 and 10"),
    (lambda m: sc.AGP(m, 0.5, end_step=10, frequency=0), "frequency.*0"),
    (lambda m: sc.AGP(m, 1.0, end_step=10), "final_sparsity.*1.0"),
    (lambda m: sc.iterative_prune(m, 0.5, 0), "steps.*0"),
    (lambda m: sc.iterative_prune(m, 0.5, 2.5), "steps.*2.5"),
    (lambda m: sc.iterative_prune(m, 1.5, 3), "sparsity.*1.5"),
    (lambda m: sc.SparsityPenalty(m, "l0"), "penalty 'l0'.*l1"),
    (lambda m: sc.SparsityPenalty(m, "l1", strength=-1.0), "strength.*-1.0"),
    (lambda m: sc.threshold_prune(m, -0.1), "threshold.*-0.1"),
    (lambda m: sc.finetune(m, batches(1), optimizer="rmsprop"), "optimizer 'rmsprop'.*adam"),
])
def test_bad_arguments_raise_invalid_argument_naming_the_parameter(call, words):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sc.InvalidArgument, match=words):
        call(model)
    after = model.state_dict()
    assert after.keys() == before.keys()       # nothing was pruned or trained before the error
    assert all(torch.equal(after[k], before[k]) for k in before)
