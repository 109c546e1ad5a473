"""Block-by-block calibration and pruning of transformers (LLMs and encoders).

The road: run the calibration batches until the first block is entered and keep what it
receives (hidden states plus attention mask, position ids, rotary embeddings ...); then,
for each block in turn, collect the statistics of its linears from those inputs, prune
them in place, and run the pruned block to get the next block's inputs. Only one block's
inputs and one block's statistics are in memory at a time, and block k+1 sees the outputs
of the already-pruned block k. (The walk over the whole model, with each block onloaded
to the device in turn, is `sequential.prune_llm`.)

With `true_sequential`, a block is pruned in stages: its linears are grouped by the input
tensor they read (q/k/v, then o, then up/gate, then down in LLaMA), and each group's
statistics are collected after every earlier group has been pruned.

Prunable layers are nn.Linear and transformers' Conv1D (GPT-2, weight stored [in, out]);
methods see every weight as [out, in]. Padding tokens (attention_mask == 0) are left out
of the statistics. The methods live one per module (magnitude, wanda, sparsegpt, ria,
alps) and register themselves in METHODS with `register_method`; refinements that follow
any method (dsnot) register in REFINERS with `register_refiner`; this module never imports
them. With `permute` (N:M), each consumer linear's inputs and its producers' outputs are
permuted alike just before the consumer is pruned (llm/permute.py).
"""
from __future__ import annotations

import dataclasses
import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..batches import eval_mode, to_device
from ..errors import IncompatibleLayer, InvalidArgument, MissingData
from ..layers import is_linear_like, weight_out_in
from ..plans import PlanRecord
from ..sparsity import parse_pattern
from .blocks import BlockLayout, block_linears
from .permute import permute_consumers
from .stats import LayerStats

PruneFn = Callable[[torch.Tensor, "LayerStats | None", "LLMConfig", str], "tuple[torch.Tensor, str]"]
# refine(dense, pruned, stats, config, name) -> (refined, note): a mask refinement after any method
RefineFn = Callable[[torch.Tensor, torch.Tensor, "LayerStats | None", "LLMConfig", str], "tuple[torch.Tensor, str]"]
STATISTICS = (None, "norms", "hessian")


@dataclass(frozen=True)
class Method:
    """A pruning method: the statistic it needs from the calibration inputs, and its prune step."""

    statistic: str | None  # None (weights only: no calibration pass), "norms" or "hessian"
    prune: PruneFn


# name -> Method, filled by the method modules as they are imported (secateurs.llm imports them all)
METHODS: dict[str, Method] = {}
# name -> Method whose prune step is a RefineFn (llm/dsnot.py), filled the same way
REFINERS: dict[str, Method] = {}
_COMPARE = ("row", "layer")


def _registrar(table: dict[str, Method], name: str, statistic: str | None) -> Callable[[Callable], Callable]:
    if statistic not in STATISTICS:
        raise InvalidArgument(f"statistic must be one of {STATISTICS}, got {statistic!r}")

    def register(step: Callable) -> Callable:
        table[name] = Method(statistic, step)
        return step
    return register


def register_method(name: str, statistic: str | None) -> Callable[[PruneFn], PruneFn]:
    """Decorator: make the prune step it wraps the LLM method `name`, fed `statistic`."""
    return _registrar(METHODS, name, statistic)


def register_refiner(name: str, statistic: str | None) -> Callable[[RefineFn], RefineFn]:
    """Decorator: make the refinement it wraps `refine=name`, fed `statistic`, run after any method."""
    return _registrar(REFINERS, name, statistic)


