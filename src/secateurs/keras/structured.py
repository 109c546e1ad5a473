"""Structured pruning of Keras models: remove channels, neurons and heads, and rebuild smaller.

`prune_structured` reads the coupled groups from the layer graph (`graph.analyze`),
scores each unit by summing a criterion's weight scores over every kernel slice of the
unit, picks the lowest units per group (or in one ranking, or to a MACs / parameter
budget), then rebuilds the model from its config with the new widths (`units`,
`filters`, `num_heads`, ...) via `keras.models.clone_model` and copies the kept weights
in. The result is an ordinary Keras model: `model.save("small.keras")` loads with plain
Keras, no secateurs needed. Sequential and Functional models only: a subclassed model's
graph is Python code, so it gets a one-line refusal (use unstructured pruning there).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import IncompatibleLayer, InvalidArgument
from ..structured import SEARCH_STEPS, GroupPlan, StructuredPlan
from ..structured.options import check_options
from ..structured.units import aligned, first_units, global_order, removal_count
from ._backend import Calibration, keras, to_numpy
from .criteria import canonical, score
from .graph import UNIT_KINDS, KerasAnalysis, KerasGroup, analyze, functional_of
from .costs import concrete_shapes, count_macs, example_for, graph_macs, unique_weights
from .targets import _CONV, _CONV_T, _SEPARABLE, TYPE_NAMES, own_variable, select_targets

L = keras.layers
# A target's cost, computed from the cut widths on the dense graph; latency is measured by the torch side only.
KERAS_BUDGETS = ("macs", "params", "bytes")


def _matches(analysis: KerasAnalysis, group: KerasGroup, patterns: Sequence[str]) -> bool:
    """A pattern matches a member's variable path or the name of the layer that holds it."""
    names = [n for path, _ in group.members for n in (path, getattr(analysis.layers.get(path), "name", path))]
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def _per_group(analysis: KerasAnalysis, groups: list[KerasGroup], spec: Any, default: float) -> dict[int, float]:
    if spec is None or not isinstance(spec, dict):
        return {g.index: default if spec is None else float(spec) for g in groups}
    return {g.index: next((float(f) for p, f in spec.items() if _matches(analysis, g, (p,))), default) for g in groups}


@dataclass
class _Scored:
    analysis: KerasAnalysis
    groups: list[KerasGroup]
    unit_scores: dict[int, np.ndarray]
    shapes: dict[int, tuple[int, ...]] | None      # concrete tensor shapes, for MACs (None: unknown)
    dense_macs: int | None
    dense_params: int
    itemsize: dict[str, int]


def _element_scores(model: Any, method: str, calibration: Calibration, seed: int) -> dict[str, np.ndarray]:
    if method == "bn_scale":
        return {}
    targets = select_targets(model, prune_last=True, types=sorted(TYPE_NAMES))
    return score(model, method, targets, calibration, seed=seed)


def _unit_scores(analysis: KerasAnalysis, group: KerasGroup, scores: dict[str, np.ndarray], method: str) -> np.ndarray:
    """Sum of the element scores of each unit over every scored member slice (else squared weights)."""
    position = {c: i for i, c in enumerate(group.units)}
    gammas = [(p, a) for p, a in group.members if p.endswith("/gamma")
              and isinstance(analysis.layers.get(p), L.BatchNormalization)] if method == "bn_scale" else []
    if gammas:   # network slimming: |gamma| of the group's BatchNorms
        members, values = gammas, {p: np.abs(to_numpy(analysis.variables[p].value)) for p, _ in gammas}
    else:        # the criterion's scores; a group without any (or bn_scale without a BatchNorm): squared weights
        members = [m for m in group.members if m[0] in scores] or group.members
        values = {p: scores[p] if p in scores else np.square(to_numpy(analysis.variables[p].value).astype(np.float64))
                  for p, _ in members}
    total = np.zeros(len(group.units))
    for path, axis in members:
        tensor = values[path]
        per_position = tensor.sum(axis=tuple(a for a in range(tensor.ndim) if a != axis)) if tensor.ndim > 1 else tensor
        comps = analysis.unit_of[(path, axis)]
        idx = np.array([position.get(c, -1) for c in comps.tolist()])
        ok = idx >= 0
        total += np.bincount(idx[ok], weights=per_position[ok], minlength=len(group.units))
    return total


def _gone(analysis: KerasAnalysis, groups: dict[int, KerasGroup], chosen: dict[int, list[int]]) -> np.ndarray:
    gone = np.zeros(int(analysis.component.max()) + 1 if analysis.component.size else 0, dtype=bool)
    for gi, positions in chosen.items():
        if positions:
            gone[np.asarray(groups[gi].units)[positions]] = True
    return gone


