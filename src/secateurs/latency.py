"""Latency on this machine as a function of the cut widths: a per-op table, interpolated.

Every op of the traced graph whose work scales with the widths pruning can cut
(convolutions, matmuls, attention, norms, element-wise ops, pooling; `TIMED_OPS`) is
timed on its own, on random inputs, with each of its width variables (the coupled
groups its input tensors belong to) at `WIDTHS` of its units. A cut's predicted latency
is the sum over those ops of their multilinearly interpolated timings, plus the
remainder: the measured dense latency minus that sum at full width (Python and
dispatch overhead, views, ops outside `TIMED_OPS`). The table is cached on disk, keyed
by the graph, the input shapes, the thread count and torch's version, so a second
search on the same model and machine times nothing.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .batches import model_device
from .cache import cache_dir
from .errors import InvalidArgument
from .graph.groups import Analysis, analyze_graph
from .graph.trace import Graph, OpNode, Ref, trace
from .measure import latency_ms

aten = torch.ops.aten
Shapes = dict[int, tuple[int, ...]]

# Fractions of each width variable's units the table times; below the smallest, the
# smallest's timing is used (an over-estimate, which errs on the side of the budget).
WIDTHS = (0.25, 0.5, 0.75, 1.0)
# Bumped whenever what a table holds changes, so stale cache files are not read.
TABLE_VERSION = 1
# Each op at each grid point is timed until this many milliseconds or MAX_REPEATS calls, median taken.
TIME_PER_POINT_MS = 15.0
MIN_REPEATS, MAX_REPEATS = 5, 50


def _same(args: list[Any], kwargs: dict[str, Any], dense: list[Any]) -> None:
    """Ops whose non-tensor arguments do not depend on the widths."""


def _conv_groups(args: list[Any], kwargs: dict[str, Any], dense: list[Any]) -> None:
    """A grouped (depthwise) convolution has as many groups as the cut widths leave."""
    groups, transposed = args[8], args[6]
    if groups == 1:
        return
    if transposed:   # weight (in, out / groups, ...): the group count follows the inputs
        args[8] = max(1, groups * args[0].shape[1] // dense[0][1])
    else:            # weight (out, in / groups, ...)
        args[8] = args[0].shape[1] // args[1].shape[1]


def _layer_norm_shape(args: list[Any], kwargs: dict[str, Any], dense: list[Any]) -> None:
    """LayerNorm normalises over the input's trailing dims, whatever they were cut to."""
    args[1] = list(args[0].shape[len(args[0].shape) - len(args[1]):])


# aten op -> how to fix its width-dependent scalar arguments for cut inputs. Ops outside
# this registry (views, reshapes, copies made by the tracer) are in the remainder.
TIMED_OPS: dict[Any, Callable[[list[Any], dict[str, Any], list[Any]], None]] = {
    aten.convolution: _conv_groups,
    aten.native_layer_norm: _layer_norm_shape,
    **{op: _same for op in (
        aten.addmm, aten.mm, aten.bmm, aten.baddbmm, aten._scaled_dot_product_flash_attention_for_cpu,
        aten.native_batch_norm, aten._native_batch_norm_legit_no_training,
        aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.hardtanh, aten.hardtanh_, aten.hardswish,
        aten.sigmoid, aten.tanh, aten.add, aten.add_, aten.mul, aten.mul_, aten.sub, aten.div, aten.pow,
        aten.rsqrt, aten.mean, aten._softmax, aten.clone, aten.cat,
        aten.max_pool2d_with_indices, aten.avg_pool2d, aten._adaptive_avg_pool2d,
    )},
}


