"""Surgery leaves a smaller module that computes exactly what the original computed.

Removing output channels must give the original outputs restricted to the kept ones;
removing input channels must give the original outputs with the removed inputs zeroed.
Most checks run in float64 so the tolerances can stay tight.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from secateurs.errors import IncompatibleLayer, InvalidArgument
from secateurs.sparsity import MASK_SUFFIX, set_mask
from secateurs.surgery import (IN_SURGERY, OUT_SURGERY, PrunedMultiheadAttention, keep_heads, keep_hidden,
                               keep_hidden_all, keep_in, keep_out, keep_param_dim, rnn_output_features,
                               supports, turn_off_nested_tensors)

TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def _idx(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _zeroed(x: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
    """`x` with every index along `dim` outside `keep` set to zero."""
    mask = torch.zeros(x.shape[dim], dtype=torch.bool)
    mask[keep] = True
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * mask.view(shape)


def _cut(module: nn.Module, surgery, keep) -> nn.Module:
    pruned = copy.deepcopy(module)
    surgery(pruned, keep)
    return pruned


def _assert_ordinary(module: nn.Module, output: torch.Tensor) -> None:
    """Parameters are Parameters, state_dict matches them, and backward reaches all of them."""
    if output.requires_grad:
        output.sum().backward()
    state = module.state_dict()
    for name, param in module.named_parameters():
        assert type(param) is nn.Parameter
        assert state[name].shape == param.shape
        if param.requires_grad:
            assert param.grad is not None and param.grad.shape == param.shape, name


def _check_out(module: nn.Module, keep: torch.Tensor, x: torch.Tensor, dim: int = 1) -> nn.Module:
    pruned = _cut(module, keep_out, keep)
    expected = module(x).index_select(dim, keep)
    got = pruned(x)
    assert_close(got, expected, **TIGHT)
    _assert_ordinary(pruned, got)
    return pruned


def _check_in(module: nn.Module, keep: torch.Tensor, x: torch.Tensor, dim: int = 1) -> nn.Module:
    pruned = _cut(module, keep_in, keep)
    expected = module(_zeroed(x, dim, keep))
    got = pruned(x.index_select(dim, keep))
    assert_close(got, expected, **TIGHT)
    _assert_ordinary(pruned, got)
    return pruned


def _check_channelwise(module: nn.Module, keep: torch.Tensor, x: torch.Tensor, dim: int = 1) -> nn.Module:
    """For layers whose inputs and outputs are the same channels (norms, PReLU, depthwise)."""
    pruned = _cut(module, keep_out, keep)
    got = pruned(x.index_select(dim, keep))
    assert_close(got, module(x).index_select(dim, keep), **TIGHT)
    _assert_ordinary(pruned, got)
    return pruned


# ----------------------------------------------------------------------------- Linear

def test_linear_out_and_in():
    _seeded()
    linear = nn.Linear(6, 5).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    pruned = _check_out(linear, _idx(0, 3, 4), x)
    assert (pruned.out_features, pruned.in_features) == (3, 6)
    assert repr(pruned) == "Linear(in_features=6, out_features=3, bias=True)"
    pruned = _check_in(linear, _idx(1, 2, 5), x)
    assert pruned.in_features == 3 and pruned.weight.shape == (5, 3)


def test_parameters_keep_flags_dtype_and_kind():
    _seeded()
    linear = nn.Linear(4, 4, bias=False).double()
    linear.weight.requires_grad_(False)
    keep_out(linear, _idx(1, 2))
    assert type(linear.weight) is nn.Parameter and not linear.weight.requires_grad
    assert linear.weight.dtype == torch.float64 and linear.bias is None
    assert dict(linear.named_parameters()).keys() == {"weight"}


def test_subclass_found_through_mro():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    _seeded()
    assert supports(Scaled(3, 3), "out") and not supports(nn.ReLU(), "out")
    _check_out(Scaled(3, 4).double(), _idx(0, 2), torch.randn(2, 3, dtype=torch.float64))


def test_unsorted_keep_is_sorted():
    _seeded()
    linear = nn.Linear(3, 5).double()
    pruned = _cut(linear, keep_out, [4, 1])
    assert_close(pruned.weight, linear.weight[[1, 4]], **TIGHT)


# ---------------------------------------------------------------------- convolutions

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _image(dims: int, channels: int) -> torch.Tensor:
    return torch.randn(2, channels, *([5] * dims), dtype=torch.float64)


@pytest.mark.parametrize("kind", [CONVS, TRANSPOSED], ids=["conv", "transpose"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_out_and_in(kind, dims):
    _seeded(dims)
    conv = kind[dims](4, 6, 3, padding=1).double()
    pruned = _check_out(conv, _idx(0, 2, 5), _image(dims, 4))
    assert pruned.out_channels == 3 and pruned.bias.shape == (3,)
    pruned = _check_in(conv, _idx(1, 3), _image(dims, 4))
    assert pruned.in_channels == 2
    assert f"{kind[dims].__name__}(2, 6" in repr(pruned)


@pytest.mark.parametrize("kind", [nn.Conv2d, nn.ConvTranspose2d])
def test_grouped_conv_keeps_equal_counts_per_group(kind):
    _seeded()
    conv = kind(6, 8, 3, padding=1, groups=2).double()
    # groups see inputs 0-2 and 3-5, outputs 0-3 and 4-7; each group keeps its own slice
    pruned = _check_out(conv, _idx(1, 2, 4, 7), _image(2, 6))
    assert (pruned.out_channels, pruned.groups) == (4, 2)
    pruned = _check_in(conv, _idx(0, 2, 4, 5), _image(2, 6))
    assert (pruned.in_channels, pruned.groups) == (4, 2)
    with pytest.raises(IncompatibleLayer, match=r"groups=2.*\[3, 1\]"):
        keep_out(copy.deepcopy(conv), _idx(0, 1, 2, 5))
    with pytest.raises(IncompatibleLayer, match="same number of input channels"):
        keep_in(copy.deepcopy(conv), _idx(0, 1, 2))


@pytest.mark.parametrize("kind", [nn.Conv2d, nn.ConvTranspose2d])
def test_depthwise_conv_cuts_inputs_and_groups_with_outputs(kind):
    _seeded()
    conv = kind(5, 5, 3, padding=1, groups=5).double()
    x = _image(2, 5)
    keep = _idx(0, 3, 4)
    for surgery in (keep_out, keep_in):
        pruned = _cut(conv, surgery, keep)
        assert (pruned.in_channels, pruned.out_channels, pruned.groups) == (3, 3, 3)
        got = pruned(x[:, keep])
        assert_close(got, conv(x)[:, keep], **TIGHT)
        _assert_ordinary(pruned, got)


def test_depth_multiplier_conv_keeps_outputs_per_group():
    _seeded()
    conv = nn.Conv2d(3, 6, 3, padding=1, groups=3).double()   # two outputs per input channel
    pruned = _check_out(conv, _idx(1, 2, 5), _image(2, 3))
    assert (pruned.in_channels, pruned.out_channels, pruned.groups) == (3, 3, 3)


# ----------------------------------------------------------------------------- norms

def _randomize(module: nn.Module) -> nn.Module:
    """Fill every parameter and buffer with random values so nothing passes by accident."""
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "var" in name else torch.randn_like(tensor))
    return module


@pytest.mark.parametrize("norm, dims", [
    (nn.BatchNorm1d(6), 1), (nn.BatchNorm2d(6), 2), (nn.BatchNorm3d(6), 3),
    (nn.BatchNorm2d(6, affine=False), 2), (nn.BatchNorm2d(6, track_running_stats=False), 2),
    (nn.InstanceNorm1d(6, affine=True), 1), (nn.InstanceNorm2d(6, affine=True), 2),
    (nn.InstanceNorm2d(6, affine=True, track_running_stats=True), 2), (nn.InstanceNorm3d(6), 3),
], ids=lambda v: repr(v) if isinstance(v, nn.Module) else str(v))
def test_channel_norms(norm, dims):
    _seeded()
    norm = _randomize(copy.deepcopy(norm)).double().eval()
    pruned = _check_channelwise(norm, _idx(0, 2, 3), _image(dims, 6))
    assert pruned.num_features == 3
    for name in ("running_mean", "running_var"):
        if getattr(pruned, name) is not None:
            assert getattr(pruned, name).shape == (3,)
    assert not supports(norm, "in")


def test_group_norm_whole_groups_are_exact():
    _seeded()
    norm = _randomize(nn.GroupNorm(3, 6)).double()
    pruned = _check_channelwise(norm, _idx(0, 1, 4, 5), _image(2, 6))
    assert (pruned.num_groups, pruned.num_channels) == (2, 4)


def test_group_norm_equal_cut_per_group_matches_reference():
    _seeded()
    norm = _randomize(nn.GroupNorm(2, 6)).double()
    keep, x = _idx(0, 2, 3, 4), _image(2, 6)
    pruned = _cut(norm, keep_out, keep)
    assert (pruned.num_groups, pruned.num_channels) == (2, 4)
    expected = F.group_norm(x[:, keep], 2, norm.weight[keep], norm.bias[keep], norm.eps)
    assert_close(pruned(x[:, keep]), expected, **TIGHT)
    with pytest.raises(IncompatibleLayer, match=r"groups=2.*\[1, 2\]"):
        keep_out(copy.deepcopy(norm), _idx(0, 3, 5))


@pytest.mark.parametrize("norm", [nn.LayerNorm(6), nn.LayerNorm(6, elementwise_affine=False),
                                  nn.LayerNorm(6, bias=False), nn.LayerNorm((3, 6))], ids=repr)
def test_layer_norm_last_dim(norm):
    _seeded()
    norm = _randomize(copy.deepcopy(norm)).double()
    keep, x = _idx(1, 2, 5), torch.randn(2, 3, 6, dtype=torch.float64)
    pruned = _cut(norm, keep_out, keep)
    shape = (*norm.normalized_shape[:-1], 3)
    assert pruned.normalized_shape == shape
    weight = None if norm.weight is None else norm.weight[..., keep]
    bias = None if norm.bias is None else norm.bias[..., keep]
    got = pruned(x[..., keep])
    assert_close(got, F.layer_norm(x[..., keep], shape, weight, bias, norm.eps), **TIGHT)
    _assert_ordinary(pruned, got)


def test_rms_norm_last_dim():
    _seeded()
    norm = _randomize(nn.RMSNorm(6, eps=1e-6)).double()
    keep, x = _idx(0, 4), torch.randn(3, 6, dtype=torch.float64)
    pruned = _cut(norm, keep_out, keep)
    assert pruned.normalized_shape == (2,)
    assert_close(pruned(x[:, keep]), F.rms_norm(x[:, keep], (2,), norm.weight[keep], 1e-6), **TIGHT)


def test_prelu_per_channel_and_shared():
    _seeded()
    prelu = _randomize(nn.PReLU(5)).double()
    pruned = _check_channelwise(prelu, _idx(1, 4), _image(2, 5))
    assert pruned.num_parameters == 2
    shared = _cut(nn.PReLU(), keep_out, _idx(0, 7))
    assert shared.num_parameters == 1 and shared.weight.shape == (1,)


def test_embedding_columns_and_padding_idx():
    _seeded()
    embedding = nn.Embedding(10, 6, padding_idx=0).double()
    tokens = torch.tensor([[0, 3, 9], [1, 1, 2]])
    pruned = _check_out(embedding, _idx(2, 3, 5), tokens, dim=-1)
    assert (pruned.num_embeddings, pruned.embedding_dim, pruned.padding_idx) == (10, 3, 0)
    bag = nn.EmbeddingBag(10, 6, mode="sum").double()
    _check_out(bag, _idx(0, 5), tokens, dim=-1)


# --------------------------------------------------------------- multi-head attention

def _attention(batch_first: bool, **kwargs) -> nn.MultiheadAttention:
    _seeded()
    mha = nn.MultiheadAttention(8, 4, batch_first=batch_first, **kwargs).double()
    with torch.no_grad():
        for param in mha.parameters():
            param.normal_()   # torch zero-initializes biases; random ones test the bias slicing
    return mha


def _sequences(batch_first: bool, length: int = 5, width: int = 8) -> torch.Tensor:
    x = torch.randn(3, length, width, dtype=torch.float64)
    return x if batch_first else x.transpose(0, 1)


def _without_heads(mha: nn.MultiheadAttention, heads: torch.Tensor) -> nn.MultiheadAttention:
    """The original attention with every head outside `heads` contributing nothing."""
    zeroed = copy.deepcopy(mha)
    removed = torch.ones(mha.num_heads, dtype=torch.bool)
    removed[heads] = False
    columns = removed.repeat_interleave(mha.head_dim)
    with torch.no_grad():
        zeroed.out_proj.weight[:, columns] = 0
    return zeroed


@pytest.mark.parametrize("batch_first", [True, False])
def test_keep_heads_equals_zeroed_heads(batch_first):
    mha = _attention(batch_first)
    heads = _idx(0, 2)
    reference, pruned = _without_heads(mha, heads), _cut(mha, keep_heads, heads)
    assert type(pruned) is PrunedMultiheadAttention and isinstance(pruned, nn.MultiheadAttention)
    assert (pruned.num_heads, pruned.embed_dim, pruned.out_proj.in_features) == (2, 8, 4)
    assert pruned.in_proj_weight.shape == (12, 8) and pruned.in_proj_bias.shape == (12,)
    x = _sequences(batch_first)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    for need_weights in (True, False):
        got, _ = pruned(x, x, x, key_padding_mask=padding, need_weights=need_weights)
        expected, _ = reference(x, x, x, key_padding_mask=padding, need_weights=need_weights)
        assert_close(got, expected, **TIGHT)
    _, weights = pruned(x, x, x, key_padding_mask=padding, average_attn_weights=False)
    _, all_weights = mha(x, x, x, key_padding_mask=padding, average_attn_weights=False)
    assert_close(weights, all_weights[:, heads], **TIGHT)
    _assert_ordinary(pruned, pruned(x, x, x)[0])


def test_keep_heads_cross_attention_with_kv_dims_and_bias_kv():
    mha = _attention(False, kdim=5, vdim=3, add_bias_kv=True, add_zero_attn=True)
    heads = _idx(1, 2, 3)
    pruned = _cut(mha, keep_heads, heads)
    assert pruned.q_proj_weight.shape == (6, 8) and pruned.k_proj_weight.shape == (6, 5)
    assert pruned.bias_k.shape == (1, 1, 6)
    query = torch.randn(4, 2, 8, dtype=torch.float64)
    key, value = torch.randn(6, 2, 5, dtype=torch.float64), torch.randn(6, 2, 3, dtype=torch.float64)
    causal = torch.triu(torch.ones(4, 6, dtype=torch.bool), diagonal=1)
    got, _ = pruned(query, key, value, attn_mask=causal)
    expected, _ = _without_heads(mha, heads)(query, key, value, attn_mask=causal)
    assert_close(got, expected, **TIGHT)


@pytest.mark.parametrize("options", [
    {}, {"bias": False}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 5, "vdim": 3},
])
@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_attention_forward_matches_torch(options, batch_first):
    """Keeping every head changes only the class: the forward must agree with torch's."""
    mha = _attention(batch_first, **options)
    pruned = _cut(mha, keep_heads, torch.arange(4))
    kdim, vdim = options.get("kdim", 8), options.get("vdim", 8)
    query = _sequences(batch_first, 5)
    key, value = _sequences(batch_first, 6, kdim), _sequences(batch_first, 6, vdim)
    padding = torch.rand(3, 6) < 0.3
    padding[:, 0] = False
    float_mask = torch.randn(5, 6, dtype=torch.float64)
    float_padding = torch.zeros(3, 6, dtype=torch.float64).masked_fill(padding, float("-inf"))
    causal = torch.triu(torch.ones(5, 6, dtype=torch.bool), diagonal=1)
    head_mask = torch.rand(3 * 4, 5, 6) < 0.3
    head_mask[..., 0] = False
    calls = [
        {}, {"key_padding_mask": padding}, {"attn_mask": float_mask, "key_padding_mask": float_padding},
        {"attn_mask": head_mask, "average_attn_weights": False},
        {"need_weights": False, "attn_mask": head_mask},
        {"attn_mask": causal, "is_causal": True, "need_weights": False},
        {"attn_mask": causal, "is_causal": True, "key_padding_mask": padding},
    ]
    for kwargs in calls:
        got, got_weights = pruned(query, key, value, **kwargs)
        expected, weights = mha(query, key, value, **kwargs)
        assert_close(got, expected, **TIGHT)
        assert (got_weights is None) == (weights is None)
        if weights is not None:
            assert_close(got_weights, weights, **TIGHT)
    unbatched = query[0] if batch_first else query[:, 0]
    k1, v1 = (key[0], value[0]) if batch_first else (key[:, 0], value[:, 0])
    for got, expected in zip(pruned(unbatched, k1, v1), mha(unbatched, k1, v1)):
        assert_close(got, expected, **TIGHT)


