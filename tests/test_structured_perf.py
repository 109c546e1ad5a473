"""The fast paths of structured pruning: MACs from the graph, and a target search that cuts once."""
from __future__ import annotations

import copy

import pytest
import torch

import secateurs.structured as structured
from secateurs.structured import apply as structured_apply
from secateurs.structured import units as structured_units
from secateurs.criteria import Calibration, get_criterion
from secateurs.examples import zoo
from secateurs.graph import trace
from secateurs.measure import count_macs, count_parameters, graph_macs
from secateurs.structured import cut_shapes, prune_structured

GRAPH_COUNTED = ["resnet18", "densenet", "mobilenet_v2", "unet", "vit", "vit_sdpa", "grouped_conv", "gqa_attention"]


def build(name):
    model, inputs = zoo.ZOO[name]()
    return model.eval(), inputs


@pytest.mark.parametrize("name", GRAPH_COUNTED)
def test_graph_macs_equal_a_counted_forward(name):
    model, inputs = build(name)
    assert graph_macs(trace(model, inputs)) == count_macs(model, inputs)[0]


def test_cutting_nothing_leaves_every_shape():
    model, inputs = build("resnet18")
    analysis = structured_units.analyze_graph(trace(model, inputs))
    shapes = cut_shapes(analysis, [])
    assert shapes == {t.index: t.shape for t in analysis.graph.tensors}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vit", "gqa_attention", "unet"])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_estimated_costs_equal_the_pruned_model(name, ratio):
    model, inputs = build(name)
    scored = structured_units.score_model(model, inputs, get_criterion("l2"), Calibration(), structured.UNIT_KINDS, ())
    chosen = structured_units.select_units(scored, ratio, "global", None, None)
    macs = structured_apply.estimated_cost(scored, "macs", chosen)
    params = structured_apply.estimated_cost(scored, "params", chosen)
    plan = prune_structured(model, inputs, ratio, scope="global")
    assert macs == plan.macs_after == count_macs(model, inputs)[0] < scored.macs
    assert params == plan.params_after == count_parameters(model)[0] < scored.params


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("name,target", [("resnet18", "macs=0.4"), ("vit", "macs=0.3"),
                                         ("mobilenet_v2", "params=0.5"), ("lstm_classifier", "macs=0.5")])
def test_target_is_met_closely_and_equals_a_direct_prune_at_the_found_ratio(name, target, scope):
    model, inputs = build(name)
    fraction = float(target.partition("=")[2])
    direct = copy.deepcopy(model)
    plan = prune_structured(model, inputs, target=target, **({"scope": scope} if scope == "global" else {}))
    key = target.partition("=")[0]
    before, after = (plan.macs_before, plan.macs_after) if key == "macs" else (plan.params_before, plan.params_after)
    # one ratio for every group moves in coarser steps than a global ranking (a group of 8 by 1/8)
    assert fraction - (0.08 if scope == "local" else 0.05) <= after / before <= fraction
    direct_plan = prune_structured(direct, inputs, plan.ratio, scope=scope)
    assert direct_plan.keeps == plan.keeps
    with torch.no_grad():
        torch.testing.assert_close(direct(*inputs), model(*inputs), rtol=0, atol=0)


def test_target_search_traces_the_model_once(monkeypatch):
    model, inputs = build("resnet18")
    calls = []

    def counting_trace(*args, **kwargs):
        calls.append(1)
        return trace(*args, **kwargs)

    monkeypatch.setattr(structured_units, "trace", counting_trace)
    prune_structured(model, inputs, target="macs=0.5")
    assert len(calls) == 1


def test_plan_costs_before_are_the_dense_model_costs():
    model, inputs = build("vit")
    macs, params = count_macs(model, inputs)[0], count_parameters(model)[0]
    plan = prune_structured(model, inputs, 0.5)
    assert (plan.macs_before, plan.params_before) == (macs, params)