@dataclass
class OpTiming:
    """One op's timings: milliseconds on the grid of its width variables' fractions."""

    op: str
    axes: list[list[float]]      # per width variable, the fractions timed, increasing, ending at 1.0
    ms: list[float]              # row-major over the axes; non-decreasing along each axis

    def at(self, fractions: Sequence[float]) -> float:
        """Milliseconds at `fractions` (one per axis), interpolated multilinearly, clamped to the grid."""
        grid = np.asarray(self.ms).reshape([len(a) for a in self.axes])
        brackets = []
        for axis, x in zip(self.axes, fractions):
            x = min(max(float(x), axis[0]), axis[-1])
            upper = min(int(np.searchsorted(axis, x)), len(axis) - 1)
            lower = max(upper - 1, 0)
            span = axis[upper] - axis[lower]
            weight = (x - axis[lower]) / span if span > 0 else 1.0
            brackets.append(((lower, 1.0 - weight), (upper, weight)))
        total = 0.0
        for corner in itertools.product(*brackets):
            weight = math.prod(w for _, w in corner)
            if weight > 0:
                total += weight * float(grid[tuple(i for i, _ in corner)])
        return total


@dataclass
class _TimedOp:
    """An op of the graph tied to its timing: per width variable, the (tensor node, dim)s it reads."""

    signature: str
    variables: list[list[tuple[int, int]]]


@dataclass
class LatencyTable:
    """Per-op timings of one model on this machine, and the dense model's measured latency."""

    key: str
    threads: int
    torch_version: str
    dense_ms: float
    timings: dict[str, OpTiming] = field(default_factory=dict)    # op signature -> its timings
    ops: list[_TimedOp] = field(default_factory=list, repr=False)   # the graph's timed ops (not saved)
    dense_shapes: Shapes = field(default_factory=dict, repr=False)
    path: Path | None = None                                          # the cache file, when there is one

    @property
    def timed_ms(self) -> float:
        """The timed ops' sum at full width."""
        return sum(self.timings[op.signature].ms[-1] for op in self.ops)

    @property
    def remainder_ms(self) -> float:
        """What the table does not time: the dense latency minus the timed ops' sum at full width."""
        return self.dense_ms - self.timed_ms

    def predict(self, shapes: Shapes | None = None) -> float:
        """Predicted milliseconds of the model with its tensors cut to `shapes` (node -> shape; missing: dense).

        Where the ops timed alone cost more than the whole model (a busy machine, or
        per-call overhead that the model's own run hides), there is no remainder to add:
        the timed sum is scaled down to the dense latency instead, so a prediction is
        never negative.
        """
        shapes = shapes or {}
        timed = sum(self.timings[op.signature].at([self._fraction(v, shapes) for v in op.variables])
                    for op in self.ops)
        full = self.timed_ms
        if full > self.dense_ms:
            return timed * self.dense_ms / full
        return self.remainder_ms + timed

    def _fraction(self, variable: list[tuple[int, int]], shapes: Shapes) -> float:
        """A width variable's kept fraction: the mean over its (node, dim)s."""
        parts = [shapes.get(node, self.dense_shapes[node])[dim] / self.dense_shapes[node][dim]
                 for node, dim in variable]
        return sum(parts) / len(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, "key": self.key, "threads": self.threads,
                "torch_version": self.torch_version, "dense_ms": self.dense_ms,
                "timings": {s: asdict(t) for s, t in self.timings.items()}}


# ------------------------------------------------------------------------ width variables

