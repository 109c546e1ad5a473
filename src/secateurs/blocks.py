"""Whole blocks: score residual blocks / transformer layers and remove the least useful ones.

Block influence (ShortGPT, Men et al. 2024): BI = 1 - cos(block input, block output),
averaged over the calibration data; a block that barely turns its input does little and
goes first. The cosine is taken per token for (batch, tokens, features) activations, as
in the paper, and over each sample's whole activation otherwise. The "loss" score is
the calibration loss increase when the block is skipped (one pass over the data per
candidate).

A candidate is a child of an nn.ModuleList / nn.Sequential holding two or more blocks of
its class that, on the example inputs, adds its own input tensor to something (a
residual connection, seen by watching torch's add) and returns a tensor of its input's
shape: a residual block or a transformer layer, not a strided or widening block, nor a
conv-BN-ReLU stack without a skip.

Removal deletes the block from its container, which renumbers the rest; Hugging Face
configs follow (`num_hidden_layers`, `layer_types`) and so does every `layer_idx`
attribute, so caches index the right layer. Where deleting breaks the forward (code
that counts layers by itself), the block is replaced by `SkippedBlock`, which returns
its input in the shape of the block's return value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .batches import Calibration, LossFn, eval_mode, mean_loss, model_device
from .errors import IncompatibleLayer, InvalidArgument, MissingData
from .measure import _call, count_parameters
from .plans import PlanRecord, fraction

_CONTAINERS = (nn.ModuleList, nn.Sequential)
_HOW = ("auto", "delete", "identity")


# ------------------------------------------------------------------ what a block takes and returns

def _block_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    return hidden if isinstance(hidden, torch.Tensor) else None


def _block_output(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _returns(output: Any) -> int | None:
    """0 when a block returns a tensor, k for a k-tuple whose first item is the hidden state."""
    if isinstance(output, torch.Tensor):
        return 0
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return len(output)
    return None


class SkippedBlock(nn.Module):
    """Stands in for a removed block: returns its input, shaped like the block's return value.

    Extra positional and keyword arguments (masks, caches, position embeddings) are
    accepted and ignored; `returns` is 0 for a tensor, k for a k-tuple (the rest None).
    """

    def __init__(self, returns: int = 0, skipped: str = ""):
        super().__init__()
        self.returns, self.skipped = returns, skipped

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = _block_input(args, kwargs)
        if hidden is None:
            raise IncompatibleLayer(f"skipped block {self.skipped}: no tensor input (first argument or hidden_states)")
        return hidden if self.returns == 0 else (hidden,) + (None,) * (self.returns - 1)

    def extra_repr(self) -> str:
        return f"skipped={self.skipped!r}, returns={self.returns}"


@dataclass
class _Probe:
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    returns: int | None
    residual: bool = False


_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
         torch.Tensor.__iadd__}


class _ResidualWatch(TorchFunctionMode):
    """Notes which running blocks add their own input tensor to something: a residual connection."""

    def __init__(self) -> None:
        super().__init__()
        self.running: list[tuple[str, torch.Tensor]] = []
        self.residual: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _ADDS:
            for name, x in self.running:
                if any(a is x for a in args):
                    self.residual.add(name)
        return func(*args, **(kwargs or {}))


def _probe(model: nn.Module, example_inputs: Any, names: Sequence[str]) -> dict[str, _Probe]:
    """One forward on the example inputs: each named module's input/output shapes, return form, residual add."""
    seen: dict[str, _Probe] = {}
    watch = _ResidualWatch()

    def make_hooks(name: str) -> tuple[Callable, Callable]:
        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
            watch.running.append((name, _block_input(args, kwargs)))

        def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            watch.running = [entry for entry in watch.running if entry[0] != name]
            x, y = _block_input(args, kwargs), _block_output(output)
            seen.setdefault(name, _Probe(None if x is None else tuple(x.shape),
                                         None if y is None else tuple(y.shape), _returns(output)))
        return before, after

    handles = []
    for name in names:
        before, after = make_hooks(name)
        module = model.get_submodule(name)
        handles += [module.register_forward_pre_hook(before, with_kwargs=True),
                    module.register_forward_hook(after, with_kwargs=True)]
    try:
        with torch.no_grad(), eval_mode(model), watch:
            _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    for name in watch.residual & set(seen):
        seen[name].residual = True
    return seen


