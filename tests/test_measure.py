"""Parameters, MACs (functional attention included), bytes and latency."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs as sc
from secateurs.io import dense_bytes, sparse_bytes
from secateurs.measure import count_macs, count_parameters, latency_ms, nonzero_macs
from tests.conftest import tiny_cnn


def test_macs_of_linear_and_conv_match_the_formulas():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=4), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    macs, per_module = count_macs(model, torch.randn(2, 3, 8, 8))
    conv1 = 2 * 8 * 8 * 8 * 3 * 9
    grouped = 2 * 6 * 6 * 8 * (8 // 4) * 9
    linear = 2 * 8 * 6 * 6 * 5
    assert per_module["0"] == conv1 and per_module["1"] == grouped and per_module["3"] == linear
    assert macs == conv1 + grouped + linear


class FunctionalAttention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.qkv, self.heads = nn.Linear(dim, 3 * dim), heads

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return attended.transpose(1, 2).reshape(b, n, d) @ x.transpose(1, 2)


def test_functional_sdpa_and_matmul_are_counted():
    b, n, d, h = 2, 10, 16, 2
    macs, _ = count_macs(FunctionalAttention(d, h), torch.randn(b, n, d))
    projection = b * n * d * 3 * d
    attention = 2 * b * h * n * n * (d // h)  # QK^T and AV
    matmul = b * n * d * n
    assert macs == projection + attention + matmul


@pytest.mark.parametrize("grad", [False, True])
def test_multihead_attention_module_is_counted_on_both_paths(grad):
    b, n, d, h = 2, 6, 8, 2
    mha = nn.MultiheadAttention(d, h, batch_first=True).eval()
    x = torch.randn(b, n, d, requires_grad=grad)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    macs, _ = count_macs(Wrap(), x)
    expected = b * n * d * 3 * d + 2 * b * h * n * n * (d // h) + b * n * d * d
    assert macs == expected


def test_parameters_count_tied_weights_once_and_nonzeros_follow_pruning():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert count_parameters(nn.Sequential(emb, head)) == (40, 40)
    model = tiny_cnn()
    total, nonzero = count_parameters(model)  # BatchNorm biases start at zero
    plan = sc.prune(model, "l1", 0.5)
    assert count_parameters(model) == (total, nonzero - sum(l.zeros for l in plan.layers))


def test_nonzero_macs_scale_with_density():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(3, 32)
    macs, per_module = count_macs(model, x)
    sc.prune(model, "l1", 0.75)
    assert nonzero_macs(model, per_module, macs) == macs - round(per_module["0"] * 0.75)


def test_sparse_size_shrinks_with_sparsity_and_dense_size_does_not():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 4))
    dense = dense_bytes(model)
    assert sparse_bytes(model) <= dense + 200  # dense tensors stay dense (small header)
    sc.prune(model, "l1", 0.8)
    assert dense_bytes(model) == dense
    expected = 256 * 256 * (0.2 * 4 + 1 / 8)  # values + 1-bit mask for the pruned layer
    assert sparse_bytes(model) < dense * 0.5
    assert sparse_bytes(model) == pytest.approx(expected + (dense - 256 * 256 * 4), rel=0.02)


def test_latency_is_positive_and_restores_thread_count():
    before = torch.get_num_threads()
    ms = latency_ms(tiny_cnn(), torch.randn(1, 4, 4, 4), threads=1, warmup=1, repeats=3)
    assert ms > 0
    assert torch.get_num_threads() == before


def test_measure_reports_every_field():
    m = sc.measure(tiny_cnn(), torch.randn(1, 4, 4, 4), repeats=3, evaluate=lambda model: 0.5)
    d = m.to_dict()
    for key in ("params", "nonzeros", "macs", "nonzero_macs", "size_bytes", "dense_size_bytes", "latency_ms", "threads"):
        assert d[key] > 0
    assert d["accuracy"] == 0.5 and d["macs"] == d["nonzero_macs"]
