"""Importance criteria: every score against a hand computation, the errors a user sees,
no side effects on the model, and a ranking test against the true loss increase."""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

import secateurs as sc
from secateurs.criteria import CRITERIA, Calibration, get_criterion, hessian
from secateurs.errors import IncompatibleLayer, InvalidArgument, MissingData
from secateurs.select import select_targets
from tests.conftest import tiny_batches, tiny_cnn

ALL_METHODS = sorted(CRITERIA)


pytestmark = pytest.mark.usefixtures("one_thread")


def score(method, model, data=None, loss_fn=None, seed=0, **selection):
    targets = select_targets(model, prune_last=True, **selection)
    return get_criterion(method, seed=seed)(model, targets, Calibration(data, loss_fn))


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def uneven_batches(sizes=(5, 3, 4), features=6, classes=3, seed=0):
    """Batches of different sizes, so a mean over batches differs from one over samples."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)) for n in sizes]


def conv_bn_relu(seed: int = 0) -> nn.Sequential:
    """Conv -> BN -> ReLU -> Linear, with BN statistics far from the identity."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4) * 0.3)
        bn.running_var.copy_(torch.rand(4) + 0.5)
        bn.weight.copy_(torch.randn(4))
        bn.bias.copy_(torch.randn(4) * 0.5)
    return model


