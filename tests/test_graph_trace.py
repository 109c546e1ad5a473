"""The op graph recorder: fake execution, parameters, versions, outputs, fallback."""
from __future__ import annotations

import torch
from torch import nn

from secateurs.graph import trace
from tests.conftest import tiny_cnn


def ops_named(graph, fragment):
    return [op for op in graph.ops if fragment in op.name]


def test_records_convs_and_their_parameters_without_real_compute():
    graph = trace(tiny_cnn(), torch.randn(2, 4, 4, 4))
    assert graph.fake
    convs = ops_named(graph, "convolution")
    assert [op.module for op in convs] == ["conv1", "conv2"]
    assert convs[0].inputs[1] == graph.parameters["conv1.weight"]
    assert graph.tensors[graph.outputs[0]].shape == (2, 10)
    assert set(graph.parameters) == {n for n, _ in tiny_cnn().named_parameters()}


def test_in_place_ops_make_new_versions():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            y.add_(1.0)
            return y.relu_()

    graph = trace(InPlace(), torch.randn(3, 4))
    add, relu = ops_named(graph, "add_")[0], ops_named(graph, "relu_")[0]
    assert relu.inputs[0] == add.outputs[0] != add.inputs[0]
    assert graph.outputs == relu.outputs


def test_dict_outputs_and_keyword_inputs():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask=None):
            h = self.fc(self.emb(input_ids)) * attention_mask.unsqueeze(-1)
            return {"last_hidden_state": h, "pooled": h.mean(1)}

    graph = trace(Encoder(), {"input_ids": torch.randint(0, 10, (2, 5)), "attention_mask": torch.ones(2, 5)})
    assert sorted(graph.tensors[i].shape for i in graph.outputs) == [(2, 5, 8), (2, 8)]
    assert [t.name for t in graph.tensors if t.kind == "input"] == ["input[0]", "input[1]"]


def test_data_dependent_control_flow_falls_back_to_real_tensors():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > -1e9 else self.b(x)

    graph = trace(Branchy(), torch.randn(2, 4))
    assert not graph.fake
    assert {op.module for op in ops_named(graph, "addmm")} == {"a"}


def test_tied_parameters_share_one_node_and_training_mode_is_restored():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head).train()
    graph = trace(model, torch.randint(0, 10, (2, 3)))
    assert model.training
    assert graph.parameters["0.weight"] == graph.parameters["1.weight"]
