"""Which layers get pruned."""
from __future__ import annotations

import pytest
from torch import nn

import secateurs as sc
from secateurs.errors import InvalidArgument
from tests.conftest import tiny_cnn


def names(targets):
    return [t.name for t in targets]


def test_default_leaves_the_head_and_embeddings_alone():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert names(sc.select_targets(model)) == ["1.weight"]
    assert names(sc.select_targets(model, prune_last=True)) == ["1.weight", "3.weight"]
    assert names(sc.select_targets(model, types=["embedding", "linear"])) == ["0.weight", "1.weight"]


def test_include_and_ignore_globs():
    model = tiny_cnn()
    assert names(sc.select_targets(model, include=["conv*"])) == ["conv1.weight", "conv2.weight"]
    assert names(sc.select_targets(model, ignore=["conv1"])) == ["conv2.weight", "fc1.weight"]
    assert names(sc.select_targets(model, include=["head"])) == ["head.weight"]  # named explicitly


def test_types_by_class_and_name():
    model = tiny_cnn()
    assert names(sc.select_targets(model, types=[nn.Linear])) == ["fc1.weight"]
    assert names(sc.select_targets(model, types=["conv2d"])) == ["conv1.weight", "conv2.weight"]
    with pytest.raises(InvalidArgument, match="unknown layer type 'dense'"):
        sc.select_targets(model, types=["dense"])


def test_attention_and_recurrent_weights_are_selectable():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.lstm = nn.LSTM(8, 8, num_layers=2, bidirectional=True)
            self.head = nn.Linear(16, 2)

    found = names(sc.select_targets(Net()))
    assert "attn.in_proj_weight" in found and "attn.out_proj.weight" in found
    assert "lstm.weight_ih_l1_reverse" in found and "lstm.weight_hh_l0" in found
    assert "head.weight" not in found


def test_tied_weights_are_selected_once():
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(8, 8), head)
    found = names(sc.select_targets(model, types=["embedding", "linear"], prune_last=True))
    assert found == ["0.weight", "1.weight"]


def test_empty_selection_is_an_error():
    with pytest.raises(InvalidArgument, match="no layer matches"):
        sc.prune(tiny_cnn(), "l1", 0.5, include=["nothing*"])