@dataclass
class LLMConfig:
    """How to prune: method, sparsity or N:M pattern, and the engine's options."""

    method: str = "wanda"              # a name in METHODS: magnitude, wanda, sparsegpt, ria, alps
    sparsity: float = 0.5              # ignored when `pattern` is given
    pattern: str | None = None         # "2:4", "4:8": keep N of every M along the input dim
    true_sequential: bool = False      # re-collect statistics after each group of a block (slower)
    owl: float | None = None           # OWL lambda (outlier-weighted block ratios), None = uniform
    blocksize: int = 128               # SparseGPT lazy-update block
    damp: float = 0.01                 # SparseGPT damping, fraction of mean(diag H)
    ignore: tuple[str, ...] = ()       # glob patterns of linear names left dense
    compare: str = "row"               # magnitude / wanda: compare scores per output "row" or per "layer"
    owl_m: float = 5.0                 # OWL outlier threshold: M times the layer's mean score
    measure_error: bool = False        # report ||WX - W'X||^2 per layer (one more pass per block)
    device: str | None = None          # where each block is pruned, onloaded in turn; None: where it is
    offload_inputs: bool = False       # keep the calibration activations on the CPU, one batch at a time on device
    refine: str | None = None          # a name in REFINERS ("dsnot"): swap pruned/kept weights after the method
    permute: bool = False              # N:M only: permute input channels (and their producers) before pruning

    @property
    def nm(self) -> tuple[int, int] | None:
        """The pattern as (N, M), or None for unstructured."""
        return None if self.pattern is None else parse_pattern(self.pattern)

    @property
    def statistic(self) -> str | None:
        """The richest statistic the method and the refinement need (None < norms < hessian)."""
        wanted = {METHODS[self.method].statistic, REFINERS[self.refine].statistic if self.refine else None}
        return next((s for s in reversed(STATISTICS) if s in wanted), None)

    @property
    def target(self) -> float:
        """The fraction of each pruned layer's weights that are zeroed."""
        n, m = self.nm or (0, 1)
        return 1 - n / m if self.pattern else self.sparsity


@dataclass
class LayerReport:
    """One pruned linear: its sparsity, reconstruction error on the calibration inputs, time."""

    name: str
    sparsity: float
    error: float    # ||WX - W'X||^2 summed over the calibration tokens (nan when not measured)
    seconds: float  # pruning time, statistics collection excluded
    note: str = ""


@dataclass
class LLMPlan(PlanRecord):
    """What prune_llm did: the config, one report per pruned linear, the block ratios, the time."""

    config: LLMConfig
    layers: list[LayerReport]
    seconds: float
    block_sparsity: list[float] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)  # wall time of each block: load, prune, run, unload

    def summary(self) -> dict[str, str]:
        mean = sum(r.sparsity for r in self.layers) / len(self.layers) if self.layers else 0.0
        return {"method": self.config.method, "layers pruned": str(len(self.layers)),
                "mean sparsity": f"{mean:.1%}", "seconds": f"{self.seconds:.1f}"}


@dataclass
class BlockInputs:
    """What one block receives, per calibration batch."""

    hidden: list[torch.Tensor]          # the hidden state of each batch
    args: list[tuple]                   # the other positional args
    kwargs: list[dict[str, Any]]        # attention mask, position ids / embeddings ... (use_cache off)
    # per batch, the bool [B, L] of real tokens (False at padding) or None: statistics skip padding
    tokens: list[torch.Tensor | None] = field(default_factory=list)

    def batch(self, i: int) -> BlockInputs:
        """The inputs of batch `i` alone."""
        return BlockInputs(self.hidden[i:i + 1], self.args[i:i + 1], self.kwargs[i:i + 1], self.tokens[i:i + 1])

    def to(self, device: torch.device | str) -> BlockInputs:
        """The same inputs, every tensor on `device`."""
        return BlockInputs(to_device(self.hidden, device), to_device(self.args, device),
                           to_device(self.kwargs, device), to_device(self.tokens, device))


# ------------------------------------------------------------------ checking the config

