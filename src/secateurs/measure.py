"""What a pruned model costs: parameters, non-zeros, MACs, bytes and CPU latency."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .criteria.base import eval_mode
from .io import dense_bytes, sparse_bytes

aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _native_mha_flops(query, key, value, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    batch, length, width = query
    source = key[1]
    projections = 2 * batch * width * (length * width + 2 * source * width)
    head = width // num_heads
    attention = sdpa_flop_count((batch, num_heads, length, head), (batch, num_heads, source, head),
                                (batch, num_heads, source, head))
    return projections + attention + 2 * batch * length * width * width


# Attention kernels torch's counter leaves out on CPU: without them a transformer's MACs
# would silently miss its attention.
_EXTRA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    aten._native_multi_head_attention: _native_mha_flops,
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
    latency_ms: float
    threads: int
    accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen, params = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), shared parameters counted once."""
    params = unique_parameters(model)
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


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
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with torch.no_grad(), eval_mode(model), counter:
        _call(model, example_inputs)
    root = type(model).__name__
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name.startswith(root + "."):
            per_module[name[len(root) + 1:]] = sum(ops.values()) // 2
    return counter.get_total_flops() // 2, per_module


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


def latency_ms(model: nn.Module, example_inputs: Any, threads: int = 1,
               warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of one forward pass in milliseconds, with the thread count fixed."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), eval_mode(model):
            for _ in range(warmup):
                _call(model, example_inputs)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                _call(model, example_inputs)
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times)


def measure(model: nn.Module, example_inputs: Any, *, threads: int = 1, repeats: int = 20,
            evaluate: Callable[[nn.Module], float] | None = None) -> Measurement:
    """Every cost of `model` at once, plus accuracy when `evaluate` is given."""
    params, nonzeros = count_parameters(model)
    macs, per_module = count_macs(model, example_inputs)
    return Measurement(
        params=params, nonzeros=nonzeros, macs=macs,
        nonzero_macs=nonzero_macs(model, per_module, macs),
        size_bytes=sparse_bytes(model), dense_size_bytes=dense_bytes(model),
        latency_ms=latency_ms(model, example_inputs, threads=threads, repeats=repeats),
        threads=threads, accuracy=evaluate(model) if evaluate else None,
    )