def test_attention_residual_in_and_out():
    mha = _attention(True)
    x = _sequences(True)
    keep = _idx(0, 1, 4, 6, 7)
    pruned = _cut(mha, keep_in, keep)
    assert (pruned.embed_dim, pruned.kdim, pruned.in_proj_weight.shape) == (5, 5, (24, 5))
    xk = x[..., keep]
    assert_close(pruned(xk, xk, xk)[0], mha(*[_zeroed(x, -1, keep)] * 3)[0], **TIGHT)
    pruned = _cut(mha, keep_out, keep)
    assert pruned.out_proj.out_features == 5
    assert_close(pruned(x, x, x)[0], mha(x, x, x)[0][..., keep], **TIGHT)


def test_pruned_attention_inside_transformer_layer_in_inference():
    """In eval and no_grad torch would take a fused path that assumes unpruned shapes."""
    _seeded()
    layer = nn.TransformerEncoderLayer(8, 4, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    heads = _idx(1, 3)
    reference = copy.deepcopy(layer)
    reference.self_attn = _without_heads(layer.self_attn, heads)
    keep_heads(layer.self_attn, heads)
    x = torch.randn(2, 5, 8)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 4] = True
    with torch.no_grad():
        got = layer(x, src_key_padding_mask=padding)
        expected = reference(x, src_key_padding_mask=padding)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_encoder_with_pruned_attention_runs_on_padded_batches():
    _seeded()
    layer = nn.TransformerEncoderLayer(8, 4, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    reference = copy.deepcopy(encoder)
    for pruned_layer, reference_layer in zip(encoder.layers, reference.layers):
        reference_layer.self_attn = _without_heads(pruned_layer.self_attn, _idx(0, 3))
        keep_heads(pruned_layer.self_attn, _idx(0, 3))
    assert turn_off_nested_tensors(encoder) == 1 and turn_off_nested_tensors(reference) == 0
    x = torch.randn(2, 5, 8)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 3:] = True
    with torch.no_grad():
        got = encoder(x, src_key_padding_mask=padding)
        reference.use_nested_tensor = False   # padded positions differ between the two paths
        expected = reference(x, src_key_padding_mask=padding)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_attention_subclass_is_refused():
    class Custom(nn.MultiheadAttention):
        pass

    with pytest.raises(IncompatibleLayer, match="Custom subclasses"):
        keep_heads(Custom(8, 2), _idx(0))