def check_config(config: LLMConfig) -> None:
    """Raise InvalidArgument for any config value outside what the engine accepts."""
    if config.method not in METHODS:
        raise InvalidArgument(f"method must be one of {sorted(METHODS)}, got {config.method!r}")
    if not isinstance(config.sparsity, (int, float)) or not 0 <= config.sparsity < 1:
        raise InvalidArgument(f"sparsity must be a number in [0, 1), got {config.sparsity!r}")
    nm = config.nm  # parse_pattern raises on a malformed pattern
    if not isinstance(config.blocksize, int) or config.blocksize < 1:
        raise InvalidArgument(f"blocksize must be a positive integer, got {config.blocksize!r}")
    if nm and config.blocksize % nm[1]:
        raise InvalidArgument(f"blocksize must be a multiple of M={nm[1]} of pattern {config.pattern}, "
                              f"got {config.blocksize}")
    if not config.damp > 0:
        raise InvalidArgument(f"damp must be > 0 (a fraction of mean(diag H)), got {config.damp!r}")
    if config.refine is not None and config.refine not in REFINERS:
        raise InvalidArgument(f"refine must be None or one of {sorted(REFINERS)}, got {config.refine!r}")
    if not isinstance(config.permute, bool) or (config.permute and nm is None):
        raise InvalidArgument(f"permute must be a bool and needs an N:M pattern (e.g. pattern='2:4'), "
                              f"got permute={config.permute!r}, pattern={config.pattern!r}")
    if config.compare not in _COMPARE:
        raise InvalidArgument(f"compare must be one of {_COMPARE}, got {config.compare!r}")
    if config.owl is not None and (nm or not config.owl >= 0):
        raise InvalidArgument(f"owl must be a lambda >= 0 and needs unstructured sparsity (no pattern), "
                              f"got owl={config.owl!r}, pattern={config.pattern!r}")
    if isinstance(config.ignore, str):
        raise InvalidArgument(f"ignore must be a tuple of glob patterns, got the string {config.ignore!r}")
    if config.device is not None:
        check_device(config.device)


def check_device(device: str) -> torch.device:
    """`device` as a torch.device, or InvalidArgument when it is malformed or absent here."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgument(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if parsed.type == "meta":
        raise InvalidArgument("device='meta' holds no data; prune on 'cpu' or an accelerator such as 'cuda'")
    backend = getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if parsed.type != "cpu" and (available is None or not available()):
        raise InvalidArgument(f"device {device!r} is not available on this machine")
    if parsed.index is not None and parsed.type != "cpu" and parsed.index >= backend.device_count():
        raise InvalidArgument(f"device {device!r} does not exist: this machine has {backend.device_count()}")
    return parsed


def make_config(config: LLMConfig | None = None, **overrides: Any) -> LLMConfig:
    """`config` (or the defaults) with `overrides` applied, checked."""
    names = {f.name for f in dataclasses.fields(LLMConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InvalidArgument(f"unknown LLM option(s) {unknown}; expected some of {sorted(names)}")
    if config is not None and not isinstance(config, LLMConfig):
        raise InvalidArgument(f"config must be an LLMConfig, got {type(config).__name__}")
    config = dataclasses.replace(config or LLMConfig(), **overrides)
    config.ignore = tuple(config.ignore) if not isinstance(config.ignore, str) else config.ignore
    if isinstance(config.device, torch.device):
        config.device = str(config.device)
    check_config(config)
    return config


# ------------------------------------------------------------------ capturing the first block's inputs

class _Captured(Exception):
    """Raised by the pre-hook on the first block: the model has computed all we need."""


def _input_device(model: nn.Module) -> torch.device:
    # the first real parameter (the embeddings); blocks may sit on the meta device when streaming
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _model_call(model: nn.Module, batch: Any, device: torch.device) -> tuple[tuple, dict]:
    """(args, kwargs) calling `model` on one calibration batch, with the cache off."""
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch.to(device),), {}
    elif isinstance(batch, Mapping):
        args = ()
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    else:
        raise InvalidArgument(f"each calibration batch must be a LongTensor of token ids or a dict "
                              f"like dict(input_ids=..., attention_mask=...), got {type(batch).__name__}")
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return args, kwargs


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


@contextmanager
def cache_off(model: nn.Module) -> Iterator[None]:
    """Turn the model config's KV cache off for the duration (block inputs must not carry a cache)."""
    config = getattr(model, "config", None)
    had = getattr(config, "use_cache", None)
    if had is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if had is not None:
            config.use_cache = had