def _protect_members(analysis: KerasAnalysis, groups: dict[int, KerasGroup], chosen: dict[int, list[int]],
                     unit_scores: dict[int, np.ndarray]) -> None:
    """Spare the best unit of any member that would lose every position (a concat input, say)."""
    gone = _gone(analysis, groups, chosen)
    for gi, positions in chosen.items():
        group = groups[gi]
        for member in group.members:
            units = analysis.unit_of[member]
            if positions and gone[units].all():
                own = set(units.tolist())
                candidates = [i for i in positions if group.units[i] in own]
                spared = max(candidates, key=lambda i: unit_scores[gi][i])
                positions.remove(spared)
                gone[group.units[spared]] = False


def _new_shapes(analysis: KerasAnalysis, gone: np.ndarray) -> dict[str, tuple[int, ...]]:
    shapes = {p: tuple(int(d) for d in v.shape) for p, v in analysis.variables.items()}
    for (path, axis), units in analysis.unit_of.items():
        shape = list(shapes[path])
        shape[axis] = int((~gone[units]).sum())
        shapes[path] = tuple(shape)
    return shapes


def _cost(scored: _Scored, key: str, gone: np.ndarray) -> float:
    shapes = _new_shapes(scored.analysis, gone)
    if key == "macs":
        return graph_macs(scored.analysis.model, scored.analysis.nodes, scored.shapes, lambda v: shapes[v.path])
    count = {p: int(np.prod(s)) for p, s in shapes.items()}
    if key == "params":
        return sum(count.values())
    return sum(n * scored.itemsize[p] for p, n in count.items())


def _quanta(groups: list[Any], round_to: int | None) -> dict[int, int]:
    """Group index -> the multiple its kept count must be (as `structured.units.group_quanta`, channels
    of one position each); 0 where the group is not a multiple of round_to, or no larger (left whole)."""
    if not round_to or round_to == 1:
        return {g.index: 1 for g in groups}
    return {g.index: round_to if g.size % round_to == 0 and g.size > round_to else 0 for g in groups}


def _choose(scored: _Scored, ratio: float | dict[int, float], scope: str, round_to: int | None,
            caps: dict[int, float]) -> dict[int, list[int]]:
    quanta = _quanta(scored.groups, round_to)
    if scope == "local":
        chosen = {}
        for g in scored.groups:
            ok = [i for i, p in enumerate(g.prunable) if p]
            group_ratio = ratio[g.index] if isinstance(ratio, dict) else ratio
            count = removal_count(g.size, ok, min(group_ratio, caps.get(g.index, 1.0)), quanta[g.index])
            chosen[g.index] = sorted(ok, key=lambda i: scored.unit_scores[g.index][i])[:count]
    else:
        budget = int(ratio * sum(g.size for g in scored.groups))
        chosen = aligned(first_units(*global_order(scored.groups, scored.unit_scores, caps, quanta), budget),
                         scored.groups, quanta)
    _protect_members(scored.analysis, {g.index: g for g in scored.groups}, chosen, scored.unit_scores)
    return chosen


def _search(scored: _Scored, key: str, value: float, round_to: int | None, max_ratio: Any) -> float:
    """The smallest global ratio (to SEARCH_STEPS bisections) whose cost is at most `value` of the dense one."""
    caps = _per_group(scored.analysis, scored.groups, max_ratio, 0.9)
    no_cut = _gone(scored.analysis, {}, {})
    dense = scored.dense_macs if key == "macs" else _cost(scored, key, no_cut)
    by_index = {g.index: g for g in scored.groups}
    quanta = _quanta(scored.groups, round_to)
    order = global_order(scored.groups, scored.unit_scores, caps, quanta)
    total = sum(g.size for g in scored.groups)

    def trial(ratio: float) -> float:
        chosen = aligned(first_units(*order, int(ratio * total)), scored.groups, quanta)
        _protect_members(scored.analysis, by_index, chosen, scored.unit_scores)
        return _cost(scored, key, _gone(scored.analysis, by_index, chosen)) / max(dense, 1)

    low, high = 0.0, 0.95
    most = trial(high)
    if most > value:
        raise InvalidArgument(f"target {key}={value:g} cannot be met: the largest cut max_ratio allows (default 0.9 of "
                              f"each group) leaves {key} at {most:.1%} of the dense model's")
    for _ in range(SEARCH_STEPS):
        mid = (low + high) / 2
        if trial(mid) > value:
            low = mid
        else:
            high = mid
    return high