def image_batches(sizes=(4, 2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


# --- weight-only criteria ----------------------------------------------------------------

def test_l1_and_l2_are_the_weight_magnitudes():
    model = tiny_cnn()
    l1, l2 = score("l1", model), score("l2", model)
    assert set(l1) == {"conv1.weight", "conv2.weight", "fc1.weight", "head.weight"}
    for name, s in l1.items():
        w = model.get_parameter(name).detach()
        assert s.shape == w.shape
        assert torch.equal(s, w.abs())
        assert torch.equal(l2[name], w * w)
    assert torch.equal(score("magnitude", model)["fc1.weight"], l1["fc1.weight"])


def test_random_is_seeded_uniform_noise():
    model = tiny_cnn()
    first, again, other = score("random", model, seed=3), score("random", model, seed=3), score("random", model, seed=4)
    for name, s in first.items():
        assert s.shape == model.get_parameter(name).shape
        assert torch.equal(s, again[name])
        assert not torch.equal(s, other[name])
        assert 0 <= s.min() and s.max() < 1
    assert not torch.equal(first["conv1.weight"].flatten()[:72], first["conv2.weight"].flatten()[:72])


# --- gradient criteria -------------------------------------------------------------------

def per_batch_grads(model, batches, loss_fn):
    """Gradient of each batch's loss, from plain backward passes on a copy in eval mode."""
    ref = copy.deepcopy(model).eval()
    grads = []
    for x, y in batches:
        ref.zero_grad()
        loss_fn(ref(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in ref.named_parameters()})
    return grads


@pytest.mark.parametrize("make_model, make_batches", [(mlp, uneven_batches), (conv_bn_relu, image_batches)])
def test_gradient_and_taylor_average_each_batch_gradient(make_model, make_batches):
    model, batches = make_model(), make_batches()
    grads = per_batch_grads(model, batches, F.cross_entropy)
    gradient = score("gradient", model, batches, F.cross_entropy)
    taylor = score("taylor", model, batches, F.cross_entropy)
    for name, s in gradient.items():
        w = model.get_parameter(name).detach()
        expected = sum(g[name].abs() for g in grads) / len(grads)
        assert torch.allclose(s, expected, rtol=1e-5, atol=1e-7)
        expected_taylor = sum((w * g[name]).abs() for g in grads) / len(grads)
        assert torch.allclose(taylor[name], expected_taylor, rtol=1e-5, atol=1e-7)
        # the mean of |g| over batches, not |mean g|: the test can tell them apart
        assert not torch.allclose(s, (sum(g[name] for g in grads) / len(grads)).abs(), rtol=1e-3)


def test_max_batches_limits_the_gradient_average():
    model, batches = mlp(), uneven_batches()
    targets = select_targets(model, prune_last=True)
    limited = get_criterion("gradient")(model, targets, Calibration(batches, F.cross_entropy, max_batches=2))
    assert torch.allclose(limited["0.weight"], score("gradient", model, batches[:2], F.cross_entropy)["0.weight"])


# --- OBD ---------------------------------------------------------------------------------

def per_sample_fisher(model, batches, loss_fn):
    """Mean over samples of the squared gradient, one backward pass per sample."""
    ref = copy.deepcopy(model).eval()
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    total = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for i in range(len(ys)):
        ref.zero_grad()
        loss_fn(ref(xs[i:i + 1]), ys[i:i + 1]).backward()
        for n, p in ref.named_parameters():
            total[n] += p.grad ** 2
    return {n: t / len(ys) for n, t in total.items()}


class DataDependentMLP(nn.Module):
    """Branches on the value of its input, which vmap cannot batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x, labels=None):
        h = torch.relu(self.fc1(x))
        if h.sum() > 1.0:
            h = h * 2
        return self.fc2(h)


@pytest.fixture
def loop_calls(monkeypatch):
    """Count the calls of OBD's per-sample loop, to know which path ran."""
    calls = []
    original = hessian._loop_squared_grads

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(hessian, "_loop_squared_grads", spy)
    return calls


@pytest.mark.parametrize("make_model, make_batches", [(mlp, uneven_batches), (conv_bn_relu, image_batches)])
def test_obd_is_half_w2_times_per_sample_fisher(make_model, make_batches, loop_calls):
    model, batches = make_model(), make_batches()
    fisher = per_sample_fisher(model, batches, F.cross_entropy)
    obd = score("obd", model, batches, F.cross_entropy)
    assert not loop_calls  # these models go through vmap
    for name, s in obd.items():
        w = model.get_parameter(name).detach()
        assert torch.allclose(s, 0.5 * w * w * fisher[name], rtol=1e-4, atol=1e-9)
    by_alias = score("hessian", model, batches, F.cross_entropy)
    assert all(torch.equal(by_alias[name], obd[name]) for name in obd)


def test_obd_falls_back_to_a_per_sample_loop_where_vmap_fails(loop_calls):
    model, batches = DataDependentMLP(), uneven_batches()
    fisher = per_sample_fisher(model, batches, F.cross_entropy)
    obd = score("obd", model, batches, F.cross_entropy)
    assert loop_calls  # vmap refused the data-dependent branch
    for name, s in obd.items():
        w = model.get_parameter(name).detach()
        assert torch.allclose(s, 0.5 * w * w * fisher[name], rtol=1e-4, atol=1e-9)
    # dict batches (keyword inputs, labels under "labels") take the loop and agree
    as_dicts = [{"x": x, "labels": y} for x, y in batches]
    from_dicts = score("obd", model, as_dicts, F.cross_entropy)
    for name in obd:
        assert torch.allclose(from_dicts[name], obd[name], rtol=1e-5, atol=1e-9)


def test_vmap_and_loop_squared_gradients_agree():
    model = conv_bn_relu().eval()
    params = {t.name: t.param for t in select_targets(model, prune_last=True)}
    (x, y), = image_batches(sizes=(7,))
    by_vmap = hessian._vmap_squared_grads(model, params, F.cross_entropy, (x,), y, chunk_size=3)
    by_loop = hessian._loop_squared_grads(model, params, F.cross_entropy, (x,), {}, y)
    assert set(by_vmap) == set(by_loop) == {"0.weight", "4.weight"}
    for name in by_vmap:
        assert torch.allclose(by_vmap[name], by_loop[name], rtol=1e-4, atol=1e-9)


# --- activation criteria -----------------------------------------------------------------

def test_activation_and_apoz_on_linear_relu():
    model, batches = mlp(), uneven_batches()
    xs = torch.cat([x for x, _ in batches])
    with torch.no_grad():
        hidden = torch.relu(model[0](xs))  # read after the ReLU that consumes layer 0
        out = model[2](hidden)             # the head has no follower: its raw output
    assert 0 < (hidden == 0).float().mean() < 1
    activation = score("activation", model, batches)
    apoz = score("apoz", model, batches)
    for name, a, width in [("0.weight", hidden, 6), ("2.weight", out, 5)]:
        mean_abs = torch.stack([a[:, c].abs().mean() for c in range(a.shape[1])])
        assert torch.allclose(activation[name], mean_abs[:, None].expand(-1, width), rtol=1e-5)
        zeros = torch.stack([(a[:, c] <= 0).float().mean() for c in range(a.shape[1])])
        assert torch.allclose(apoz[name], (1 - zeros)[:, None].expand(-1, width))


def test_activation_and_apoz_on_conv_bn_relu():
    model, batches = conv_bn_relu(), image_batches()
    model.train()  # scoring reads BN with its running statistics all the same
    ref = copy.deepcopy(model).eval()
    xs = torch.cat([x for x, _ in batches])
    with torch.no_grad():
        a = ref[2](ref[1](ref[0](xs)))
    activation = score("activation", model, batches)["0.weight"]
    apoz = score("apoz", model, batches)["0.weight"]
    assert activation.shape == apoz.shape == (4, 3, 3, 3)
    for c in range(4):
        assert torch.allclose(activation[c], a[:, c].abs().mean().expand(3, 3, 3), rtol=1e-5)
        assert torch.allclose(apoz[c], (1 - (a[:, c] <= 0).float().mean()).expand(3, 3, 3))
    assert len(set(apoz[:, 0, 0, 0].tolist())) > 1


def test_apoz_with_a_functional_relu_counts_what_the_relu_zeroes():
    model = tiny_cnn()  # conv1 -> bn1 -> torch.relu, conv2 -> torch.relu
    batches = tiny_batches()
    ref = copy.deepcopy(model).eval()
    xs = torch.cat([x for x, _ in batches])
    with torch.no_grad():
        bn_out = ref.bn1(ref.conv1(xs))
        conv2_out = ref.conv2(torch.relu(bn_out))
    apoz = score("apoz", model, batches)
    activation = score("activation", model, batches)
    for name, a in [("conv1.weight", bn_out), ("conv2.weight", conv2_out)]:
        zeroed = (torch.relu(a) == 0).float().mean(dim=(0, 2, 3))
        assert torch.allclose(apoz[name][:, 0, 0, 0], 1 - zeroed)
        assert torch.allclose(activation[name][:, 0, 0, 0], a.abs().mean(dim=(0, 2, 3)), rtol=1e-5)


# --- Wanda -------------------------------------------------------------------------------

def test_wanda_on_linear_uses_the_input_norm_over_all_tokens():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 5, 6, generator=g), torch.randn(3, 5, 6, generator=g)]  # (batch, tokens, features)
    tokens = torch.cat([b.reshape(-1, 6) for b in batches])
    norms = torch.stack([tokens[:, j].pow(2).sum().sqrt() for j in range(6)])
    expected = model[0].weight.detach().abs() * norms[None, :]
    assert torch.allclose(score("wanda", model, batches)["0.weight"], expected, rtol=1e-5)