@dataclass
class _Widths:
    """Where pruning can cut: each atom's unit, each unit's group, and the groups' prunable units."""

    analysis: Analysis
    group_of_unit: np.ndarray       # unit (component id) -> group index, -1 where never cut
    prunable: dict[int, np.ndarray]  # group index -> its prunable units, in group order
    sizes: dict[int, int]            # group index -> its number of units

    @classmethod
    def of(cls, analysis: Analysis) -> _Widths:
        groups = [g for g in analysis.groups if g.prunable_units]
        size = int(analysis.component.max()) + 1 if analysis.component.size else 0
        group_of_unit = np.full(size, -1, dtype=np.int64)
        for g in groups:
            group_of_unit[g.prunable_units] = g.index
        return cls(analysis, group_of_unit, {g.index: np.asarray(g.prunable_units) for g in groups},
                   {g.index: g.size for g in groups})

    def units(self, node: int, dim: int) -> np.ndarray:
        table = self.analysis.dims
        i = table.ids[(node, dim)]
        return self.analysis.component[table.offsets[i]:table.offsets[i + 1]]

    def groups_of(self, node: int, dim: int) -> frozenset[int]:
        found = self.group_of_unit[self.units(node, dim)]
        return frozenset(int(g) for g in np.unique(found[found >= 0]))

    def removal(self, groups: frozenset[int], fraction: float) -> np.ndarray:
        """Units cut when every group in `groups` keeps `fraction` of its units (at least one kept)."""
        parts = []
        for g in sorted(groups):
            prunable = self.prunable[g]
            limit = len(prunable) - 1 if len(prunable) == self.sizes[g] else len(prunable)
            parts.append(prunable[:max(0, min(round((1.0 - fraction) * self.sizes[g]), limit))])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def size(self, node: int, dim: int, gone: np.ndarray) -> int:
        return int((~gone[self.units(node, dim)]).sum())


def _input_refs(op: OpNode) -> list[int]:
    """Tensor nodes the op reads, each once, in argument order."""
    return list(dict.fromkeys(op.inputs))


@dataclass
class _Plan:
    """How to time one op: its width variables and, per grid point, its inputs' shapes."""

    op: OpNode
    variables: list[list[tuple[int, int]]]
    axes: list[list[float]]
    points: list[dict[int, tuple[int, ...]]]     # row-major over the axes: input node -> shape
    signature: str = ""                           # equal for ops that time the same (repeated blocks)

    def __post_init__(self) -> None:
        text = repr((self.op.name, _scalars(self.op.args), _scalars(self.op.kwargs), self.axes,
                     [[p[n] for n in _input_refs(self.op)] for p in self.points]))
        self.signature = hashlib.sha256(text.encode()).hexdigest()[:20]


def _scalars(value: Any) -> Any:
    """An op's arguments with tensors blanked out: what, besides shapes, decides its timing."""
    if isinstance(value, Ref):
        return "T"
    if isinstance(value, (list, tuple)):
        return [_scalars(v) for v in value]
    if isinstance(value, dict):
        return {k: _scalars(v) for k, v in sorted(value.items())}
    return repr(value)


def _plan(op: OpNode, graph: Graph, widths: _Widths) -> _Plan | None:
    """The width variables of `op` and the shapes of its inputs at each grid point; None if nothing scales."""
    inputs = _input_refs(op)
    variables: dict[frozenset[int], list[tuple[int, int]]] = {}
    for node in inputs:
        for dim in range(len(graph.tensors[node].shape)):
            groups = widths.groups_of(node, dim)
            if groups:
                variables.setdefault(groups, []).append((node, dim))
    if not variables:
        return None
    keys = list(variables)
    if len(keys) > 2:   # a concat of many branches, say: one shared fraction keeps the grid small
        keys = [frozenset().union(*keys)]
        variables = {keys[0]: [d for dims in variables.values() for d in dims]}
    removals, axes = [], []
    for key in keys:
        representatives = variables[key]
        levels: dict[float, np.ndarray] = {}
        for fraction in WIDTHS:
            removed = widths.removal(key, fraction)
            gone = np.zeros(len(widths.group_of_unit), dtype=bool)
            gone[removed] = True
            kept = np.mean([widths.size(n, d, gone) / graph.tensors[n].shape[d] for n, d in representatives])
            levels.setdefault(round(float(kept), 6), removed)
        axes.append(sorted(levels))
        removals.append([levels[f] for f in sorted(levels)])
    points = []
    for combination in np.ndindex(*[len(a) for a in axes]):
        gone = np.zeros(len(widths.group_of_unit), dtype=bool)
        for removal, level in zip(removals, combination):
            gone[removal[level]] = True
        points.append({n: tuple(widths.size(n, d, gone) for d in range(len(graph.tensors[n].shape)))
                       for n in inputs})
    return _Plan(op, [variables[k] for k in keys], axes, points)