# ---------------------------------------------------------------------------- rebuild

def _config_changes(model: Any, new_shapes: dict[str, tuple[int, ...]], analysis: KerasAnalysis,
                    gone: np.ndarray) -> dict[str, dict[str, Any]]:
    """Layer name -> the config entries that change with the cut widths."""
    changes: dict[str, dict[str, Any]] = {}

    def changed(v: Any, axis: int) -> int | None:
        new = new_shapes[v.path][axis]
        return new if new != v.shape[axis] else None

    for node in analysis.nodes:
        layer = node.layer
        entry: dict[str, Any] = {}
        if isinstance(layer, L.Dense):
            entry["units"] = changed(own_variable(layer, "kernel"), 1)
        elif isinstance(layer, _CONV + _SEPARABLE):
            k = own_variable(layer, "pointwise_kernel" if isinstance(layer, _SEPARABLE) else "kernel")
            entry["filters"] = changed(k, len(k.shape) - 1)
        elif isinstance(layer, _CONV_T):
            k = own_variable(layer, "kernel")
            entry["filters"] = changed(k, len(k.shape) - 2)
        elif isinstance(layer, L.Embedding):
            entry["output_dim"] = changed(own_variable(layer, "embeddings"), 1)
        elif isinstance(layer, L.MultiHeadAttention):
            entry["num_heads"] = changed(own_variable(layer._query_dense, "kernel"), 1)
        elif isinstance(layer, L.GroupQueryAttention):
            entry["num_query_heads"] = changed(own_variable(layer._query_dense, "kernel"), 1)
            entry["num_key_value_heads"] = changed(own_variable(layer._key_dense, "kernel"), 1)
        elif isinstance(layer, L.Reshape):
            atoms = analysis.tensor_atoms.get(id(node.outputs[0]))
            if atoms is not None:
                kept = int((~gone[analysis.component[atoms]]).sum())
                if kept != layer.target_shape[-1]:
                    entry["target_shape"] = tuple(layer.target_shape[:-1]) + (kept,)
        entry = {k: v for k, v in entry.items() if v is not None}
        if entry:
            changes[layer.name] = entry
    return changes


def _slice(array: np.ndarray, path: str, keeps: dict[tuple[str, int], np.ndarray]) -> np.ndarray:
    for axis in range(array.ndim):
        keep = keeps.get((path, axis))
        if keep is not None:
            array = np.take(array, keep, axis=axis)
    return array


def _rebuild(model: Any, changes: dict[str, dict[str, Any]], keeps: dict[tuple[str, int], np.ndarray]) -> Any:
    def clone(layer: Any) -> Any:
        config = layer.get_config()
        config.update(changes.get(layer.name, {}))
        return layer.__class__.from_config(config)

    try:
        smaller = keras.models.clone_model(model, clone_function=clone)
    except Exception as exc:   # noqa: BLE001 - a graph clone_model cannot rebuild (raw keras.ops calls, say)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IncompatibleLayer(f"keras.models.clone_model cannot rebuild this model with the new widths: {first}") \
            from None
    for layer in model.layers:
        if not layer.weights:
            continue
        new = smaller.get_layer(layer.name)
        arrays = [_slice(to_numpy(v.value), v.path, keeps) for v in layer.weights]
        new.set_weights(arrays)
    if getattr(model, "compiled", False):
        try:
            smaller.compile_from_config(model.get_compile_config())
        except Exception:   # a compile config Keras cannot rebuild: the user compiles the smaller model
            pass
    return smaller


def _outputs(model: Any, example: Any) -> list[tuple[int, ...]]:
    return [tuple(np.shape(to_numpy(o))) for o in keras.tree.flatten(model(example, training=False))]


