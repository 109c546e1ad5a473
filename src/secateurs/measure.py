"""What a pruned model costs: parameters, non-zeros, MACs, bytes and CPU latency.

Every latency of a whole model that secateurs reports (the CLI, reports, latency
tables' dense figure, budget checks) comes from one function, `time_forward`: after a
warm-up, torch.utils.benchmark's Timer times short blocks of calls until the
interquartile range is within `PRECISION` of the median (or `MAX_SECONDS` have passed),
and the median, the IQR, the thread count and the number of blocks are returned
(`Timing`). `latency_ms` is its median.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.utils.benchmark as benchmark
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

from .batches import eval_mode
from .errors import InvalidArgument
from .graph.trace import Graph, Ref
from .io import dense_bytes, sparse_bytes

aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _native_mha_flops(query, key, value, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                      *args, out_shape=None, **kwargs) -> int:
    """FLOPs of torch's fused attention, read from the weight shapes so that cut widths count right."""
    batch, length, width_in = query
    source = key[1]
    width = qkv_weight[0] // 3          # q/k/v projection width: num_heads * head_dim
    projections = 2 * batch * width * width_in * (length + 2 * source)
    attention = 4 * batch * length * source * width    # scores q.k^T, then weights.v
    return projections + attention + 2 * batch * length * proj_weight[0] * width


def _mkldnn_rnn_layer_flops(input, weight_ih, weight_hh, *args, out_shape=None, **kwargs) -> int:
    """One LSTM layer and direction: input and recurrent matmuls at every step."""
    steps = 1
    for n in input[:-1]:
        steps *= n
    return 2 * steps * weight_ih[0] * (weight_ih[1] + weight_hh[1])


# Attention and LSTM kernels torch's counter leaves out on CPU: without them a transformer's
# MACs would silently miss its attention, an LSTM's its whole recurrence.
_EXTRA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    aten._native_multi_head_attention: _native_mha_flops,
    aten.mkldnn_rnn_layer: _mkldnn_rnn_layer_flops,   # nn.LSTM's CPU kernel
}


@dataclass
class Measurement:
    """Costs of one model; `to_dict` gives the JSON written to metrics files."""

    params: int
    nonzeros: int
    macs: int
    nonzero_macs: int
    size_bytes: int
    dense_size_bytes: int
    latency_ms: float | None      # the median; None where not timed
    threads: int
    accuracy: float | None = None
    latency_iqr_ms: float | None = None    # the spread: interquartile range of the timed blocks
    latency_runs: int | None = None        # blocks timed (each the mean of one or more calls)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def timing(self) -> Timing | None:
        """The latency as a Timing (median, spread, threads, runs); None where not timed."""
        return Timing.of(self.to_dict())


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen, params = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def total_parameters(model: nn.Module) -> int:
    """Number of parameters, shared parameters counted once (no pass over the values)."""
    return sum(p.numel() for p in unique_parameters(model))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), shared parameters counted once."""
    params = unique_parameters(model)
    return total_parameters(model), sum(int(torch.count_nonzero(p)) for p in params)


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def count_macs(model: nn.Module, example_inputs: Any) -> tuple[int, dict[str, int]]:
    """Multiply-accumulates of one forward pass, total and per module.

    Counted by dispatch-level tracing (torch's FlopCounterMode), so functional matmuls,
    SDPA and fused attention count as well as Linear and conv modules.
    """
    counter, _ = _counted_call(model, lambda: _call(model, example_inputs))
    root = type(model).__name__
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name.startswith(root + "."):
            per_module[name[len(root) + 1:]] = sum(ops.values()) // 2
    return counter.get_total_flops() // 2, per_module


def _counted_call(model: nn.Module, call: Callable[[], Any]) -> tuple[FlopCounterMode, Any]:
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with torch.no_grad(), eval_mode(model), counter:
        output = call()
    return counter, output


def macs_and_output(model: nn.Module, call: Callable[[], Any]) -> tuple[int, Any]:
    """MACs of `call()`, a forward pass of `model` (in eval mode, without gradients), and its output."""
    counter, output = _counted_call(model, call)
    return counter.get_total_flops() // 2, output


def graph_macs(graph: Graph, shapes: dict[int, tuple[int, ...]] | None = None) -> int | None:
    """Multiply-accumulates of a traced graph (`graph.trace`), with no forward pass.

    Each op counts by the formula `count_macs` uses, applied to the recorded shapes or,
    where given, to `shapes` (tensor node -> shape): the cost of the same graph with
    some widths cut, which is how a MACs target is searched without cutting anything.
    None where an op's MACs need more than shapes (a module recorded as one op, an
    attention kernel whose formula reads tensors): count those with `count_macs`.
    """
    on_shapes = {op: f.__wrapped__ for op, f in flop_registry.items() if hasattr(f, "__wrapped__")}
    on_shapes.update(_EXTRA_FORMULAS)
    shapes = shapes or {}

    def shape_of(value: Any) -> Any:
        if isinstance(value, Ref):
            return torch.Size(shapes.get(value.node, graph.tensors[value.node].shape))
        if isinstance(value, (list, tuple)):
            return type(value)(shape_of(v) for v in value)
        return value

    flops = 0
    for op in graph.ops:
        packet = getattr(op.target, "overloadpacket", None)
        if packet is None or (packet in flop_registry and packet not in on_shapes):
            return None
        formula = on_shapes.get(packet)
        if formula is None:
            continue
        args = shape_of(op.args)
        kwargs = {k: shape_of(v) for k, v in op.kwargs.items()}
        outputs = tuple(torch.Size(shapes.get(i, graph.tensors[i].shape)) for i in op.outputs)
        flops += formula(*args, out_shape=outputs[0] if len(outputs) == 1 else outputs, **kwargs)
    return flops // 2


def graph_params(graph: Graph, shapes: dict[int, tuple[int, ...]] | None = None) -> int:
    """Parameters of a traced graph, at its recorded shapes or, where given, at `shapes` (as `graph_macs`)."""
    shapes = shapes or {}
    return sum(math.prod(shapes.get(node, graph.tensors[node].shape)) for node in set(graph.parameters.values()))


def graph_bytes(graph: Graph, shapes: dict[int, tuple[int, ...]] | None = None) -> int:
    """Bytes of a traced graph's parameters and buffers at their dtype sizes (tied ones once), as `graph_params`."""
    shapes = shapes or {}
    return sum(math.prod(shapes.get(t.index, t.shape)) * t.dtype.itemsize
               for t in graph.tensors if t.kind in ("parameter", "buffer"))


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers at their dtype sizes, shared ones counted once."""
    unique = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in unique.values())


def nonzero_macs(model: nn.Module, per_module: dict[str, int], total: int) -> int:
    """MACs that touch a non-zero weight: each weighted layer's MACs times its density."""
    saved = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name in per_module and isinstance(weight, torch.Tensor) and weight.numel():
            # children of this module would be counted twice; leaf layers own their MACs
            if any(True for _ in module.children()):
                continue
            density = int(torch.count_nonzero(weight)) / weight.numel()
            saved += round(per_module[name] * (1.0 - density))
    return total - saved


