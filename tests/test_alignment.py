"""Kept widths the hardware likes: every kept width a multiple of round_to, whole heads, head_dim kept."""
from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from secateurs import load, run as runner
from secateurs.examples import zoo
from secateurs.structured import prune_structured
from secateurs.structured.units import removal_count

ROUND_TO = 8


class Wide(nn.Module):
    """Channel groups of 64 and 48, one of 20 (not a multiple of 8) and one of 8 (as small as round_to)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 64, 3, padding=1)
        self.b = nn.Conv2d(64, 48, 3, padding=1)
        self.c = nn.Conv2d(48, 20, 3, padding=1)
        self.d = nn.Conv2d(20, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        for conv in (self.a, self.b, self.c, self.d):
            x = torch.relu(conv(x))
        return self.head(x.mean((2, 3)))


def wide():
    torch.manual_seed(0)
    return Wide().eval(), (torch.randn(2, 3, 8, 8),)


def _out_widths(model):
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("options", [
    {"ratio": 0.3}, {"ratio": 0.45, "scope": "global"}, {"target": "macs=0.5"}, {"target": "params=0.6"},
    {"ratio": {"b.*": 0.5, "a.*": 0.3}},
])
def test_every_kept_width_is_a_multiple_of_round_to(options):
    model, x = wide()
    plan = prune_structured(model, x, round_to=ROUND_TO, **options)
    widths = _out_widths(model)
    assert widths["c"] == 20 and widths["d"] == 8, "groups not aligned before, or as small as round_to, are kept"
    assert widths["a"] % ROUND_TO == 0 and widths["b"] % ROUND_TO == 0
    assert widths["a"] < 64 or widths["b"] < 48, "something was cut"
    assert plan.macs_after < plan.macs_before


def test_without_round_to_widths_are_free():
    model, x = wide()
    prune_structured(model, x, ratio=0.3)
    widths = _out_widths(model)
    assert widths["a"] == 64 - int(0.3 * 64) and widths["c"] == 20 - int(0.3 * 20)


def test_rounding_keeps_more_never_fewer():
    # 64 units, 30% asked: 19 removed without rounding; 45 kept is rounded up to 48
    assert removal_count(64, list(range(64)), 0.3, 1) == 19
    assert removal_count(64, list(range(64)), 0.3, 8) == 16
    assert removal_count(64, list(range(64)), 0.99, 8) == 56   # never all: at least one quantum kept
    assert removal_count(20, list(range(20)), 0.5, 0) == 0      # quantum 0: the group is left whole


@pytest.mark.parametrize("name", ["vit", "vit_sdpa", "gqa_attention"])
def test_attention_loses_whole_heads_and_keeps_head_dim(name):
    model, x = zoo.ZOO[name]()
    model.eval()
    before = {n: p.shape for n, p in model.named_parameters()}
    plan = prune_structured(model, x, target="macs=0.5", round_to=4)
    heads = [g for g in plan.groups if g.kind == "head" and g.removed]
    assert heads, "some heads were removed"
    for n, p in model.named_parameters():
        if p.dim() == 2 and any(k in n for k in ("q_proj", "k_proj", "v_proj", "qkv", "in_proj")):
            # rows are a whole number of heads of the original head_dim
            head_dim = {"vit": 8, "vit_sdpa": 8, "gqa_attention": 8}[name]
            assert p.shape[0] % head_dim == 0 and p.shape[0] <= before[n][0]
    with torch.no_grad():
        model(*x)


def test_recipe_round_to_reaches_the_cut(tmp_path):
    model, x = wide()
    source = textwrap.dedent('''
        import torch
        from tests.test_alignment import Wide


        def build():
            torch.manual_seed(0)
            return Wide()
    ''')
    (tmp_path / "aligned_factory.py").write_text(source)
    save_file(model.state_dict(), str(tmp_path / "dense.safetensors"))
    g = torch.Generator().manual_seed(0)
    save_file({"inputs": torch.randn(16, 3, 8, 8, generator=g), "targets": torch.randint(0, 5, (16,), generator=g)},
              str(tmp_path / "calib.safetensors"))
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent('''
        model: {factory: "aligned_factory:build", weights: dense.safetensors}
        data: {calibration: calib.safetensors, batch_size: 8}
        stages:
          - prune: {structured: true, target: macs=0.5, round_to: 8}
          - save: {}
    '''))
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        result = runner.run_recipe(tmp_path / "recipe.yaml", tmp_path / "run")
    finally:
        sys.path.remove(str(tmp_path))
    loaded = load(Wide(), result.out_dir / "model")   # the plan replayed: the widths the recipe cut
    widths = _out_widths(loaded)
    assert widths["a"] % ROUND_TO == 0 and widths["b"] % ROUND_TO == 0 and widths["c"] == 20
    assert widths["a"] < 64 or widths["b"] < 48


def test_auto_alignment_follows_device_and_dtype(monkeypatch):
    from secateurs.structured import options

    assert options.ALIGNMENT[("cuda", "half")] == 8 and options.ALIGNMENT[("cuda", "float32")] == 4
    model, _ = wide()
    assert options.resolve_round_to("auto", model) is None                 # CPU fp32: widths stay free
    assert options.resolve_round_to(4, model) == 4 and options.resolve_round_to(None, model) is None
    # the rule reads the parameters' device type and dtype (a CPU half model stands in for a GPU one)
    monkeypatch.setitem(options.ALIGNMENT, ("cpu", "half"), 8)
    assert options.resolve_round_to("auto", model.half()) == 8
    assert options.resolve_round_to("auto", model.to(torch.bfloat16)) == 8


def test_auto_alignment_cuts_a_half_precision_model_to_multiples_of_8(monkeypatch):
    from secateurs.structured import options

    monkeypatch.setitem(options.ALIGNMENT, ("cpu", "half"), 8)
    model, x = wide()
    model = model.to(torch.bfloat16)
    prune_structured(model, tuple(t.to(torch.bfloat16) for t in x), target="macs=0.5")
    widths = _out_widths(model)
    assert widths["a"] % 8 == 0 and widths["b"] % 8 == 0 and widths["c"] == 20


def test_round_to_must_be_a_positive_integer_or_auto():
    from secateurs.errors import InvalidArgument

    model, x = wide()
    for bad in (0, -8, 2.5, "eight", True):
        with pytest.raises(InvalidArgument, match="round_to must be"):
            prune_structured(model, x, ratio=0.3, round_to=bad)


def test_a_target_with_local_scope_cuts_every_group_by_one_ratio():
    model, x = wide()
    plan = prune_structured(model, x, target="macs=0.5", scope="local", round_to=None)
    removed = {g.index: len(g.removed) for g in plan.groups}
    assert removed == {g.index: int(plan.ratio * g.units) for g in plan.groups}   # one ratio everywhere
    assert all(removed.values())
    assert plan.macs_after <= 0.5 * plan.macs_before
    global_model, _ = wide()
    global_plan = prune_structured(global_model, x, target="macs=0.5", round_to=None)
    assert global_plan.macs_after <= 0.5 * global_plan.macs_before
