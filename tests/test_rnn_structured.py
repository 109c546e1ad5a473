"""Hidden units of nn.RNN / LSTM / GRU pruned by the structured engine: gate rows, recurrent
columns, next-layer columns, both directions and the head downstream cut together."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import secateurs as sc
from secateurs.cli import main
from secateurs.errors import IncompatibleLayer
from secateurs.examples import zoo
from secateurs.graph.groups import analyze
from secateurs.measure import count_macs, count_parameters
from secateurs.structured import apply_keeps, prune_structured, replay

pytestmark = pytest.mark.usefixtures("one_thread")


class SequenceHead(nn.Module):
    """A recurrent layer over (T, N, F) or (N, T, F) input, then a Linear head on its features.

    `read` picks what the head sees: the last time step, the mean over time, or the last
    layer's final hidden state h_n[-1].
    """

    def __init__(self, rnn: nn.RNNBase, read: str, classes: int = 3):
        super().__init__()
        self.rnn, self.read = rnn, read
        width = (rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional and read != "h_n" else 1)
        self.head = nn.Linear(width, classes)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        out, state = self.rnn(seq)
        time = 1 if self.rnn.batch_first else 0
        if self.read == "h_n":
            h_n = state[0] if isinstance(state, tuple) else state
            return self.head(h_n[-1])
        if self.read == "mean":
            return self.head(out.mean(time))
        return self.head(out.select(time, -1))


class LearnedInitialState(nn.Module):
    """A bidirectional LSTM started from learned h_0 / c_0 parameters (time-major input)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 8, 2, bidirectional=True)
        self.h0, self.c0 = nn.Parameter(torch.randn(4, 1, 8)), nn.Parameter(torch.randn(4, 1, 8))
        self.head = nn.Linear(16, 3)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        batch = seq.shape[1]
        state = (self.h0.expand(-1, batch, -1).contiguous(), self.c0.expand(-1, batch, -1).contiguous())
        out, (h_n, c_n) = self.rnn(seq, state)
        return self.head(out[-1]) + (h_n * c_n).sum((0, 2))[:, None]


class PackedGRU(nn.Module):
    """A GRU read through pack_padded_sequence: its hidden units cannot be followed."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(6, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(seq, torch.tensor([7, 4]), batch_first=True)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return self.head(out[:, -1])


def _sequence(batch_first: bool, features: int = 6) -> torch.Tensor:
    shape = (2, 7, features) if batch_first else (7, 2, features)
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


def _time_major(factory):
    """A builder like the zoo's: a seeded model and a (T, N, F) example input."""
    def build():
        torch.manual_seed(0)
        return factory(), (_sequence(batch_first=False),)
    return build


MODELS = {
    "lstm_classifier": zoo.ZOO["lstm_classifier"],                       # bidirectional, batch_first, embedding
    "gru_model": zoo.ZOO["gru_model"],                                   # 2 layers, batch_first, last step
    "rnn_tanh_bidirectional": _time_major(lambda: SequenceHead(nn.RNN(6, 10, 2, bidirectional=True), "mean")),
    "rnn_relu": _time_major(lambda: SequenceHead(nn.RNN(6, 10, 1, nonlinearity="relu", bias=False), "last")),
    "lstm_time_major": _time_major(lambda: SequenceHead(nn.LSTM(6, 12, 3), "last")),
    "gru_h_n": _time_major(lambda: SequenceHead(nn.GRU(6, 8, 2, bidirectional=True), "h_n")),
    "lstm_learned_state": _time_major(LearnedInitialState),
}


def _rnn_of(model: nn.Module) -> nn.RNNBase:
    return next(m for m in model.modules() if isinstance(m, nn.RNNBase))


@pytest.mark.parametrize("name", MODELS)
def test_half_the_hidden_units_are_really_removed(name, tmp_path):
    model, inputs = MODELS[name]()
    model.eval()
    hidden = _rnn_of(model).hidden_size
    with torch.no_grad():
        before = model(*inputs)
    params, macs = count_parameters(model)[0], count_macs(model, inputs)[0]
    plan = prune_structured(model, inputs, 0.5)
    rnn = _rnn_of(model)
    assert rnn.hidden_size == hidden - hidden // 2
    assert all(p.shape[0] % rnn.hidden_size == 0 for n, p in rnn.named_parameters() if n.startswith(("weight", "bias")))
    out = model(*inputs)
    assert out.shape == before.shape
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert count_parameters(model)[0] == plan.params_after < params
    assert count_macs(model, inputs)[0] == plan.macs_after < macs
    sc.save(model, tmp_path / "saved", plan)
    fresh, _ = MODELS[name]()
    sc.load(fresh, tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(*inputs), model.eval()(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_zero_ratio_changes_nothing(name):
    model, inputs = MODELS[name]()
    original = copy.deepcopy(model.eval())
    prune_structured(model, inputs, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), original(*inputs), rtol=0, atol=0)
    assert count_parameters(model) == count_parameters(original)


def _zero_removed(model: nn.Module, keeps: dict[str, list[int]], rnn_rows_only: bool) -> None:
    """Zero what the plan removed; for RNN parameters only the gate rows (dim 0) when asked."""
    rnn_params = {f"{name}.{local}" for name, m in model.named_modules() if isinstance(m, nn.RNNBase)
                  for local, _ in m.named_parameters()}
    with torch.no_grad():
        for key, kept in keeps.items():
            name, _, dim = key.rpartition(":")
            if rnn_rows_only and name in rnn_params and int(dim) != 0:
                continue
            param = model.get_parameter(name)
            drop = torch.ones(param.shape[int(dim)], dtype=torch.bool)
            drop[kept] = False
            param.index_fill_(int(dim), drop.nonzero().flatten(), 0.0)


@pytest.mark.parametrize("name", MODELS)
def test_removing_hidden_units_equals_zeroing_their_gate_rows(name):
    """A unit whose gate rows and biases are zero outputs exactly 0 from a zero initial state
    (LSTM: i = f = o = 1/2, g = 0; GRU: n = 0, h = z * 0), so nothing downstream sees it."""
    model, inputs = MODELS[name]()
    model.eval()
    zeroed = copy.deepcopy(model)
    plan = prune_structured(model, inputs, 0.5, method="random", seed=1)
    _zero_removed(zeroed, plan.keeps, rnn_rows_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), zeroed(*inputs), rtol=1e-5, atol=1e-6)
    rnn = _rnn_of(zeroed)
    key = next(k for k in plan.keeps if k.endswith("weight_hh_l0:1"))
    removed = sorted(set(range(rnn.hidden_size)) - set(plan.keeps[key]))
    features = removed + [rnn.hidden_size + i for i in removed] * rnn.bidirectional
    captured = []
    handle = rnn.register_forward_hook(lambda m, a, out: captured.append(out[0]))
    with torch.no_grad():
        zeroed(*inputs)
    handle.remove()
    assert removed and torch.count_nonzero(captured[0][..., features]) == 0


