"""Architectures the cut used to refuse, one small plain-torch model per refusal class.

Each either prunes (and computes what the dense model computes with the same channels
zeroed) or prunes partially, with `plan.frozen` and a warning naming the module, the
failing line and the remedy; a cut of nothing but broken groups is refused in one line.
"""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateurs.errors import IncompatibleLayer
from secateurs.graph.groups import analyze, table
from secateurs.structured import prune_structured
from secateurs.structured.apply import zero_removed

pytestmark = pytest.mark.usefixtures("one_thread")


def _prune(model: nn.Module, x: torch.Tensor, **options):
    """Prune `model` in place; the plan and the dense model with the plan's slices zeroed."""
    dense = copy.deepcopy(model)
    plan = prune_structured(model, x, **options)
    return plan, zero_removed(dense, plan.keeps)


def _same_output(model: nn.Module, zeroed: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model(x), zeroed(x), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- widths held in attributes
class Attention(nn.Module):
    """Fused q/k/v reshaped to (B, N, 3, heads, head_dim) by stored counts, out by `attn_dim`."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, dim // heads, dim
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.attn_dim))


class TinyViT(nn.Module):
    """torchvision's ViT in miniature: the patch embedding is reshaped with `self.hidden_dim`."""

    def __init__(self):
        super().__init__()
        self.hidden_dim, self.depth, self.spare_width = 32, 2, 32   # spare_width is never read
        self.patch = nn.Conv2d(3, 32, 4, 4)
        self.blocks = nn.Sequential(*[Attention() for _ in range(2)])
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.patch(x).reshape(x.shape[0], self.hidden_dim, -1).permute(0, 2, 1)
        x = self.blocks(x)
        return self.head((x + self.mlp(x)).mean(1))


def test_widths_read_from_attributes_are_found_by_rehearsal_and_cut():
    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.randn(2, 3, 16, 16)
    plan, zeroed = _prune(model, x, ratio=0.5)
    assert plan.frozen == []
    assert plan.attributes[""] == {"hidden_dim": 16}
    for name in ("blocks.0", "blocks.1"):
        assert plan.attributes[name] == {"num_heads": 2, "attn_dim": 16}
    # only what the forward reads changes: the unread width and the depth stay
    assert model.spare_width == 32 and model.depth == 2 and model.blocks[0].head_dim == 8
    assert model.blocks[0].qkv.out_features == 48 and model.patch.out_channels == 16
    _same_output(model, zeroed, x)


# ---------------------------------------------------------------- window attention, bias tables
class WindowAttention(nn.Module):
    """Swin-style (as timm writes it): w*w-token windows, a per-head relative-position bias table,
    softmax by hand, the head width left to the reshape (-1)."""

    def __init__(self, dim: int = 16, heads: int = 4, window: int = 2):
        super().__init__()
        self.num_heads, self.window = heads, window
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        grid = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (grid[:, :, None] - grid[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", relative[..., 0] * (2 * window - 1) + relative[..., 1], persistent=False)

    def forward(self, x):                                    # x: (B, H, W, C)
        b, h, w, c = x.shape
        s = self.window
        x = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        windows, n, _ = x.shape
        qkv = self.qkv(x).reshape(windows, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attention = ((q @ k.transpose(-2, -1)) + bias.unsqueeze(0)).softmax(-1)
        x = self.proj((attention @ v).transpose(1, 2).reshape(windows, n, -1))
        return x.view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class TinySwin(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 2, 2)
        self.blocks = nn.ModuleList([WindowAttention() for _ in range(2)])
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.patch(x).permute(0, 2, 3, 1)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((1, 2)))


def test_window_attention_loses_whole_heads_and_their_bias_table_columns():
    torch.manual_seed(0)
    model, x = TinySwin().eval(), torch.randn(2, 3, 8, 8)
    heads = [g for g in analyze(model, x).groups if g.kind == "head"]
    assert [sorted(n for n, _ in g.members if n.endswith("table")) for g in heads] == \
        [["blocks.0.table"], ["blocks.1.table"]]
    plan, zeroed = _prune(model, x, ratio=0.5, units=("head",))
    assert plan.frozen == []
    for block in model.blocks:
        assert block.num_heads == 2 and block.table.shape == (9, 2) and block.qkv.out_features == 24
    _same_output(model, zeroed, x)


# ---------------------------------------------------------------- split sizes held in a list
class CrossStage(nn.Module):
    """CSP: the stem is split by a stored list of sizes, one part goes through a conv, then concat."""

    def __init__(self):
        super().__init__()
        self.sizes = [8, 8]
        self.stem, self.block = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fuse, self.head = nn.Conv2d(16, 16, 1), nn.Linear(16, 5)

    def forward(self, x):
        a, b = self.stem(x).split(self.sizes, dim=1)
        x = self.fuse(torch.cat([a, torch.relu(self.block(b))], 1))
        return self.head(x.mean((2, 3)))


def test_split_sizes_read_from_a_list_follow_the_cut():
    torch.manual_seed(0)
    model, x = CrossStage().eval(), torch.randn(2, 3, 8, 8)
    plan, zeroed = _prune(model, x, ratio=0.5)
    assert plan.frozen == [] and plan.attributes[""] == {"sizes": [4, 4]}
    assert model.stem.out_channels == 8 and model.fuse.in_channels == 8
    _same_output(model, zeroed, x)


# ---------------------------------------------------------------- token-mixing MLP
class Mixer(nn.Module):
    """MLP-Mixer: one MLP across the tokens (its input width is the token count), one across channels."""

    def __init__(self, tokens: int = 16, dim: int = 12):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, 2)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 24), nn.GELU(), nn.Linear(24, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 24), nn.GELU(), nn.Linear(24, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.token_mlp(x.transpose(1, 2)).transpose(1, 2)
        return self.head((x + self.channel_mlp(x)).mean(1))


def test_token_mixing_mlp_keeps_the_token_axis():
    torch.manual_seed(0)
    model, x = Mixer().eval(), torch.randn(2, 3, 8, 8)
    plan, zeroed = _prune(model, x, ratio=0.5)
    assert model.token_mlp[0].in_features == 16 and model.token_mlp[2].out_features == 16
    assert model.token_mlp[0].out_features == 12 and model.channel_mlp[0].out_features == 12
    _same_output(model, zeroed, x)


class TokensOnly(Mixer):
    """The token MLP straight on the patch grid: its input width is the conv's height x width."""

    def forward(self, x):
        x = self.token_mlp(self.patch(x).flatten(2))
        return self.head(x.sum(2))     # a mean over the cut outputs would differ from zeroing them


def test_conv_positions_flattened_into_tokens_are_never_cut():
    model, x = TokensOnly().eval(), torch.randn(2, 3, 8, 8)
    token_inputs = [g for g in analyze(model, x).groups if ("token_mlp.0.weight", 1) in g.members]
    assert token_inputs and not token_inputs[0].prunable_units
    plan, zeroed = _prune(model, x, ratio=0.5)
    assert plan.frozen == [] and model.token_mlp[0].in_features == 16 and model.token_mlp[0].out_features == 12
    _same_output(model, zeroed, x)


# ---------------------------------------------------------------- partial cuts
class HardCodedChunks(nn.Module):
    """Res2Net-like chunks of a width written in the code: the stem's group cannot be cut, the rest can."""

    def __init__(self):
        super().__init__()
        self.stem, self.mix = nn.Conv2d(3, 16, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.fuse = nn.Conv2d(16, 32, 1)
        self.mlp = nn.Sequential(nn.Conv2d(32, 64, 1), nn.ReLU(), nn.Conv2d(64, 32, 1))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        a, b, c, d = torch.split(self.stem(x), 4, 1)
        x = self.fuse(torch.cat([a, self.mix(a) + b, c, d], 1))
        return self.head((x + self.mlp(x)).mean((2, 3)))


def test_a_breaking_group_is_frozen_named_and_the_rest_is_cut():
    torch.manual_seed(0)
    model, x = HardCodedChunks().eval(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"(?s)kept whole.*test_coverage.py:\d+ `a, b, c, d = torch.split"):
        plan, zeroed = _prune(model, x, ratio=0.5)
    assert len(plan.frozen) == 1
    frozen = plan.frozen[0]
    assert "stem.weight:0" in frozen["members"] and "ignore=" in frozen["remedy"]
    assert re.search(r"not enough values to unpack \(expected 4, got \d\)", frozen["error"])
    assert model.stem.out_channels == 16 and model.mlp[0].out_channels == 32 and model.fuse.out_channels == 16
    _same_output(model, zeroed, x)


def test_a_target_gets_as_close_as_the_free_groups_allow_and_says_how_close():
    torch.manual_seed(0)
    model, x = HardCodedChunks().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, zeroed = _prune(model, x, target="macs=0.05")
    messages = [str(w.message) for w in caught]
    assert any("target macs=0.05 not reached" in m for m in messages)
    assert plan.frozen and plan.budget["reached"] == pytest.approx(plan.macs_after / plan.macs_before)
    assert 0.05 < plan.budget["reached"] < 0.5 and "frozen" in plan.budget["note"]
    _same_output(model, zeroed, x)


class LiteralHeads(nn.Module):
    """Attention between the model's input and output whose head split is written in the code."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(2, 6, 3, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 6, 16))


def test_nothing_but_broken_groups_is_refused_in_one_line_with_module_op_and_remedy():
    model, x = LiteralHeads().eval(), torch.randn(2, 6, 16)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(IncompatibleLayer) as error:
        prune_structured(model, x, ratio=0.5)
    message = str(error.value)
    assert "\n" not in message and "would break this model" in message and "left unchanged" in message
    assert "reshape(2, 6, 3, 4, 4)" in message and "shape '[2, 6, 3, 4, 4]' is invalid" in message
    assert 'units=("channel",)' in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- analysis
def test_analysis_table_hides_kernel_axes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    analysis = analyze(model, torch.randn(1, 3, 9, 9))
    text = table(analysis)
    assert "kernel dim" not in text and "4 kernel / table-row axes hidden" in text
    row = next(line for line in text.splitlines() if re.match(r"0\s+channel\s+8\s+8\s", line))
    assert all(member in row for member in ("0.weight[0]", "0.bias[0]", "2.weight[1]"))
    assert "kernel dim" in table(analysis, every_axis=True)


def test_found_attributes_are_replayed_on_a_fresh_model():
    from secateurs.structured.plan import replay
    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.randn(2, 3, 16, 16)
    plan = prune_structured(model, x, ratio=0.5)
    fresh = replay(TinyViT().eval(), plan.to_dict())
    assert fresh.hidden_dim == 16 and fresh.blocks[1].attn_dim == 16
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


class UnevenSplit(nn.Module):
    """A split by a stored list whose equal sizes are cut unequally: the second part meets a
    grouped convolution (kept whole), the first is cut."""

    def __init__(self):
        super().__init__()
        self.sizes = [8, 8]
        self.stem, self.grouped = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fuse, self.head = nn.Conv2d(16, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        a, b = self.stem(x).split(self.sizes, dim=1)
        return self.head(self.fuse(torch.cat([a, self.grouped(b)], 1)).mean((2, 3)))


def test_split_sizes_follow_each_part_not_just_the_value():
    torch.manual_seed(0)
    model, x = UnevenSplit().eval(), torch.randn(2, 3, 8, 8)
    plan, zeroed = _prune(model, x, ratio=0.25)     # the cut falls in the first part only
    assert plan.frozen == [] and model.sizes[1] == 8 and 0 < model.sizes[0] < 8
    assert sum(model.sizes) == model.stem.out_channels
    _same_output(model, zeroed, x)