def column_norms(padded: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """||X_j|| for each im2col column j = (input channel, kernel row, kernel column),
    by walking every output position of an already padded input."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    total = torch.zeros(padded.shape[1], kh, kw)
    for i in range(out_h):
        for j in range(out_w):
            rows = [i * sh + dh * r for r in range(kh)]
            cols = [j * sw + dw * c for c in range(kw)]
            total += padded[:, :, rows][:, :, :, cols].pow(2).sum(0)
    return total.sqrt()


def test_wanda_on_conv2d_uses_im2col_columns_with_stride_padding_dilation():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    model = nn.Sequential(conv)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 3, 7, 6, generator=g), torch.randn(3, 3, 7, 6, generator=g)]
    xs = torch.cat(batches)
    norms = column_norms(F.pad(xs, (2, 2, 1, 1)), conv)
    unfolded = F.unfold(xs, (3, 2), dilation=(1, 2), padding=(1, 2), stride=(2, 1))
    assert unfolded.shape[2] == conv(xs).shape[2] * conv(xs).shape[3]
    assert torch.allclose(unfolded.pow(2).sum((0, 2)).sqrt().reshape(3, 3, 2), norms, rtol=1e-5)
    expected = conv.weight.detach().abs() * norms[None]
    assert torch.allclose(score("wanda", model, batches)["0.weight"], expected, rtol=1e-5)


def test_wanda_on_a_grouped_conv_pairs_each_filter_with_its_group_inputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)  # weight (6, 2, 3, 3)
    model = nn.Sequential(conv)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 4, 5, 5, generator=g) for _ in range(2)]
    norms = column_norms(F.pad(torch.cat(batches), (1, 1, 1, 1)), conv)  # (4, 3, 3)
    wanda = score("wanda", model, batches)["0.weight"]
    for out in range(6):
        group = out // 3
        expected = conv.weight[out].detach().abs() * norms[2 * group: 2 * group + 2]
        assert torch.allclose(wanda[out], expected, rtol=1e-5)


@pytest.mark.parametrize("padding, mode, pad", [
    ("same", "zeros", lambda x: F.pad(x, (1, 1, 1, 1))),
    (1, "reflect", lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect")),
    (1, "circular", lambda x: F.pad(x, (1, 1, 1, 1), mode="circular")),
])
def test_wanda_on_conv2d_pads_as_the_layer_does(padding, mode, pad):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=padding, padding_mode=mode)
    xs = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    expected = conv.weight.detach().abs() * column_norms(pad(xs), conv)[None]
    assert torch.allclose(score("wanda", nn.Sequential(conv), [xs])["0.weight"], expected, rtol=1e-5)


# --- batch formats -----------------------------------------------------------------------

class KeywordMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x, labels=None):
        return self.body(x)


@pytest.mark.parametrize("method", ["activation", "apoz", "wanda", "gradient", "taylor", "obd"])
def test_tensor_tuple_and_dict_batches_score_alike(method):
    model, batches = KeywordMLP(), uneven_batches()
    as_tuples = score(method, model, batches, F.cross_entropy)
    as_dicts = score(method, model, [{"x": x, "labels": y} for x, y in batches], F.cross_entropy)
    for name in as_tuples:
        assert torch.allclose(as_dicts[name], as_tuples[name], rtol=1e-5, atol=1e-9)
    if method in ("activation", "apoz", "wanda"):
        as_tensors = score(method, model, [x for x, _ in batches])
        for name in as_tuples:
            assert torch.equal(as_tensors[name], as_tuples[name])


# --- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["gradient", "taylor", "obd", "activation", "apoz", "wanda"])
def test_data_aware_criteria_without_data_raise_missing_data(method):
    with pytest.raises(MissingData, match=f"criterion '{method}' needs calibration data"):
        score(method, mlp(), None, F.cross_entropy)
    with pytest.raises(MissingData, match="yielded no batches"):
        score(method, mlp(), [], F.cross_entropy)


@pytest.mark.parametrize("method", ["gradient", "taylor", "obd"])
def test_gradient_criteria_without_loss_raise_missing_data(method):
    with pytest.raises(MissingData, match=f"criterion '{method}' needs a loss function"):
        score(method, mlp(), uneven_batches(), None)


@pytest.mark.parametrize("method", ["activation", "apoz", "wanda"])
def test_activation_criteria_refuse_an_embedding(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    tokens = [torch.randint(0, 10, (3, 5))]
    with pytest.raises(IncompatibleLayer, match=r"0\.weight \(Embedding\)"):
        score(method, model, tokens, types=["embedding"])


def test_unknown_method_names_the_method():
    with pytest.raises(InvalidArgument, match="unknown method 'fisherish'"):
        get_criterion("fisherish")
    with pytest.raises(InvalidArgument, match="'fisherish'"):
        sc.prune(mlp(), "fisherish", 0.5)


# --- no side effects ---------------------------------------------------------------------

def busy_model() -> nn.Module:
    """Train mode with a BN and a dropout, one child left in eval, some .grad fields set."""
    model = conv_bn_relu()
    model = nn.Sequential(*model[:4], nn.Dropout(0.5), model[4])
    model.train()
    model[0].eval()
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    model[1].weight.grad = torch.full_like(model[1].weight, -3.0)
    return model


@pytest.mark.parametrize("method", ALL_METHODS)
def test_scoring_is_deterministic_and_leaves_the_model_alone(method):
    model, batches = busy_model(), image_batches()
    before = copy.deepcopy(model)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    first = score(method, model, batches, F.cross_entropy)
    second = score(method, model, batches, F.cross_entropy)
    assert set(first) == ({"1.weight"} if CRITERIA[method].scores_norms else {"0.weight", "5.weight"})
    for name in first:
        assert first[name].shape == model.get_parameter(name).shape
        assert torch.equal(first[name], second[name])
    for (name, p), (_, q) in zip(model.named_parameters(), before.named_parameters()):
        assert torch.equal(p, q) and p.requires_grad == q.requires_grad
        assert (p.grad is None) == (grads[name] is None), name
        assert p.grad is None or torch.equal(p.grad, grads[name]), name
    for (name, b), (_, c) in zip(model.named_buffers(), before.named_buffers()):
        assert torch.equal(b, c), name  # BN running mean, var and batch count
    assert [m.training for m in model.modules()] == [m.training for m in before.modules()]


@pytest.mark.parametrize("method", ["gradient", "taylor", "obd"])
def test_gradient_criteria_score_a_frozen_model(method):
    model, batches = mlp(), uneven_batches()
    expected = score(method, model, batches, F.cross_entropy)
    model.requires_grad_(False)
    frozen = score(method, model, batches, F.cross_entropy)
    for name in expected:
        assert torch.allclose(frozen[name], expected[name], rtol=1e-5, atol=1e-9)
    assert not any(p.requires_grad for p in model.parameters())


def test_obd_loop_scores_a_frozen_model():
    model, batches = DataDependentMLP(), uneven_batches()
    expected = score("obd", model, batches, F.cross_entropy)
    model.requires_grad_(False)
    frozen = score("obd", model, batches, F.cross_entropy)
    for name in expected:
        assert torch.allclose(frozen[name], expected[name], rtol=1e-5, atol=1e-9)


# --- ranking against the true loss increase ----------------------------------------------

RANKING_LOSS = partial(F.cross_entropy, label_smoothing=0.1)  # smoothing: a finite minimum exists


@pytest.fixture(scope="module")
def digits_mlp_at_a_minimum():
    """An MLP trained on 600 digits to a minimum of its loss on those same digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    keep = torch.randperm(len(y), generator=g)[:600]
    x, y = x[keep], y[keep]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 10))
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        for idx in torch.randperm(len(y), generator=g).split(100):
            adam.zero_grad()
            RANKING_LOSS(model(x[idx]), y[idx]).backward()
            adam.step()
    # full-batch L-BFGS to settle at the minimum, where OBD's second-order view holds
    lbfgs = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe",
                              tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        lbfgs.zero_grad()
        loss = RANKING_LOSS(model(x), y)
        loss.backward()
        return loss

    lbfgs.step(closure)
    model.zero_grad(set_to_none=True)
    return model.eval(), x, y


