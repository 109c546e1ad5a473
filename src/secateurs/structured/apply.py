"""Carry out a chosen cut: rehearse it, cut the model, count what is left, record the plan."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import IncompatibleLayer
from ..graph.groups import Analysis
from ..graph.trace import Graph, _leaves, _split_inputs
from ..measure import (
    graph_bytes,
    graph_macs,
    graph_params,
    macs_and_output,
    total_parameters,
)
from .cut import apply_cut
from .plan import GroupPlan, StructuredPlan
from .rehearse import Rehearsal, Verdict, describe_frozen, refusal
from .units import Scored, cut_mask, keeps_of, removed_ids


def output_shapes(graph) -> list[tuple[int, ...]]:
    return [graph.tensors[i].shape for i in graph.outputs]


def cut_model(model: nn.Module, example_inputs: Any, scored: Scored, chosen: dict[int, list[int]],
         method: str, ratio: float | dict[str, float], check: bool = True,
         verdict: Verdict | None = None) -> StructuredPlan:
    """Remove the chosen units from `model`, check its output shapes, and return the plan.

    With `check`, the cut is first rehearsed on a copy without data (`Rehearsal.settle`,
    or the `verdict` it already gave): width attributes the cut needs are found, and a
    group the cut would break is frozen (kept whole, recorded in `plan.frozen`, warned
    about) while the rest is cut. Nothing to cut but broken groups is refused.
    """
    if check and verdict is None and any(chosen.values()):
        verdict = Rehearsal(model, example_inputs, scored).settle(chosen)
    if verdict is not None:
        if verdict.frozen and not verdict.chosen:
            raise refusal(verdict.frozen)
        if verdict.frozen:
            warnings.warn("secateurs: some groups were kept whole because cutting them would break the model:\n"
                          + describe_frozen(verdict.frozen), stacklevel=3)
        chosen = {gi: p for gi, p in chosen.items() if gi in verdict.chosen}
    by_index = {g.index: g for g in scored.groups}
    keeps = keeps_of(scored.analysis, by_index, chosen)
    heads = [(by_index[gi], len(p)) for gi, p in chosen.items() if p and by_index[gi].kind == "head"]
    shapes = output_shapes(scored.graph)
    attributes = apply_cut(model, keeps, heads)
    for module_name, changes in (verdict.attributes if verdict is not None else {}).items():
        owner = model.get_submodule(module_name) if module_name else model
        for name, value in changes.items():
            setattr(owner, name, value)
            attributes.setdefault(module_name, {})[name] = value
    if check and scored.graph.fake and graph_macs(scored.graph) is not None:
        # the rehearsal checked the output shapes; the graph gives the MACs of the cut widths
        macs = estimated_cost(scored, "macs", chosen)
    else:
        # one real forward, fed and read as the tracer does, checks the output shapes and
        # counts the MACs (an RNN run as one op needs it): cheaper than tracing again
        args, kwargs = _split_inputs(model, example_inputs)
        macs, output = macs_and_output(model, lambda: model(*args, **kwargs))
        after = [tuple(v.shape) for v in _leaves(output) if isinstance(v, torch.Tensor)]
        if after != shapes:
            raise IncompatibleLayer(f"pruning changed the output shapes {shapes} -> {after}; please report this model")
    plan = StructuredPlan(method, dict(ratio) if isinstance(ratio, dict) else float(ratio),
                          params_before=scored.params, macs_before=scored.macs,
                          keeps={f"{n}:{d}": k.tolist() for (n, d), k in keeps.items()}, attributes=attributes)
    plan.frozen = list(verdict.frozen) if verdict is not None else []
    plan.groups = [GroupPlan(g.index, g.kind, [f"{n}:{d}" for n, d in g.members], g.size,
                             sorted(chosen.get(g.index, []))) for g in scored.groups]
    plan.params_after = total_parameters(model)
    plan.macs_after = macs
    return plan


def zero_removed(model: nn.Module, keeps: dict[str, list[int]]) -> nn.Module:
    """Set to 0, in place, every slice of `model` that a plan's `keeps` ("param:dim" -> kept) remove.

    The dense model so zeroed computes what the cut model computes, wherever no
    normalisation runs over the cut channels: the check that a cut is the cut it claims.
    """
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key, kept in keeps.items():
            name, _, dim = key.rpartition(":")
            tensor = parameters[name]
            removed = torch.ones(tensor.shape[int(dim)], dtype=torch.bool)
            removed[torch.as_tensor(kept, dtype=torch.long)] = False
            tensor.index_fill_(int(dim), torch.nonzero(removed).flatten().to(tensor.device), 0.0)
    return model


def cut_shapes(analysis: Analysis, removed: np.ndarray | Sequence[int]) -> dict[int, tuple[int, ...]]:
    """Tensor node -> its shape once the units (component ids) `removed` are cut, for every node."""
    table = analysis.dims
    kept = np.concatenate([[0], np.cumsum(~cut_mask(analysis, removed)[analysis.component])])
    sizes = kept[table.offsets[1:]] - kept[table.offsets[:-1]]
    return {t.index: tuple(int(sizes[table.ids[(t.index, d)]]) for d in range(len(t.shape)))
            for t in analysis.graph.tensors}


def estimated_cost(scored: Scored, key: str, chosen: dict[int, list[int]]) -> int:
    """MACs, parameters or bytes the model would have with `chosen` cut, computed from the graph alone."""
    return GRAPH_COSTS[key](scored.graph, chosen_shapes(scored, chosen))


def chosen_shapes(scored: Scored, chosen: dict[int, list[int]]) -> dict[int, tuple[int, ...]]:
    return cut_shapes(scored.analysis, removed_ids({g.index: g for g in scored.groups}, chosen, scored.unit_ids))


# Costs the dense graph gives for any cut, from the cut tensor shapes (node -> shape) alone.
GRAPH_COSTS: dict[str, Callable[[Graph, dict[int, tuple[int, ...]]], int | None]] = {
    "macs": graph_macs, "params": graph_params, "bytes": graph_bytes,
}


__all__ = ["GRAPH_COSTS", "chosen_shapes", "cut_model", "cut_shapes", "estimated_cost", "output_shapes",
           "zero_removed"]
