"""The structured engine is device-independent: a model on another device is analysed like its CPU twin.

No GPU runs here, so the meta device stands in for one: its tensors have shapes and dtypes
but no data, like a CUDA model seen from a machine that cannot run it. The tracer and the
rehearsal run every model on CPU fakes, so the graph cannot depend on where the weights live.
"""
from __future__ import annotations

import pytest
import torch

from secateurs import latency
from secateurs.examples import zoo
from secateurs.graph import rules
from secateurs.graph.groups import analyze
from secateurs.graph.trace import trace


def _signature(analysis):
    return [(g.kind, g.size, tuple(g.prunable), tuple(g.members), g.reason) for g in analysis.groups]


def _to(inputs, device):
    return tuple(t.to(device) for t in inputs) if isinstance(inputs, tuple) else inputs.to(device)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vit", "gqa_attention", "lstm_classifier"])
def test_a_model_on_another_device_is_analysed_like_its_cpu_twin(name):
    model, inputs = zoo.ZOO[name]()
    model.eval()
    on_cpu = analyze(model, inputs)
    elsewhere = analyze(model.to("meta"), _to(inputs, "meta"))
    assert _signature(elsewhere) == _signature(on_cpu)
    assert [op.name for op in trace(model, _to(inputs, "meta")).ops] == [op.name for op in on_cpu.graph.ops]


def test_half_precision_traces_like_float():
    model, inputs = zoo.ZOO["resnet18"]()
    model.eval()
    dense = _signature(analyze(model, inputs))
    assert _signature(analyze(model.half(), _to(inputs, torch.float16))) == dense


def test_device_specific_kernels_follow_their_cpu_rules():
    # a model that can only be traced for real on a GPU shows cuDNN's batch norm and fused attention
    assert rules.RULES["cudnn_batch_norm"] is rules.RULES["native_batch_norm"]
    assert rules.RULES["miopen_batch_norm"] is rules.RULES["native_batch_norm"]
    for name in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention"):
        assert rules.RULES[name] is rules.RULES["_scaled_dot_product_flash_attention_for_cpu"]


def test_latency_tables_are_kept_per_device():
    model, inputs = zoo.ZOO["resnet18"]()
    graph = trace(model.eval(), inputs)
    keys = {latency._structure_key(graph, 1, torch.device(d)) for d in ("cpu", "meta")}
    assert len(keys) == 2
