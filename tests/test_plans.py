"""Every verb's plan shares one small base: to_dict, save, a one-screen str and a rich table."""
from __future__ import annotations

import json

import torch
from rich.console import Console
from torch import nn

import secateurs as sc
from secateurs.blocks import prune_blocks
from secateurs.examples import zoo
from secateurs.llm import LLMConfig, prune_llm
from secateurs.plans import PlanRecord


def _plans():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    yield sc.prune(mlp, "magnitude", 0.5)
    model, x = zoo.ZOO["resnet18"]()
    yield sc.prune_structured(model.eval(), x, target="macs=0.5")
    model, x = zoo.ZOO["resnet18"]()
    yield prune_blocks(model.eval(), x, 1)
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    llama = transformers.LlamaForCausalLM(config).eval()
    yield prune_llm(llama, [torch.randint(0, 64, (1, 8))], LLMConfig(method="magnitude", sparsity=0.5))


def test_every_plan_prints_one_screen_saves_and_renders(tmp_path):
    kinds = set()
    for plan in _plans():
        assert isinstance(plan, PlanRecord)
        kinds.add(type(plan).__name__)
        text = str(plan)
        assert text.splitlines()[0] == type(plan).__name__ and 2 <= len(text.splitlines()) <= 15
        assert max(len(line) for line in text.splitlines()) <= 100
        path = plan.save(tmp_path / f"{type(plan).__name__}.json")
        assert json.loads(path.read_text()) == json.loads(json.dumps(plan.to_dict(), default=str))
        console = Console(width=100, record=True)
        console.print(plan)
        assert type(plan).__name__ in console.export_text()
    assert kinds == {"Plan", "StructuredPlan", "BlockPlan", "LLMPlan"}