def _repeated_children(model: nn.Module) -> list[str]:
    """Children of ModuleList / Sequential containers that hold two or more modules of their class."""
    names = []
    for container_name, container in model.named_modules():
        if not isinstance(container, _CONTAINERS):
            continue
        kinds = [type(child) for child in container]
        for index, child in enumerate(container):
            if kinds.count(type(child)) >= 2 and not isinstance(child, SkippedBlock) and next(child.parameters(), None) is not None:
                names.append(f"{container_name}.{index}" if container_name else str(index))
    return names


def find_blocks(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the candidate blocks: repeated container children that add their input to a branch
    (a residual connection) and return a tensor of their input's shape."""
    names = _repeated_children(model)
    probes = _probe(model, example_inputs, names)
    return [n for n in names if n in probes and probes[n].residual and probes[n].input_shape is not None
            and probes[n].input_shape == probes[n].output_shape]


# ------------------------------------------------------------------ scores

def _cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine of input and output per token of (batch, tokens, features) tensors, else per sample."""
    if x.dim() == 3:
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    else:
        x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    return torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=1, eps=1e-12)


def _batches(model: nn.Module, data: Iterable[Any]) -> Iterable[tuple[tuple, dict, Any]]:
    count = 0
    for batch in Calibration(data).batches(model_device(model)):
        count += 1
        yield batch
    if count == 0:
        raise MissingData("the calibration data yielded no batches")


def block_influence(model: nn.Module, blocks: Sequence[str], data: Iterable[Any]) -> dict[str, float]:
    """Block name -> 1 - mean cos(input, output) over the calibration data (ShortGPT's block influence)."""
    def run() -> None:
        for args, kwargs, _ in _batches(model, data):
            model(*args, **kwargs)
    return _influence(model, blocks, run)


def _influence(model: nn.Module, blocks: Sequence[str], run: Callable[[], None]) -> dict[str, float]:
    """Block influence over the forward passes `run()` makes."""
    sums = {n: 0.0 for n in blocks}
    counts = {n: 0 for n in blocks}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x, y = _block_input(args, kwargs), _block_output(output)
            if x is None or y is None or x.shape != y.shape:
                raise IncompatibleLayer(f"block {name}: its output does not have the shape of its input")
            cos = _cosines(x, y)
            sums[name] += float(cos.sum())
            counts[name] += cos.numel()
        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n), with_kwargs=True) for n in blocks]
    try:
        with torch.no_grad(), eval_mode(model):
            run()
    finally:
        for h in handles:
            h.remove()
    return {n: 1.0 - sums[n] / counts[n] if counts[n] else 0.0 for n in blocks}


def block_loss(model: nn.Module, blocks: Sequence[str], data: Iterable[Any], loss_fn: LossFn,
               returns: dict[str, int | None] | None = None) -> dict[str, float]:
    """Block name -> mean calibration loss with the block skipped, minus the loss of the whole model."""
    data = list(data)  # walked once per block
    base = mean_loss(model, data, loss_fn)
    returns = returns or {}
    scores = {}
    for name in blocks:
        container, index = _locate(model, name)
        block = container[index]
        container[index] = _stand_in(name, returns.get(name, 0))
        try:
            scores[name] = mean_loss(model, data, loss_fn) - base
        finally:
            container[index] = block
    return scores


# ------------------------------------------------------------------ removal

def _locate(model: nn.Module, name: str) -> tuple[nn.Module, int]:
    container_name, _, index = name.rpartition(".")
    container = model.get_submodule(container_name) if container_name else model
    if not isinstance(container, _CONTAINERS) or not index.isdigit() or int(index) >= len(container):
        raise InvalidArgument(f"block {name!r} is not a child of an nn.ModuleList or nn.Sequential")
    return container, int(index)


def _configs_counting(model: nn.Module, layers: int) -> list[Any]:
    """Hugging Face configs in the model whose num_hidden_layers equals `layers`."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "num_hidden_layers", None) == layers:
            configs[id(config)] = config
    return list(configs.values())


def _delete(model: nn.Module, container: nn.Module, indices: list[int]) -> None:
    """Delete `indices` from `container`; update HF configs and the later layers' layer_idx."""
    before = len(container)
    configs = _configs_counting(model, before)
    for index in sorted(indices, reverse=True):
        del container[index]
    for config in configs:
        config.num_hidden_layers = len(container)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == before:
            config.layer_types = [t for i, t in enumerate(layer_types) if i not in set(indices)]
    if configs:
        for position, block in enumerate(container):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = position