def test_every_layer_and_direction_is_one_group_with_the_head():
    model, inputs = MODELS["lstm_classifier"]()
    analysis = analyze(model, inputs)
    assert not analysis.unknown_ops
    group = next(g for g in analysis.groups if ("lstm.weight_hh_l1_reverse", 1) in g.members)
    assert group.size == model.lstm.hidden_size and len(group.prunable_units) == group.size
    assert {("lstm.weight_ih_l0", 0), ("lstm.weight_ih_l1", 1), ("lstm.bias_hh_l0_reverse", 0),
            ("head.weight", 1)} <= set(group.members)
    embedding = next(g for g in analysis.groups if ("embed.weight", 1) in g.members)
    assert set(embedding.members) == {("embed.weight", 1), ("lstm.weight_ih_l0", 1), ("lstm.weight_ih_l0_reverse", 1)}


def test_global_scope_and_a_mac_target_keep_layers_equal():
    model, inputs = MODELS["lstm_classifier"]()
    macs = count_macs(model, inputs)[0]
    plan = prune_structured(model, inputs, target="macs=0.5")
    assert plan.macs_after <= 0.5 * macs
    widths = {p.shape[0] for n, p in model.lstm.named_parameters() if n.startswith("weight_hh")}
    assert widths == {4 * model.lstm.hidden_size}


def test_projected_lstm_is_reported_blocked_and_left_intact():
    torch.manual_seed(0)
    model = SequenceHead(nn.LSTM(6, 12, 2, proj_size=4), "last").eval()
    inputs = (_sequence(False),)
    analysis = analyze(model, inputs)
    lstm_groups = [g for g in analysis.groups if any(n.startswith("rnn.") for n, _ in g.members)]
    assert lstm_groups and not any(g.prunable_units for g in lstm_groups)
    assert any("proj_size=4" in (g.reason or "") for g in lstm_groups)
    original = copy.deepcopy(model)
    prune_structured(model, inputs, 0.5)
    assert model.rnn.hidden_size == 12 and model.rnn.weight_hr_l0.shape == (4, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), original(*inputs), rtol=0, atol=0)
    with pytest.raises(IncompatibleLayer, match="proj_size=4"):
        apply_keeps(model, {("rnn.weight_hh_l0", 1): torch.arange(2)})


def test_learned_initial_state_loses_the_same_units():
    model, inputs = MODELS["lstm_learned_state"]()
    prune_structured(model, inputs, 0.5)
    assert model.h0.shape == model.c0.shape == (4, 1, model.rnn.hidden_size) == (4, 1, 4)


def test_packed_sequence_input_is_reported_blocked():
    torch.manual_seed(0)
    model = PackedGRU().eval()
    analysis = analyze(model, _sequence(True))
    gru_groups = [g for g in analysis.groups if any(n.startswith("rnn.") for n, _ in g.members)]
    assert gru_groups and not any(g.prunable_units for g in gru_groups)
    assert any("PackedSequence" in (g.reason or "") for g in gru_groups)


def test_a_plan_that_does_not_fit_the_rnn_is_refused():
    model, inputs = MODELS["gru_model"]()
    plan = prune_structured(copy.deepcopy(model), inputs, 0.5).to_dict()
    plan["keeps"]["gru.weight_ih_l0:0"] = plan["keeps"]["gru.weight_ih_l0:0"][1:]
    with pytest.raises(IncompatibleLayer, match="weight_ih_l0:0 does not match the hidden units"):
        replay(model, plan)
    assert model.gru.hidden_size == 16  # validated before anything was cut


@pytest.mark.parametrize("spec,shape,dtype", [("secateurs.examples.zoo:lstm_classifier", "2,12", "long"),
                                              ("secateurs.examples.zoo:gru_model", "2,12,16", "float")])
def test_analyze_lists_no_unknown_op_for_recurrent_models(spec, shape, dtype, capsys):
    code = main(["analyze", "--model", spec, "--input-shape", shape, "--input-dtype", dtype])
    out = capsys.readouterr().out
    assert code == 0
    assert "groups of coupled channels" in out
    assert "ops without a rule" not in out and "unknown op" not in out