def _real_tokens(batch: Any, hidden: torch.Tensor) -> torch.Tensor | None:
    """The batch's attention mask as bool [B, L] when it has padding and fits the hidden state."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.shape != hidden.shape[:2] or bool(mask.all()):
        return None
    return mask.to(hidden.device).bool()


def capture_inputs(model: nn.Module, layout: BlockLayout, batches: Iterable[Any]) -> BlockInputs:
    """Run each batch until blocks[0] is entered and return what the block received."""
    captured = BlockInputs([], [], [])

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: _detached(v) for k, v in kwargs.items()}
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        for key in ("use_cache", "past_key_values", "past_key_value", "layer_past"):
            if key in kwargs:
                kwargs[key] = False if key == "use_cache" else None
        captured.hidden.append(hidden.detach())
        captured.args.append(_detached(tuple(rest)))
        captured.kwargs.append(kwargs)
        raise _Captured

    device = _input_device(model)
    handle = layout.blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad(), eval_mode(model), cache_off(model):
            for batch in batches:
                args, kwargs = _model_call(model, batch, device)
                try:
                    model(*args, **kwargs)
                except _Captured:
                    captured.tokens.append(_real_tokens(batch, captured.hidden[-1]))
                    continue
                raise IncompatibleLayer(f"the model never entered {layout.blocks_path}[0] on a calibration "
                                        f"batch; its blocks are not on the forward path")
    finally:
        handle.remove()
    if not captured.hidden:
        raise MissingData("prune_llm needs at least one calibration batch, got none")
    return captured


# ------------------------------------------------------------------ running a block

def _hidden_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise IncompatibleLayer(f"a block returned {type(output).__name__}; expected a tensor or a tuple "
                            f"whose first item is the hidden state")


def block_device(block: nn.Module) -> torch.device:
    """Where `block` runs: the device of its first parameter."""
    return next(block.parameters()).device


def _forward_all(block: nn.Module, inputs: BlockInputs) -> Iterator[torch.Tensor]:
    """The block's hidden output on each batch, one at a time, each batch moved to the block's device."""
    device = block_device(block)
    with torch.no_grad(), eval_mode(block):
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
            yield _hidden_of(block(hidden.to(device), *to_device(args, device), **to_device(kwargs, device)))


def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """Run `block` on every batch; its outputs (with the same extra args) feed the next block.

    Each output is kept where its input was (the CPU when the activations are offloaded).
    """
    outputs = [out.to(hidden.device) for out, hidden in zip(_forward_all(block, inputs), inputs.hidden)]
    return BlockInputs(outputs, inputs.args, inputs.kwargs, inputs.tokens)


@contextmanager
def _input_hooks(modules: Mapping[str, nn.Module], seen: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call seen(name, input) whenever one of `modules` runs."""
    def hook_for(name: str):
        return lambda module, args, output: seen(name, args[0])
    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run_with_hooks(block: nn.Module, inputs: BlockInputs, modules: Mapping[str, nn.Module],
                    seen: Callable[[str, torch.Tensor], None]) -> None:
    """Run `block` on every batch, calling seen(name, input) for `modules`, padding tokens dropped."""
    for i in range(len(inputs.hidden)):
        tokens = inputs.tokens[i] if i < len(inputs.tokens) else None

        def real(name: str, x: torch.Tensor, tokens: torch.Tensor | None = tokens) -> None:
            seen(name, x[tokens.to(x.device)] if tokens is not None and x.shape[:2] == tokens.shape else x)

        with _input_hooks(modules, real):
            for _ in _forward_all(block, inputs.batch(i)):
                pass