def true_loss_increase(model, layer: nn.Linear, x, y) -> torch.Tensor:
    """Loss with each weight of `layer` zeroed alone, minus the loss of the intact model."""
    weight = layer.weight
    increase = torch.zeros_like(weight)
    with torch.no_grad():
        base = RANKING_LOSS(model(x), y).item()
        for i in range(weight.shape[0]):
            for j in range(weight.shape[1]):
                kept = weight[i, j].item()
                weight[i, j] = 0.0
                increase[i, j] = RANKING_LOSS(model(x), y).item() - base
                weight[i, j] = kept
    return increase


def test_data_aware_criteria_rank_weights_by_their_true_loss_increase(digits_mlp_at_a_minimum):
    model, x, y = digits_mlp_at_a_minimum
    assert (model(x).argmax(1) == y).float().mean() > 0.95
    layer = model[2]  # the hidden 24x24 layer: every input is a live neuron
    truth = true_loss_increase(model, layer, x, y)
    assert (truth < 0).float().mean() < 0.05  # at a minimum almost no cut lowers the loss
    targets = [t for t in select_targets(model, prune_last=True) if t.module is layer]
    calibration = Calibration(list(zip(x.split(100), y.split(100))), RANKING_LOSS)
    live = truth != 0  # weights of dead neurons or fed by dead neurons cost nothing
    assert 0.5 < live.float().mean() < 0.9
    rho, rho_live = {}, {}
    for method in ["gradient", "taylor", "obd", "wanda", "activation", "apoz", "random"]:
        scores = get_criterion(method, seed=0)(model, targets, calibration)["2.weight"]
        rho[method] = spearmanr(scores.flatten().numpy(), truth.flatten().numpy()).statistic
        rho_live[method] = spearmanr(scores[live].numpy(), truth[live].numpy()).statistic
    assert abs(rho["random"]) < 0.15 and abs(rho_live["random"]) < 0.15, (rho, rho_live)
    for method in ["gradient", "taylor", "obd", "wanda"]:  # weight-level criteria
        assert rho[method] > rho["random"] + 0.3, (method, rho)
        assert rho_live[method] > rho_live["random"] + 0.15, (method, rho_live)
    assert min(rho_live["taylor"], rho_live["obd"], rho_live["wanda"]) > 0.7, rho_live
    assert rho["taylor"] > 0.8 and rho["obd"] > 0.8, rho
    # One score per neuron, tied across its row: activation and APoZ find the dead units
    # (and so beat random overall) but cannot order the weights of live ones.
    for method in ["activation", "apoz"]:
        assert rho[method] > rho["random"] + 0.2, (method, rho)