# ------------------------------------------------------------------------------ RNNs

_CANDIDATE_BLOCK = {"LSTM": 2, "GRU": 2, "RNN_TANH": 0, "RNN_RELU": 0}


def _silence_units(rnn: nn.RNNBase, layer: int, suffix: str, removed: torch.Tensor) -> None:
    """Make `removed` hidden units of one layer and direction exactly zero at every step.

    With zero initial state, a unit whose candidate rows (LSTM g, GRU n, plain RNN) have
    zero weights and biases stays zero: LSTM c = f*c + i*0 = 0 and h = o*tanh(0) = 0;
    GRU n = tanh(0 + r*0) = 0 and h = (1-z)*0 + z*0 = 0; RNN h = act(0) = 0.
    """
    hidden = getattr(rnn, f"weight_ih_l{layer}").shape[0] // {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)
    rows = _CANDIDATE_BLOCK[rnn.mode] * hidden + removed
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(rnn, f"{name}_l{layer}{suffix}")[rows] = 0


def _removed(size: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


def _states(output) -> tuple[torch.Tensor, ...]:
    out, state = output
    return (out, *state) if isinstance(state, tuple) else (out, state)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first", [False, True])
def test_keep_hidden_all_equals_silenced_units(kind, batch_first):
    _seeded()
    rnn = kind(3, 6, num_layers=3, bidirectional=True, batch_first=batch_first).double()
    keeps = [_idx(0, 2, 5), _idx(1, 3, 4), _idx(0, 1, 5)]
    keeps_reverse = [_idx(3, 4, 5), None, _idx(0, 2, 4)]
    reference = copy.deepcopy(rnn)
    resolved = [(k, k if r is None else r) for k, r in zip(keeps, keeps_reverse)]
    for layer, directions in enumerate(resolved):
        for suffix, keep in zip(("", "_reverse"), directions):
            _silence_units(reference, layer, suffix, _removed(6, keep))
    pruned = copy.deepcopy(rnn)
    keep_hidden_all(pruned, keeps, keeps_reverse)
    assert pruned.hidden_size == 3 and pruned.weight_hh_l2_reverse.shape[1] == 3
    assert repr(pruned).startswith(f"{kind.__name__}(3, 3, num_layers=3")
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    got, expected = _states(pruned(x)), _states(reference(x))
    last = rnn_output_features(6, *resolved[-1])
    assert_close(got[0], expected[0][..., last], **TIGHT)
    assert_close(expected[0][..., _removed(12, last)], torch.zeros_like(expected[0][..., :6]), **TIGHT)
    for got_state, state in zip(got[1:], expected[1:]):   # h_n (and c_n): (layers*2, batch, hidden)
        for slot in range(6):
            assert_close(got_state[slot], state[slot][:, resolved[slot // 2][slot % 2]], **TIGHT)
    _assert_ordinary(pruned, got[0])


def test_lstm_with_projection_cuts_cell_units_only():
    _seeded()
    rnn = nn.LSTM(3, 6, num_layers=2, proj_size=2).double()
    keeps = [_idx(0, 1, 4), _idx(2, 3, 5)]
    reference = copy.deepcopy(rnn)
    for layer, keep in enumerate(keeps):
        _silence_units(reference, layer, "", _removed(6, keep))
    pruned = copy.deepcopy(rnn)
    keep_hidden_all(pruned, keeps)
    assert (pruned.hidden_size, pruned.proj_size, pruned.weight_hr_l0.shape) == (3, 2, (2, 3))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    (out, (h, c)), (out_ref, (h_ref, c_ref)) = pruned(x), reference(x)
    assert_close(out, out_ref, **TIGHT)
    assert_close(h, h_ref, **TIGHT)
    for layer, keep in enumerate(keeps):
        assert_close(c[layer], c_ref[layer][:, keep], **TIGHT)


def test_keep_hidden_layer_by_layer_and_its_limits():
    _seeded()
    rnn = nn.GRU(3, 5, num_layers=2).double()
    keep_hidden(rnn, 0, _idx(0, 1, 3))
    assert rnn.hidden_size == 5           # layer 1 still has 5 units: not runnable yet
    with pytest.raises(IncompatibleLayer, match="layer 0 already has 3 hidden units"):
        keep_hidden(rnn, 1, _idx(0, 1))
    keep_hidden(rnn, 1, _idx(1, 2, 4))
    assert rnn.hidden_size == 3 and rnn.weight_ih_l1.shape == (9, 3)
    assert rnn(torch.randn(4, 2, 3, dtype=torch.float64))[0].shape == (4, 2, 3)
    with pytest.raises(IncompatibleLayer, match="same number of hidden units"):
        keep_hidden_all(nn.LSTM(3, 5, num_layers=2), [_idx(0, 1), _idx(0, 1, 2)])


def test_rnn_input_features():
    _seeded()
    rnn = nn.LSTM(5, 4, bidirectional=True, batch_first=True).double()
    keep = _idx(0, 2, 3)
    pruned = _cut(rnn, keep_in, keep)
    assert pruned.input_size == 3 and pruned.weight_ih_l0_reverse.shape == (16, 3)
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    assert_close(pruned(x[..., keep])[0], rnn(_zeroed(x, -1, keep))[0], **TIGHT)
    assert not supports(rnn, "out")


# ------------------------------------------------------------- free parameters, masks

def test_keep_param_dim_on_parameters_and_buffers():
    module = nn.Module()
    module.cls_token = nn.Parameter(torch.randn(1, 1, 6))
    module.register_buffer("position", torch.randn(1, 4, 6))
    keep = _idx(0, 3, 5)
    original = module.cls_token.detach().clone(), module.position.clone()
    keep_param_dim(module, "cls_token", -1, keep)
    keep_param_dim(module, "position", 2, keep)
    assert isinstance(module.cls_token, nn.Parameter) and "position" in module.state_dict()
    assert_close(module.cls_token, original[0][..., keep])
    assert_close(module.position, original[1][..., keep])
    with pytest.raises(InvalidArgument, match="no parameter or buffer named 'gamma'"):
        keep_param_dim(module, "gamma", 0, keep)
    with pytest.raises(InvalidArgument, match="dim 3 is out of range"):
        keep_param_dim(module, "cls_token", 3, keep)


def test_mask_buffer_follows_its_weight():
    _seeded()
    linear = nn.Linear(4, 3)
    mask = torch.rand(3, 4) > 0.5
    set_mask(linear, "weight", mask)
    keep_out(linear, _idx(0, 2))
    keep_in(linear, _idx(1, 3))
    assert torch.equal(getattr(linear, "weight" + MASK_SUFFIX), mask[[0, 2]][:, [1, 3]])


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("keep, message", [
    ([], "keep is empty"), ([0, 4], "index 4 is out of range for its 4 output features"),
    ([-1, 2], "index -1 is negative"), ([1, 1], "repeats index 1"),
    (torch.tensor([[0, 1]]), "1-D"), (torch.tensor([0.0, 1.0]), "integer indices"),
])
def test_bad_keep_raises_and_leaves_module_alone(keep, message):
    linear = nn.Linear(3, 4)
    before = copy.deepcopy(linear.state_dict())
    with pytest.raises(InvalidArgument, match=message) as info:
        keep_out(linear, keep)
    assert str(info.value).startswith("Linear:")
    assert linear.out_features == 4
    assert all(torch.equal(before[k], v) for k, v in linear.state_dict().items())


def test_bad_heads_hidden_and_roles():
    heads_message = "^MultiheadAttention: keep index 4 is out of range for its 4 heads"
    with pytest.raises(InvalidArgument, match=heads_message):
        keep_heads(nn.MultiheadAttention(8, 4), _idx(0, 4))
    with pytest.raises(InvalidArgument, match="layer must be an int in 0..1"):
        keep_hidden(nn.LSTM(3, 4, num_layers=2), 2, _idx(0))
    with pytest.raises(InvalidArgument, match="keep_reverse is only for bidirectional"):
        keep_hidden(nn.GRU(3, 4), 0, _idx(0), _idx(1))
    with pytest.raises(IncompatibleLayer, match="cannot remove output channels of ReLU"):
        keep_out(nn.ReLU(), _idx(0))
    with pytest.raises(InvalidArgument, match="role must be 'out' or 'in'"):
        supports(nn.Linear(2, 2), "sideways")


def test_lazy_and_parametrized_layers_are_refused():
    with pytest.raises(IncompatibleLayer, match="uninitialized"):
        keep_out(nn.LazyLinear(4), _idx(0))
    with pytest.raises(IncompatibleLayer, match="parametrization"):
        keep_out(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), _idx(0))


def test_registries_name_every_promised_layer():
    for cls in (nn.Linear, nn.Conv1d, nn.ConvTranspose3d, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm,
                nn.PReLU, nn.Embedding, nn.MultiheadAttention):
        assert cls in OUT_SURGERY
    assert nn.RNNBase in IN_SURGERY and nn.modules.batchnorm._NormBase in OUT_SURGERY


# ------------------------------------------------------------------------ properties

@st.composite
def _layer_and_keeps(draw):
    kind = draw(st.sampled_from(["linear", "conv", "transpose"]))
    groups = 1 if kind == "linear" else draw(st.sampled_from([1, 2, 3]))
    per_in, per_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    n_in, n_out = groups * per_in, groups * per_out
    kept_in = sorted(draw(st.sets(st.integers(0, per_in - 1), min_size=1)))
    kept_out = sorted(draw(st.sets(st.integers(0, per_out - 1), min_size=1)))
    # a different local choice in every group is fine as long as each keeps the same count
    shift_in, shift_out = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    keep_in_ = [g * per_in + (i + g * shift_in) % per_in for g in range(groups) for i in kept_in]
    keep_out_ = [g * per_out + (i + g * shift_out) % per_out for g in range(groups) for i in kept_out]
    return kind, groups, n_in, n_out, sorted(keep_in_), sorted(keep_out_), draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(_layer_and_keeps())
def test_random_linear_and_conv_shapes(case):
    kind, groups, n_in, n_out, kept_in, kept_out, seed = case
    torch.manual_seed(seed)
    if kind == "linear":
        layer, x = nn.Linear(n_in, n_out), torch.randn(3, n_in, dtype=torch.float64)
    else:
        cls = nn.Conv2d if kind == "conv" else nn.ConvTranspose2d
        layer = cls(n_in, n_out, 3, padding=1, groups=groups, bias=seed % 2 == 0)
        x = torch.randn(2, n_in, 4, 4, dtype=torch.float64)
    layer = layer.double()
    _check_out(layer, torch.tensor(kept_out), x)
    _check_in(layer, torch.tensor(kept_in), x)