def prune_structured(
    model: Any,
    ratio: float | dict[str, float] | None = None,
    *,
    target: str | None = None,
    method: str = "l2",
    scope: str = "local",
    units: Sequence[str] = UNIT_KINDS,
    data: Any = None,
    loss_fn: Any = None,
    batch_size: int = 32,
    max_batches: int | None = None,
    example_inputs: Any = None,
    round_to: int | None = None,
    ignore: Sequence[str] = (),
    max_ratio: float | dict[str, float] | None = None,
    seed: int = 0,
) -> tuple[Any, StructuredPlan]:
    """Remove the least important channels / heads of a Sequential or Functional model.

    Returns `(smaller, plan)`: a new, smaller Keras model (compiled like `model` if it
    was) and the `StructuredPlan`; `model` itself is left as it was. `ratio` is the
    fraction of units removed from each prunable group (scope "local") or in total,
    ranked after dividing by each group's mean score (scope "global", at most 90% of
    any group); a dict `{glob: fraction}` gives per-group ratios (globs match layer
    names and variable paths). `target="macs=0.5"`, `"params=0.3"` or `"bytes=0.5"`
    instead searches the global ratio that brings that cost to the given fraction of
    today's. `example_inputs` fixes the sizes MACs are counted at (default: one sample
    of the model's input shape). `method` is any criterion name, or "bn_scale".
    """
    if round_to == "auto":   # the Keras backends' CPU runs: widths stay free, as for a CPU torch model
        round_to = None
    budget = check_options(ratio=ratio, target=target, scope=scope, units=units, round_to=round_to,
                           max_ratio=max_ratio)
    method = canonical(method)
    if budget is not None:
        if budget.key not in KERAS_BUDGETS:
            raise InvalidArgument(f"target {budget.key}= is measured with the PyTorch latency tables; for Keras "
                                  f"models use {', '.join(k + '=' for k in KERAS_BUDGETS)}")
        scope = "global"
    functional_of(model)     # a subclassed model is refused before anything runs
    analysis = analyze(model)
    groups = [g for g in analysis.groups if g.kind in units and g.prunable_units and not _matches(analysis, g, ignore)]
    scores = _element_scores(model, method, Calibration(data, loss_fn, max_batches, batch_size), seed)
    unit_scores = {g.index: _unit_scores(analysis, g, scores, method) for g in groups}
    try:
        example = example_for(model, example_inputs)
        shapes = concrete_shapes(model, example)
    except InvalidArgument:
        if budget is not None and budget.key == "macs":
            raise
        example, shapes = None, None
    itemsize = {p: np.dtype(str(v.dtype)).itemsize if "float" in str(v.dtype) or "int" in str(v.dtype) else 4
                for p, v in analysis.variables.items()}
    dense_macs = graph_macs(model, analysis.nodes, shapes, lambda v: tuple(v.shape)) if shapes is not None else None
    dense_params = sum(int(np.prod(v.shape)) for v in unique_weights(model))
    scored = _Scored(analysis, groups, unit_scores, shapes, dense_macs, dense_params, itemsize)
    if budget is not None:
        ratio = _search(scored, budget.key, budget.value, round_to, max_ratio)
    ratios = _per_group(analysis, groups, ratio, 0.0) if isinstance(ratio, dict) else ratio
    caps = _per_group(analysis, groups, max_ratio, 1.0 if scope == "local" else 0.9)
    chosen = _choose(scored, ratios, scope, round_to, caps)
    by_index = {g.index: g for g in groups}
    gone = _gone(analysis, by_index, chosen)
    keeps = {member: np.flatnonzero(~gone[units_]) for member, units_ in analysis.unit_of.items()
             if gone[units_].any()}
    new_shapes = _new_shapes(analysis, gone)
    changes = _config_changes(model, new_shapes, analysis, gone)
    smaller = _rebuild(model, changes, keeps)
    if example is not None:
        before, after = _outputs(model, example), _outputs(smaller, example)
        if before != after:
            raise IncompatibleLayer(f"pruning changed the output shapes {before} -> {after}; please report this model")
    plan = StructuredPlan(method, dict(ratio) if isinstance(ratio, dict) else float(ratio),
                          params_before=dense_params, macs_before=int(dense_macs or 0),
                          keeps={f"{p}:{a}": k.tolist() for (p, a), k in keeps.items()}, attributes=changes)
    plan.groups = [GroupPlan(g.index, g.kind, [f"{p}:{a}" for p, a in g.members], g.size,
                             sorted(chosen.get(g.index, []))) for g in groups]
    plan.params_after = sum(int(np.prod(v.shape)) for v in unique_weights(smaller))
    plan.macs_after = int(count_macs(smaller, example)[0]) if example is not None else 0
    if budget is not None:
        dense_cost = _cost(scored, budget.key, _gone(analysis, {}, {}))
        measured = {"macs": plan.macs_after, "params": plan.params_after,
                    "bytes": sum(int(np.prod(v.shape)) * np.dtype(str(v.dtype)).itemsize for v in unique_weights(smaller))}
        plan.budget = {"target": str(budget), "key": budget.key, "limit": budget.value * dense_cost,
                       "dense": dense_cost, "predicted": _cost(scored, budget.key, gone),
                       "measured": measured[budget.key]}
    return smaller, plan