def linear_groups(block: nn.Module, inputs: BlockInputs, linears: Mapping[str, nn.Module]) -> list[list[str]]:
    """Names of `linears` grouped by the input tensor they read, in the order the block runs them.

    Linears the block never runs come last, as one group.
    """
    groups: list[tuple[torch.Tensor, list[str]]] = []  # holding the tensors keeps their ids unique

    def seen(name: str, x: torch.Tensor) -> None:
        if any(name in names for _, names in groups):
            return
        for tensor, names in groups:
            if tensor is x:
                names.append(name)
                return
        groups.append((x, [name]))

    with _input_hooks(linears, seen):  # not _run_with_hooks: it copies inputs to drop padding
        for _ in _forward_all(block, inputs.batch(0)):
            pass
    order = [names for _, names in groups]
    ran = {n for names in order for n in names}
    silent = [n for n in linears if n not in ran]
    return order + ([silent] if silent else [])


# ------------------------------------------------------------------ statistics and pruning of linears

def new_stats(module: nn.Module, config: LLMConfig) -> LayerStats:
    """Empty statistics for `module`, with a Hessian when the method needs one."""
    return LayerStats(weight_out_in(module).shape[1], with_hessian=config.statistic == "hessian")


def collect_stats(block: nn.Module, inputs: BlockInputs, linears: Mapping[str, nn.Module],
                  config: LLMConfig) -> dict[str, LayerStats]:
    """Statistics of each of `linears` over every calibration batch of `block` as it is now."""
    stats = {n: new_stats(m, config) for n, m in linears.items()}
    _run_with_hooks(block, inputs, linears, lambda n, x: stats[n].add(x))
    return stats


def prune_linear(module: nn.Module, stats: LayerStats | None, config: LLMConfig,
                 name: str = "linear") -> tuple[torch.Tensor, str]:
    """Prune one linear in place; return its dense weight ([out, in], float) and the method's note."""
    if not is_linear_like(module):
        raise IncompatibleLayer(f"{name} is a {type(module).__name__}, not a Linear or Conv1D")
    rows = weight_out_in(module)
    dense = rows.detach().float().clone()
    if stats is not None and stats.tokens == 0:
        stats = None
    pruned, note = METHODS[config.method].prune(dense, stats, config, name)
    if config.refine is not None:
        pruned, refined = REFINERS[config.refine].prune(dense, pruned, stats, config, name)
        note = "; ".join(n for n in (note, refined) if n)
    with torch.no_grad():
        rows.copy_(pruned.to(rows.dtype))
    return dense, note


class _Errors:
    """||W x - W' x||^2 = ||(W - W') x||^2 accumulated for pruned linears awaiting measurement."""

    def __init__(self) -> None:
        self.delta: dict[str, torch.Tensor] = {}  # W - W', [out, in], for the pending linears only
        self.total: dict[str, float] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        delta = self.delta[name]
        rows = x.detach().reshape(-1, delta.shape[1]).float()
        self.total[name] = self.total.get(name, 0.0) + float((rows @ delta.t()).pow(2).sum(dtype=torch.float64))

    def done(self) -> None:
        """Forget the measured deltas, so only one group's are held at a time."""
        self.delta.clear()


def _prune_group(linears: Mapping[str, nn.Module], stats: Mapping[str, LayerStats], config: LLMConfig,
                 errors: _Errors) -> list[LayerReport]:
    """Prune each of `linears` in place; keep W - W' in `errors` when the error is measured."""
    reports = []
    for name, module in linears.items():
        start = time.perf_counter()
        dense, note = prune_linear(module, stats.get(name), config, name)
        seconds = time.perf_counter() - start
        rows = weight_out_in(module).detach()
        reports.append(LayerReport(name, int((rows == 0).sum()) / rows.numel(), float("nan"), seconds, note))
        if config.measure_error:
            errors.delta[name] = dense - rows.float()
    return reports


def needs_inputs(config: LLMConfig) -> bool:
    """Whether pruning a block with `config` runs it on its calibration inputs at all."""
    return config.statistic is not None or config.measure_error