def _snapshot(model: nn.Module, container: nn.Module) -> tuple[list[nn.Module], list[tuple[Any, int, Any]], dict]:
    layers = list(container)
    configs = [(c, c.num_hidden_layers, getattr(c, "layer_types", None)) for c in _configs_counting(model, len(layers))]
    indices = {m: m.layer_idx for block in layers for m in block.modules()
               if isinstance(getattr(m, "layer_idx", None), int)}
    return layers, configs, indices


def _restore(container: nn.Module, snapshot: tuple) -> None:
    layers, configs, indices = snapshot
    while len(container):
        del container[len(container) - 1]
    for block in layers:
        container.append(block)
    for config, count, layer_types in configs:
        config.num_hidden_layers = count
        if layer_types is not None:
            config.layer_types = layer_types
    for module, index in indices.items():
        module.layer_idx = index


def _runs(model: nn.Module, example_inputs: Any, shapes: list[tuple[int, ...]] | None) -> bool:
    try:
        return shapes is None or _output_shapes(model, example_inputs) == shapes
    except (RuntimeError, IndexError, KeyError, TypeError, ValueError, AttributeError):
        return False


def _output_shapes(model: nn.Module, example_inputs: Any) -> list[tuple[int, ...]]:
    with torch.no_grad(), eval_mode(model):
        output = _call(model, example_inputs)
    shapes: list[tuple[int, ...]] = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            shapes.append(tuple(value.shape))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (tuple, list)):
            for v in value:
                walk(v)
    walk(output)
    return shapes


def _stand_in(name: str, returns: int | None) -> SkippedBlock:
    if returns is None:
        raise IncompatibleLayer(f"block {name!r} returns neither a tensor nor a tuple, so no identity can stand in "
                                "for it; it cannot be deleted from its container either")
    return SkippedBlock(returns, name)


def _remove(model: nn.Module, removed: Sequence[str], how: dict[str, str], returns: dict[str, int | None],
            example_inputs: Any = None, shapes: list[tuple[int, ...]] | None = None) -> dict[str, str]:
    """Remove the named blocks; returns block -> "delete" / "identity" as done ("auto" decided by a test run)."""
    by_container: dict[int, tuple[nn.Module, list[tuple[str, int]]]] = {}
    for name in removed:
        container, index = _locate(model, name)
        by_container.setdefault(id(container), (container, []))[1].append((name, index))
    done = {}
    for container, entries in by_container.values():
        identity = [(n, i) for n, i in entries if how[n] == "identity"]
        for name, index in identity:
            container[index] = _stand_in(name, returns.get(name))
            done[name] = "identity"
        deleting = [(n, i) for n, i in entries if how[n] != "identity"]
        if not deleting:
            continue
        snapshot = _snapshot(model, container)
        _delete(model, container, [i for _, i in deleting])
        if any(how[n] == "auto" for n, _ in deleting) and not _runs(model, example_inputs, shapes):
            _restore(container, snapshot)
            for name, index in deleting:
                container[index] = _stand_in(name, returns.get(name))
                done[name] = "identity"
            continue
        done.update({n: "delete" for n, _ in deleting})
    return done


# ------------------------------------------------------------------ the front door

