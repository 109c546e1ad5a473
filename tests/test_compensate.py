"""Bias compensation after structured pruning: removed inputs leave their mean behind."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secateurs.compensate import compensate, snapshot
from secateurs.criteria import Calibration
from secateurs.errors import MissingData
from secateurs.structured import prune_structured


def _constant_units_mlp() -> nn.Sequential:
    """Hidden units 0-3 ignore the input (zero weights, positive bias): their output is a constant."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[:4] = 0.0
        model[0].bias[:4] = torch.tensor([0.5, 1.0, 1.5, 2.0])
        model[0].weight[4:] *= 10   # the useful units look important to magnitude
    return model.eval()


def test_constant_units_are_removed_exactly():
    model = _constant_units_mlp()
    x = torch.randn(64, 5)
    dense = model(x)
    snap = snapshot(model, Calibration([x]))
    plan = prune_structured(model, x, 0.5, method="l2")
    assert model[2].in_features == 4
    changed = compensate(model, snap, plan.keeps)
    assert changed == ["2"]
    torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-5)


def test_bias_is_created_when_missing_and_matches_hand_computation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4, bias=False)).eval()
    x = torch.randn(32, 6)
    hidden = torch.relu(model[0](x))
    weight = model[2].weight.detach().clone()
    snap = snapshot(model, Calibration([x]))
    plan = prune_structured(model, x, 0.3)
    kept = plan.keeps["2.weight:1"]
    removed = [j for j in range(10) if j not in kept]
    compensate(model, snap, plan.keeps)
    expected = weight[:, removed] @ hidden.mean(0)[removed]
    torch.testing.assert_close(model[2].bias.detach(), expected)


def test_compensation_brings_a_pruned_llama_closer():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, bos_token_id=0, eos_token_id=0)
    dense = transformers.LlamaForCausalLM(config).eval()
    batches = [{"input_ids": torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]
    reference = torch.cat([dense(**b).logits for b in batches])

    def error(compensated: bool) -> float:
        model = copy.deepcopy(dense)
        snap = snapshot(model, Calibration(batches))
        plan = prune_structured(model, batches[0], 0.5, scope="local", ignore=["*embed*"])
        if compensated:
            compensate(model, snap, plan.keeps)
        return (torch.cat([model(**b).logits for b in batches]) - reference).pow(2).mean().item()

    assert error(True) < 0.9 * error(False)


def test_compensated_llama_saves_for_plain_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from secateurs import hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    batch = {"input_ids": torch.randint(0, 64, (2, 10))}
    snap = snapshot(model, Calibration([batch]))
    plan = prune_structured(model, batch, 0.5, scope="local", ignore=["*embed*"])
    compensate(model, snap, plan.keeps)
    expected = model(**batch).logits
    assert hf.save_pretrained(model, tmp_path / "out") == "transformers"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.mlp_bias and loaded.config.attention_bias
    torch.testing.assert_close(loaded(**batch).logits, expected)


def test_prune_structured_compensates_and_the_saved_model_reloads(tmp_path):
    import secateurs as sc

    def build():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8, bias=False), nn.ReLU(),
                             nn.Linear(8, 3)).eval()

    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(4))
    dense = build()
    plain, fixed = build(), build()
    prune_structured(plain, x, 0.5)
    plan = prune_structured(fixed, x, 0.5, data=[x], compensate=True)
    assert plan.compensated == ["2", "4"] and plan.added_biases == ["2"]
    assert fixed[2].bias is not None and plan.params_after == sum(p.numel() for p in fixed.parameters())
    with torch.no_grad():
        assert (fixed(x) - dense(x)).pow(2).mean() < (plain(x) - dense(x)).pow(2).mean()
    sc.save(fixed, tmp_path / "saved", plan)
    fresh = sc.load(build(), tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), fixed(x), rtol=0, atol=0)


def test_prune_structured_compensation_needs_data():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(MissingData, match="compensate=True needs calibration data"):
        prune_structured(model, torch.randn(2, 4), 0.5, compensate=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_snapshot_needs_data():
    with pytest.raises(MissingData, match="calibration data"):
        snapshot(nn.Linear(2, 2), Calibration(None))