# The Measurement fields that are wall-clock times: two runs of the same thing differ in them.
TIMING_FIELDS = ("latency_ms", "latency_iqr_ms", "latency_runs")
# Timing stops once the IQR is within this fraction of the median...
PRECISION = 0.1
# ...after at least MIN_RUNS blocks and MIN_SECONDS of timed calls, and at the latest after MAX_SECONDS
# (wall clock, from the first timed call).
MIN_RUNS, MIN_SECONDS, MAX_SECONDS = 10, 0.05, 1.0
# A block of calls lasts at least this long, so that the timer's own overhead is negligible.
BLOCK_SECONDS = 5e-4


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one forward pass: median and interquartile range over the timed blocks."""

    median_ms: float
    iqr_ms: float
    threads: int
    runs: int           # blocks timed; each block (one call, or a few for very fast models) is one sample

    def within_noise(self, other: float | Timing) -> bool:
        """Whether the spreads cover the difference: the two medians' distance is at most half the IQRs' sum.

        `other` is another Timing or a plain number of milliseconds (a budget), which has no spread.
        """
        median, iqr = (other.median_ms, other.iqr_ms) if isinstance(other, Timing) else (float(other), 0.0)
        return abs(self.median_ms - median) <= (self.iqr_ms + iqr) / 2

    @classmethod
    def of(cls, measurement: dict[str, Any]) -> Timing | None:
        """The timing a measurement dict (`Measurement.to_dict`) records; None if it has no latency.

        Older records without a spread read as spread 0.
        """
        if measurement.get("latency_ms") is None:
            return None
        return cls(measurement["latency_ms"], measurement.get("latency_iqr_ms") or 0.0,
                   measurement.get("threads") or 1, measurement.get("latency_runs") or 0)

    def verdict(self, limit_ms: float) -> str:
        """Against a budget of `limit_ms`: "met", "met only within noise", "missed, within noise" or "missed"."""
        noise = self.within_noise(limit_ms)
        if self.median_ms <= limit_ms:
            return "met only within noise" if noise else "met"
        return "missed, within noise" if noise else "missed"

    def speedup(self, dense: Timing) -> str:
        """How many times faster than `dense`, e.g. "2.41x", with ", within noise" where the spreads cover the difference."""
        text = f"{dense.median_ms / self.median_ms:.2f}x" if self.median_ms > 0 else "-"
        return text + (", within noise" if self.within_noise(dense) else "")

    @property
    def text(self) -> str:
        """The median and half the IQR at the same decimals, in milliseconds: "3.52 ± 0.07", "14.76 ± 0.08"."""
        return _decimals(self.median_ms, self.iqr_ms / 2)

    def __str__(self) -> str:
        return f"{self.text} ms"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def budget_text(budget: dict[str, Any], after: dict[str, Any], dense: dict[str, Any]) -> str:
    """What a structured budget (a plan's `budget` record) asked and what the pruned model measures.

    A latency budget is judged on `after`'s own timing, spread included (`Timing.verdict`);
    MACs, parameters and bytes are exact.
    """
    key, limit = budget["key"], budget["limit"]
    if key == "latency_ms":
        timing = Timing.of(after)
        if timing is None:
            return f"budget {budget['target']}: not timed"
        kept = (f"; it keeps {after['macs'] / dense['macs']:.0%} of the MACs"
                if after.get("macs") and dense.get("macs") else "")
        return (f"budget {budget['target']}: the pruned model measures {timing} at {timing.threads} thread(s): "
                f"{timing.verdict(limit)}{kept}")
    measured = budget["measured"]
    return (f"budget {budget['target']}: {measured / budget['dense']:.1%} of the dense {key} "
            f"({measured:,.0f} of {budget['dense']:,.0f}): {'met' if measured <= limit else 'missed'}")


def _decimals(median: float, spread: float) -> str:
    """`median ± spread` at one number of decimals: the median's third significant digit, or further
    (two more at most) until the spread shows a non-zero digit."""
    def needed(value: float, digits: int) -> int:
        return max(0, digits - 1 - math.floor(math.log10(value))) if value > 0 else 0
    decimals = needed(median, 3)
    if spread > 0:
        decimals = min(max(decimals, needed(spread, 1)), decimals + 2)
    return f"{median:.{decimals}f} ± {spread:.{decimals}f}"


def time_forward(model: nn.Module, example_inputs: Any, threads: int = 1, *, warmup: int = 3,
                 precision: float | None = None, min_seconds: float | None = None,
                 max_seconds: float | None = None) -> Timing:
    """Median and IQR of one forward pass of `model` on `example_inputs`, in eval mode, at `threads` threads.

    `warmup` untimed calls come first. torch.utils.benchmark's Timer then times blocks of
    calls, a block as short as the timer's own overhead allows (one call, unless a call
    takes under BLOCK_SECONDS): the median of short blocks, like that of single calls,
    stays put when the machine is briefly busy, where the mean of a long block would not.
    Blocks are timed until there are at least MIN_RUNS, `min_seconds` have passed and the
    IQR is within `precision` of the median, or until `max_seconds` have passed
    (defaults: PRECISION, MIN_SECONDS, MAX_SECONDS, read at call time). The thread count
    is restored afterwards.
    """
    precision = PRECISION if precision is None else precision
    min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
    max_seconds = MAX_SECONDS if max_seconds is None else max_seconds
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidArgument(f"threads must be a positive integer, got {threads!r}")
    timer = benchmark.Timer("call(model, inputs)", globals={"call": _call, "model": model, "inputs": example_inputs},
                            num_threads=threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), eval_mode(model):
            for _ in range(warmup):
                _call(model, example_inputs)
            started = time.perf_counter()
            first = timer.timeit(1)
            number = max(1, math.ceil(BLOCK_SECONDS / max(first.raw_times[0], 1e-9)))
            times: list[float] = []
            check = MIN_RUNS     # the statistics are computed at MIN_RUNS blocks, then every quarter more
            while True:
                times += timer.timeit(number).raw_times
                over = time.perf_counter() - started > max_seconds
                if len(times) < check and not over:
                    continue
                check = math.ceil(len(times) * 1.25)
                summary = benchmark.Measurement(number, list(times), first.task_spec)   # median, IQR
                if over or (sum(times) >= min_seconds and summary.meets_confidence(precision)):
                    break
    finally:
        torch.set_num_threads(previous)
    return Timing(summary.median * 1e3, summary.iqr * 1e3, threads, len(times))


def latency_ms(model: nn.Module, example_inputs: Any, threads: int = 1,
               warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of one forward pass (`time_forward`'s median), with the thread count fixed.

    `repeats` is kept for callers of the old signature: the number of timed calls now
    follows the precision reached (`time_forward`).
    """
    return time_forward(model, example_inputs, threads, warmup=warmup).median_ms


def measure(model: nn.Module, example_inputs: Any, *, threads: int = 1, repeats: int = 20,
            evaluate: Callable[[nn.Module], float] | None = None, timed_inputs: Any = None,
            timed: bool = True) -> Measurement:
    """Every cost of `model` at once, plus accuracy when `evaluate` is given.

    MACs are counted on `example_inputs`; latency is timed (`time_forward`) on
    `timed_inputs` where given (a larger batch, say), else on `example_inputs`, and not at
    all with `timed=False` (the latency fields are then None). `repeats` is kept for old callers.
    """
    params, nonzeros = count_parameters(model)
    macs, per_module = count_macs(model, example_inputs)
    timing = time_forward(model, example_inputs if timed_inputs is None else timed_inputs, threads) if timed else None
    return Measurement(
        params=params, nonzeros=nonzeros, macs=macs,
        nonzero_macs=nonzero_macs(model, per_module, macs),
        size_bytes=sparse_bytes(model), dense_size_bytes=dense_bytes(model),
        latency_ms=timing.median_ms if timing else None, threads=threads,
        accuracy=evaluate(model) if evaluate else None,
        latency_iqr_ms=timing.iqr_ms if timing else None, latency_runs=timing.runs if timing else None,
    )