@dataclass
class BlockPlan(PlanRecord):
    """Which blocks were removed and how, with every candidate's score and the costs."""

    method: str
    scores: dict[str, float] = field(default_factory=dict)   # candidate -> score (low: removed first)
    removed: list[str] = field(default_factory=list)         # names in the model before removal
    how: dict[str, str] = field(default_factory=dict)        # removed block -> "delete" / "identity"
    returns: dict[str, int | None] = field(default_factory=dict)  # removed block -> 0 (tensor), tuple length
    params_before: int = 0
    params_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The plan as it goes into plan.json, under "blocks" (beside a structured plan's keys)."""
        return {"blocks": asdict(self)}

    def summary(self) -> dict[str, str]:
        return {"method": self.method, "removed": ", ".join(self.removed) or "none",
                "params": fraction(self.params_after, self.params_before)}


def _scores(model: nn.Module, candidates: list[str], method: str, data: Iterable[Any] | None,
            loss_fn: LossFn | None, example_inputs: Any, returns: dict[str, int | None]) -> dict[str, float]:
    if method == "loss":
        if data is None or loss_fn is None:
            raise MissingData("method='loss' needs calibration data=<iterable of batches> and loss_fn=...")
        return block_loss(model, candidates, data, loss_fn, returns)
    if data is not None:
        return block_influence(model, candidates, data)
    return _influence(model, candidates, lambda: _call(model, example_inputs))


BLOCK_SCORES = ("influence", "loss")


def _count(n: int | None, ratio: float | None, available: int) -> int:
    if (n is None) == (ratio is None):
        raise InvalidArgument("give exactly one of n (a number of blocks) or ratio (a fraction of the candidates)")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= available:
            raise InvalidArgument(f"n must be an integer in [0, {available}] (the number of candidate blocks), got {n!r}")
        return n
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise InvalidArgument(f"ratio must be a fraction of the candidate blocks in [0, 1], got {ratio!r}")
    return int(ratio * available)


def _check_candidates(model: nn.Module, example_inputs: Any, candidates: Sequence[str] | None) -> tuple[list[str], dict[str, _Probe]]:
    if candidates is None:
        names = find_blocks(model, example_inputs)
    else:
        if isinstance(candidates, str):
            raise InvalidArgument(f"candidates must be a list of module names, got the string {candidates!r}")
        names = list(dict.fromkeys(candidates))
        for name in names:
            _locate(model, name)
    probes = _probe(model, example_inputs, names)
    for name in names:
        probe = probes.get(name)
        if probe is None:
            raise IncompatibleLayer(f"block {name!r} does not run on the example inputs")
        if probe.input_shape is None or probe.input_shape != probe.output_shape:
            raise IncompatibleLayer(f"block {name!r} maps {probe.input_shape} to {probe.output_shape}; only a block "
                                    "whose output has its input's shape can be removed")
    if not names:
        raise IncompatibleLayer("no candidate block: no ModuleList / Sequential of repeated, shape-preserving "
                                "blocks; name them with candidates=[...]")
    return names, probes


def prune_blocks(
    model: nn.Module,
    example_inputs: Any,
    n: int | None = None,
    ratio: float | None = None,
    *,
    candidates: Sequence[str] | None = None,
    method: str = "influence",
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    how: str = "auto",
) -> BlockPlan:
    """Remove the `n` (or `ratio` of the candidate) lowest-scoring blocks of `model` in place; returns the plan.

    `method` "influence" scores 1 - cos(input, output) on `data` (the example inputs when
    none is given); "loss" the loss increase when the block is skipped (needs `data` and
    `loss_fn`). `how`: "delete" from the container, "identity" (a SkippedBlock), or
    "auto" (delete, unless the model then fails on the example inputs).
    """
    if method not in BLOCK_SCORES:
        raise InvalidArgument(f"unknown block score {method!r}; expected one of {', '.join(BLOCK_SCORES)}")
    if how not in _HOW:
        raise InvalidArgument(f"unknown removal how={how!r}; expected one of {', '.join(_HOW)}")
    names, probes = _check_candidates(model, example_inputs, candidates)
    count = _count(n, ratio, len(names))
    returns = {name: probes[name].returns for name in names}
    shapes = _output_shapes(model, example_inputs)
    scores = _scores(model, names, method, data, loss_fn, example_inputs, returns)
    params_before, _ = count_parameters(model)
    removed = sorted(names, key=lambda name: scores[name])[:count]
    done = _remove(model, removed, {name: how for name in removed}, returns, example_inputs, shapes)
    after = _output_shapes(model, example_inputs)
    if after != shapes:
        raise IncompatibleLayer(f"removing blocks changed the output shapes {shapes} -> {after}; "
                                "name the blocks with candidates=[...] or use how='identity'")
    plan = BlockPlan(method, {k: float(v) for k, v in scores.items()}, removed, done,
                     {name: returns[name] for name in removed}, params_before)
    plan.params_after, _ = count_parameters(model)
    return plan


def replay_blocks(model: nn.Module, record: BlockPlan | dict[str, Any]) -> nn.Module:
    """Remove from a fresh `model` the blocks a plan removed, the same way, so saved weights fit."""
    if isinstance(record, BlockPlan):
        record = asdict(record)
    from .plan_schema import BlocksRecord, check_modules, parse_plan

    record = record.get("blocks", record) if isinstance(record, dict) else record
    parse_plan(record, BlocksRecord)
    check_modules(model, record.get("removed", []), "removed blocks")
    removed = list(record.get("removed", []))
    how = {name: record.get("how", {}).get(name, "delete") for name in removed}
    _remove(model, removed, how, dict(record.get("returns", {})))
    return model


__all__ = ["BlockPlan", "SkippedBlock", "block_influence", "block_loss", "find_blocks", "prune_blocks",
           "replay_blocks"]