# ------------------------------------------------------------------------ timing

def _materialize(value: Any, tensors: dict[int, torch.Tensor]) -> Any:
    if isinstance(value, Ref):
        return tensors[value.node]
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v, tensors) for v in value)
    return value


def _random(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        # in [0.5, 1.5): positive, so a variance's square root or a divisor stays finite
        return torch.rand(shape, generator=generator).to(dtype) + 0.5
    return torch.zeros(shape, dtype=dtype)


def _call(plan: _Plan, graph: Graph, point: dict[int, tuple[int, ...]], device: torch.device) -> Callable[[], Any]:
    """The op on fresh random inputs of the point's shapes on `device`, its scalar arguments fitted to them."""
    generator = torch.Generator().manual_seed(0)
    tensors = {n: _random(shape, graph.tensors[n].dtype, generator).to(device) for n, shape in point.items()}
    args = list(_materialize(plan.op.args, tensors))
    kwargs = {k: _materialize(v, tensors) for k, v in plan.op.kwargs.items()}
    dense = [graph.tensors[a.node].shape if isinstance(a, Ref) else None for a in plan.op.args]
    TIMED_OPS[plan.op.target.overloadpacket](args, kwargs, dense)
    target = plan.op.target
    return lambda: target(*args, **kwargs)


def _synchronized(call: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """`call`, waiting for an accelerator's queued kernels so the clock sees them run."""
    if device.type != "cuda":
        return call
    return lambda: (call(), torch.cuda.synchronize(device))


def _time_ms(call: Callable[[], Any]) -> float:
    """Median milliseconds of `call`, after warming up, over enough calls to see past the noise."""
    call()
    start = time.perf_counter()
    call()
    first = (time.perf_counter() - start) * 1e3
    repeats = int(min(MAX_REPEATS, max(MIN_REPEATS, TIME_PER_POINT_MS / max(first, 1e-3))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _time_plan(plan: _Plan, graph: Graph, device: torch.device) -> OpTiming | None:
    """The op's timings over its grid on `device`, made non-decreasing (fewer channels never cost more);
    None if it fails."""
    try:
        with torch.inference_mode():
            ms = [_time_ms(_synchronized(_call(plan, graph, point, device), device)) for point in plan.points]
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None   # shapes this op cannot take on its own: its time stays in the remainder
    grid = np.asarray(ms).reshape([len(a) for a in plan.axes])
    for axis in range(grid.ndim):
        grid = np.maximum.accumulate(grid, axis=axis)
    return OpTiming(plan.op.name, plan.axes, grid.reshape(-1).tolist())


# ------------------------------------------------------------------------ the table

def device_name(device: torch.device) -> str:
    """What a latency table is specific to: the CPU, or the accelerator's model name."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _structure_key(graph: Graph, threads: int, device: torch.device) -> str:
    """sha256 of every op with its shapes and dtypes, the thread count and device, torch's version and the grid."""
    digest = hashlib.sha256(repr((TABLE_VERSION, torch.__version__, threads, device_name(device), WIDTHS)).encode())
    for op in graph.ops:
        shapes = [(graph.tensors[i].shape, str(graph.tensors[i].dtype)) for i in op.inputs + op.outputs]
        digest.update(repr((op.name, shapes, _scalars(op.args), _scalars(op.kwargs))).encode())
    return digest.hexdigest()


def default_cache() -> Path:
    """Where latency tables are kept: $SECATEURS_CACHE/latency (else ~/.cache/secateurs/latency)."""
    return cache_dir() / "latency"


def _read(path: Path, key: str) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None    # a missing or damaged cache file is rebuilt, never trusted
    ok = isinstance(record, dict) and record.get("version") == TABLE_VERSION and record.get("key") == key
    return record if ok else None


def _write(path: Path, record: dict[str, Any]) -> None:
    """Write atomically: concurrent builds of the same table leave one whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def latency_table(model: nn.Module, example_inputs: Any, *, threads: int | None = None,
                  cache: str | os.PathLike | bool = True, graph: Graph | None = None,
                  analysis: Analysis | None = None) -> LatencyTable:
    """The per-op latency table of `model` on `example_inputs` at `threads` CPU threads, on the
    model's own device (an accelerator's ops are timed there, with its queue synchronized) and
    dtype; cached per device.

    `threads` defaults to torch's current count. `cache`: True for `default_cache()`, a
    folder, or False to time afresh without writing. `graph` / `analysis`, when the
    caller has them, save tracing again.
    """
    threads = torch.get_num_threads() if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidArgument(f"threads must be a positive integer, got {threads!r}")
    graph = graph if graph is not None else trace(model, example_inputs)
    analysis = analysis if analysis is not None else analyze_graph(graph)
    device = model_device(model)
    key = _structure_key(graph, threads, device)
    folder = default_cache() if cache is True else Path(cache) if cache else None
    path = folder / f"{key[:32]}.json" if folder is not None else None
    widths = _Widths.of(analysis)
    plans = [p for p in (_plan(op, graph, widths) for op in graph.ops
                         if getattr(op.target, "overloadpacket", None) in TIMED_OPS) if p is not None]
    record = _read(path, key) if path is not None else None
    if record is None:
        record = _build(model, example_inputs, graph, plans, key, threads, device)
        if path is not None:
            _write(path, record)
    timings = {s: OpTiming(**t) for s, t in record["timings"].items()}
    ops = [_TimedOp(p.signature, p.variables) for p in plans if p.signature in timings]
    table = LatencyTable(key, threads, record["torch_version"], record["dense_ms"], timings, ops,
                         {t.index: t.shape for t in graph.tensors}, path)
    _warn_if_inconsistent(table)
    return table


# Ops timed alone may sum to a little more than the model they come from (cache effects, and
# each call's own overhead, which dominates sub-millisecond models); beyond this share of the
# dense latency plus this slack the timings were taken under load.
INCONSISTENT_SHARE, INCONSISTENT_SLACK_MS = 1.1, 0.5


def _warn_if_inconsistent(table: LatencyTable) -> None:
    """Warn when the ops timed alone cost more than the whole model: its predictions would be wrong."""
    if table.dense_ms > 0 and table.timed_ms > INCONSISTENT_SHARE * table.dense_ms + INCONSISTENT_SLACK_MS:
        where = f" (cached in {table.path}; delete it to rebuild)" if table.path else ""
        warnings.warn(f"latency table{where}: the ops timed alone sum to {table.timed_ms:.1f} ms, more than the "
                      f"whole model's {table.dense_ms:.1f} ms; the machine was probably busy while it was built, "
                      f"and latency predictions from it are unreliable", RuntimeWarning, stacklevel=3)


def _build(model: nn.Module, example_inputs: Any, graph: Graph, plans: list[_Plan], key: str,
           threads: int, device: torch.device) -> dict[str, Any]:
    """Time every distinct op plan and the dense model at `threads` threads: the record a cache file holds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # the dense latency is taken before and after the op timings, and the lower kept: one
        # burst of load on a shared machine would otherwise inflate the remainder for good
        before = latency_ms(model, example_inputs, threads=threads)
        timings: dict[str, Any] = {}
        for plan in plans:
            if plan.signature not in timings:
                timings[plan.signature] = _time_plan(plan, graph, device)
        dense = min(before, latency_ms(model, example_inputs, threads=threads))
    finally:
        torch.set_num_threads(previous)
    return {"version": TABLE_VERSION, "key": key, "threads": threads, "device": device_name(device),
            "torch_version": torch.__version__,
            "dense_ms": dense, "timings": {s: asdict(t) for s, t in timings.items() if t is not None}}


__all__ = ["LatencyTable", "OpTiming", "TIMED_OPS", "WIDTHS", "default_cache", "latency_table"]