def prune_block(block: nn.Module, inputs: BlockInputs | None, config: LLMConfig,
                prefix: str = "") -> list[LayerReport]:
    """Prune every Linear / Conv1D of `block` in place from its calibration inputs; one report each.

    Weights are zeroed (and, for SparseGPT, updated); no mask buffers are added, so a
    `save_pretrained` folder reloads in plain transformers. A method that needs no
    statistics (magnitude), with `measure_error` off, runs no forward pass: `inputs` may be None.
    """
    check_config(config)
    linears = block_linears(block, prefix, config.ignore)
    if not linears or config.target == 0:
        return []
    if not needs_inputs(config):
        if config.permute:
            permute_consumers(block, prefix, list(linears), {}, config.nm)
        return _prune_group(linears, {}, config, _Errors())
    if inputs is None:
        raise MissingData(f"method {config.method!r} (measure_error={config.measure_error}) needs the block's "
                          f"calibration inputs")
    groups = linear_groups(block, inputs, linears) if config.true_sequential else [list(linears)]
    needs_stats = config.statistic is not None
    errors = _Errors()
    reports: dict[str, LayerReport] = {}
    # the empty last group: one more pass, to measure the last group's errors (only when measured)
    for group in [*groups, *([[]] if config.measure_error else [])]:
        stats = {n: new_stats(linears[n], config) for n in group} if needs_stats else {}
        watched = {n: linears[n] for n in [*stats, *errors.delta]}
        if watched:
            # a group's inputs depend only on earlier groups, so this pass also measures the
            # previous group's error on exactly the inputs it was pruned from
            _run_with_hooks(block, inputs, watched,
                            lambda n, x: stats[n].add(x) if n in stats else errors.add(n, x))
        errors.done()
        group_linears = {n: linears[n] for n in group}
        if config.permute:
            permute_consumers(block, prefix, group, stats, config.nm)
        reports.update((r.name, r) for r in _prune_group(group_linears, stats, config, errors))
    for name, total in errors.total.items():
        reports[name].error = total
    return [reports[n] for n in linears]


# ------------------------------------------------------------------ onloading, block by block

@contextmanager
def onloaded(block: nn.Module, device: torch.device | str | None) -> Iterator[nn.Module]:
    """`block` moved to `device` for the duration, then back where it was (no move for None)."""
    if device is None:
        yield block
        return
    home = block_device(block)
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


Visit = Callable[[int, nn.Module, "BlockInputs | None"], None]


def walk_blocks(layout: BlockLayout, inputs: BlockInputs | None, visit: Visit, device: str | None = None,
                load: Callable[[int], None] | None = None, unload: Callable[[int], None] | None = None) -> list[float]:
    """For each block in turn: load(i), onload it to `device`, visit(i, block, inputs), run it for the
    next block's inputs (when there are inputs), offload it, unload(i).

    On the device there is one block at a time, with its inputs (or, when `inputs` live on
    the CPU, one batch of them at a time). Returns the seconds each block took.
    """
    last = len(layout.blocks) - 1
    seconds = []
    for i, block in enumerate(layout.blocks):
        start = time.perf_counter()
        if load is not None:
            load(i)
        with onloaded(block, device):
            visit(i, block, inputs)
            if inputs is not None and i < last:
                inputs = run_block(block, inputs)
        if unload is not None:
            unload(i)
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _synchronize(device: str | None) -> None:
    """Wait for the device's queued work, so a block's time is its own (CPU work is synchronous)."""
    kind = torch.device(device).type if device is not None else "cpu"
    backend = getattr(torch, kind, None)
    if kind != "cpu" and hasattr(backend, "synchronize"):
        backend.synchronize()


def place_inputs(inputs: BlockInputs, config: LLMConfig) -> BlockInputs:
    """The captured inputs where the walk keeps them: on the device, unless offloaded (or no device)."""
    return inputs.to(config.device) if config.device is not None and not config.offload_inputs else inputs


def as_batch_list(batches: Iterable[Any] | None) -> list[Any]:
    """The calibration batches as a list (one tensor or dict is one batch; None is none)."""
    if batches is None:
        return []
    if isinstance(batches, (torch.Tensor, Mapping)):
        return [batches]
    try:
        return list(batches)
    except TypeError:
        raise InvalidArgument(f"batches must be a list of token-id tensors or of dicts, "
                              f"got {type(batches).__name__}") from None
