"""The rehearsal: cut a data-free copy of the model and run it on fake tensors before the model is touched.

A model can hold widths the graph does not show: a reshape reads `self.hidden_dim`, a
split reads a list of sizes, Phi-3 slices its fused q/k/v projection with bounds read
from its config. The rehearsal finds such widths by evidence: where a cut copy fails,
each integer attribute of the running modules whose value is a width the cut changes is
tried at its cut value, and kept when the copy then runs further (or to the end); the
attribute then serves every module of its class. A group whose cut still breaks the copy
is found by bisection and frozen, with the module, the source line and torch's message,
and the rest is cut: the user's model is touched only by a cut that ran end to end.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from ..errors import IncompatibleLayer
from ..graph.groups import Group
from ..graph.trace import _leaves, _split_inputs, fake_on_cpu
from .cut import apply_cut
from .units import Scored, cut_mask, keeps_of, removed_ids

# At most this many rehearsals to settle one cut (attribute trials and bisection together),
# and at most this many attributes tried against one failure.
MAX_TRIALS = 400
MAX_CANDIDATES = 8

_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, AssertionError)
_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(__file__))


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device (no memory, no data)."""
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


@dataclass
class Failure:
    """Where a rehearsed cut broke the copy."""

    module: str          # the innermost module running ("" is the model itself)
    op: str              # the model's source line that failed, "file:line `code`"
    error: str           # torch's message, first line
    progress: int        # torch calls that ran before it failed: a fix that helps raises it

    def describe(self) -> str:
        where = f"in {self.module or 'the model'}" + (f" at {self.op}" if self.op else "")
        return f"{where}: {self.error}"


@dataclass
class Verdict:
    """A settled cut: what can be cut, the attributes it needs, and the groups frozen."""

    chosen: dict[int, list[int]]
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    frozen: list[dict[str, Any]] = field(default_factory=list)
    trials: int = 0


class _Counter(TorchFunctionMode):
    """Counts torch calls: how far a rehearsal got before it failed."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


class Rehearsal:
    """Cuts of one scored model, rehearsed on data-free copies; learns the width attributes as it goes."""

    def __init__(self, model: nn.Module, example_inputs: Any, scored: Scored):
        self.model, self.example_inputs, self.scored = model, example_inputs, scored
        self.by_index = {g.index: g for g in scored.groups}
        self.shapes = [scored.graph.tensors[i].shape for i in scored.graph.outputs]
        self.learned: set[tuple[type, str]] = set()     # (module class, attribute) that carry widths
        # (module class, attribute, failing line): tried on a module of the class failing there, did not help
        self.unhelpful: set[tuple[type, str, str]] = set()
        self.tried: dict[str, list[str]] = {}           # module -> attributes tried that did not help
        self.trials = 0
        self.modules = dict(model.named_modules())
        self._tensors_by_module: dict[str, set[int]] | None = None   # built at the first failure

    # -- one cut ----------------------------------------------------------------------------
    def run(self, chosen: dict[int, list[int]], search: bool = True) -> tuple[dict[str, dict[str, Any]], Failure | None]:
        """Rehearse `chosen`, fixing width attributes while that lets the copy run further
        (with `search` False, only the attributes already learned are set)."""
        widths = self._width_maps(chosen) if self.learned else None
        attributes = self._learned_attributes(widths) if widths is not None else {}
        failure = self._trial(chosen, attributes)
        if not search:
            return attributes, failure
        if failure is not None and widths is None:
            widths = self._width_maps(chosen)
        while failure is not None and self.trials < MAX_TRIALS:
            better = None
            for module, name, value in self._ranked(failure, self._candidates(failure, widths, attributes)):
                trial_attributes = _merged(attributes, {module: {name: value}})
                after = self._trial(chosen, trial_attributes)
                if after is None or after.progress > failure.progress:
                    better = (module, name, trial_attributes, after)
                    break
                self.tried.setdefault(module, []).append(name)
                self.unhelpful.add((type(self.modules[module]), name, failure.op))
            if better is None:
                break
            module, name, tested, failure = better
            self.learned.add((type(self.modules[module]), name))
            attributes = _merged(self._learned_attributes(widths), tested)
            if attributes != tested:     # the class's other modules too: rehearse what is returned
                failure = self._trial(chosen, attributes)
        return attributes, failure

    def _trial(self, chosen: dict[int, list[int]], attributes: dict[str, dict[str, Any]]) -> Failure | None:
        """Cut a data-free copy to `chosen`, set `attributes`, run it: None when its outputs keep their shapes."""
        self.trials += 1
        keeps = keeps_of(self.scored.analysis, self.by_index, chosen)
        heads = [(self.by_index[gi], len(p)) for gi, p in chosen.items() if p and self.by_index[gi].kind == "head"]
        fake = self.scored.graph.fake
        copy_ = skeleton(self.model) if fake else copy.deepcopy(self.model)
        stack: list[str] = []
        counter = _Counter()
        try:
            apply_cut(copy_, keeps, heads)
            for module_name, changes in attributes.items():
                owner = copy_.get_submodule(module_name) if module_name else copy_
                for name, value in changes.items():
                    setattr(owner, name, value)
            args, kwargs = _split_inputs(copy_, self.example_inputs)
            # meta kernels settle a cut that works at a fraction of the fake run's cost; a cut
            # that fails there is run again on fakes, which name the module and line
            quick = _meta_output_shapes(copy_, args, kwargs) if fake else None
            if quick is not None and quick == self.shapes:
                return None
            handles = _track_modules(copy_, stack)
            try:
                with counter:
                    after = _fake_output_shapes(copy_, args, kwargs) if fake else _real_shapes(copy_, args, kwargs)
            finally:
                for handle in handles:
                    handle.remove()
        except _ERRORS as exc:
            text = str(exc).strip()
            return Failure(stack[-1] if stack else "", _model_line(exc),
                           text.splitlines()[0] if text else type(exc).__name__, counter.calls)
        if after != self.shapes:
            return Failure("", "", f"the output shapes would change {self.shapes} -> {after}", counter.calls + 1)
        return None

    # -- width attributes ---------------------------------------------------------------------
    def _width_maps(self, chosen: dict[int, list[int]]) -> "_Widths":
        analysis = self.scored.analysis
        gone = cut_mask(analysis, removed_ids(self.by_index, chosen, self.scored.unit_ids))
        if self._tensors_by_module is None:
            self._tensors_by_module = _tensors_by_module(self.scored)
        return _Widths(self.scored, self._tensors_by_module, gone)

    def _candidate_value(self, value: Any, widths: dict[int, int]) -> Any:
        """`value` at its cut width(s), or None where no width it holds is cut."""
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return widths.get(value)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in value):
            if not any(v in widths for v in value):
                return None
            return type(value)(widths.get(v, v) for v in value)
        return None

    def _candidates(self, failure: Failure, widths: "_Widths",
                    attributes: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str, Any]]:
        """(module, attribute, cut value) for the running modules, innermost first, not yet set."""
        names = failure.module.split(".") if failure.module else []
        chain = [".".join(names[:k]) for k in range(len(names), -1, -1)]
        for module_name in chain:
            module = self.modules.get(module_name)
            if module is None or _is_torch_layer(module):
                continue
            for name, value in list(vars(module).items()):
                if name.startswith("__") or name in attributes.get(module_name, {}) or name == "training" \
                        or (type(module), name, failure.op) in self.unhelpful:
                    continue
                new = widths.split_sizes(module_name, value) or self._candidate_value(value, widths.get(module_name, {}))
                if new is not None:
                    yield module_name, name, new

    def _ranked(self, failure: Failure, candidates: Iterator[tuple[str, str, Any]]) -> list[tuple[str, str, Any]]:
        """The candidates whose dense value torch's message names (a shape it could not use) first,
        at most MAX_CANDIDATES of them."""
        named = {int(n) for n in re.findall(r"\d+", failure.error)}

        def named_first(candidate: tuple[str, str, Any]) -> bool:
            dense = getattr(self.modules[candidate[0]], candidate[1])
            return not any(v in named for v in (dense if isinstance(dense, (list, tuple)) else [dense]))

        return sorted(candidates, key=named_first)[:MAX_CANDIDATES]

    def _learned_attributes(self, widths: "_Widths") -> dict[str, dict[str, Any]]:
        """The learned width attributes, at their cut values, on every module of their class."""
        found: dict[str, dict[str, Any]] = {}
        if not self.learned:
            return found
        for module_name, module in self.modules.items():
            for cls, name in self.learned:
                if type(module) is cls and hasattr(module, name):
                    value = getattr(module, name)
                    new = widths.split_sizes(module_name, value) or \
                        self._candidate_value(value, widths.get(module_name, {}))
                    if new is not None:
                        found.setdefault(module_name, {})[name] = new
        return found

    # -- settling: freeze what cannot be cut ---------------------------------------------------
    def settle(self, chosen: dict[int, list[int]]) -> Verdict:
        """The cut of `chosen` that runs: its attributes, and each group that had to be frozen and why."""
        active = {gi: p for gi, p in chosen.items() if p}
        frozen: list[dict[str, Any]] = []
        attributes, failure = self.run(active)
        while failure is not None and active and self.trials < MAX_TRIALS:
            culprit, cause = self._culprit(active, failure)
            frozen.append(self._record(culprit, cause))
            del active[culprit]
            frozen += self._freeze_alike(active, culprit)
            attributes, failure = self.run(active) if active else ({}, None)
        if failure is not None:
            frozen.extend(self._record(gi, failure) for gi in active)
            active, attributes = {}, {}
        return Verdict(active, attributes, frozen, self.trials)

    def _freeze_alike(self, active: dict[int, list[int]], culprit: int) -> list[dict[str, Any]]:
        """Test the groups like `culprit` (same kind, same module class: the other blocks of a
        stack) one by one on top of the rest, freezing those that break it; removes them from
        `active`. One rehearsal per such group instead of a bisection each."""
        alike = [gi for gi in active if self._alike(gi, culprit)]
        if not alike:
            return []
        base = {gi: p for gi, p in active.items() if gi not in alike}
        if base and self.run(base)[1] is not None:
            return []     # the rest breaks too: leave it to the bisection
        frozen = []
        for gi in alike:
            _, failed = self.run({**base, gi: active[gi]}, search=False)
            if failed is None:
                base[gi] = active[gi]
            else:
                frozen.append(self._record(gi, failed))
                del active[gi]
        return frozen

    def _alike(self, index: int, other: int) -> bool:
        a, b = self.by_index[index], self.by_index[other]
        modules = [self.modules.get(_common_module([n for n, _ in g.members])) for g in (a, b)]
        return a.kind == b.kind and len(a.members) == len(b.members) and type(modules[0]) is type(modules[1])

    def _culprit(self, active: dict[int, list[int]], failure: Failure) -> tuple[int, Failure]:
        """A group whose cut breaks the copy: the last of the shortest failing prefix of `active`.

        Groups with a member inside the failing module come last, so the prefix search
        follows the failing op back to its groups first.
        """
        inside = failure.module
        order = sorted(active, key=lambda gi: bool(inside) and any(
            n.startswith(inside + ".") for n, _ in self.by_index[gi].members))
        low, high, cause = 1, len(order), failure
        while low < high:
            mid = (low + high) // 2
            _, failed = self.run({gi: active[gi] for gi in order[:mid]})
            if failed is None:
                low = mid + 1
            else:
                high, cause = mid, failed
        return order[high - 1], cause

    def _record(self, index: int, failure: Failure) -> dict[str, Any]:
        group = self.by_index[index]
        module = _common_module([n for n, _ in group.members])
        tried = sorted(set(self.tried.get(failure.module, [])))
        return {"group": index, "kind": group.kind, "module": module, "members": [f"{n}:{d}" for n, d in group.members],
                "failed_in": failure.module, "op": failure.op, "error": failure.error,
                "attributes_tried": tried, "remedy": _remedy(group, module)}


class _Widths:
    """Module -> {dense width: cut width} over the tensors its ops (and its submodules') read and
    write, computed on demand: the widths a cut changes where each module can see them."""

    def __init__(self, scored: Scored, tensors_by_module: dict[str, set[int]], gone: np.ndarray):
        analysis = scored.analysis
        self.graph, self.table, self.tensors_by_module = scored.graph, analysis.dims, tensors_by_module
        self.kept = np.concatenate([[0], np.cumsum(~gone[analysis.component])])
        self.pairs: dict[int, list[tuple[int, int]]] = {}
        self.maps: dict[str, dict[int, int]] = {}

    def _changed(self, t: int) -> list[tuple[int, int]]:
        if t not in self.pairs:
            table, kept, pairs = self.table, self.kept, []
            for d, size in enumerate(self.graph.tensors[t].shape):
                i = table.ids[(t, d)]
                new = int(kept[table.offsets[i + 1]] - kept[table.offsets[i]])
                if new != size:
                    pairs.append((size, new))
            self.pairs[t] = pairs
        return self.pairs[t]

    def split_sizes(self, module: str, value: Any) -> list[int] | tuple[int, ...] | None:
        """A list of sizes that a split inside `module` used, at the widths the cut leaves each part."""
        if not isinstance(value, (list, tuple)) or len(value) < 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return None
        for op in self.graph.ops:
            if op.name.split(".")[1:2] != ["split_with_sizes"] or list(op.args[1]) != list(value):
                continue
            if op.module != module and not op.module.startswith(module + ".") and module:
                continue
            dim = op.args[2] if len(op.args) > 2 else 0
            sizes = []
            for t in op.outputs:
                rank = len(self.graph.tensors[t].shape)
                i = self.table.ids[(t, dim % rank)]
                sizes.append(int(self.kept[self.table.offsets[i + 1]] - self.kept[self.table.offsets[i]]))
            if sizes != list(value):
                return type(value)(sizes)
        return None

    def get(self, module: str, default: Any = None) -> dict[int, int]:
        if module not in self.maps:
            votes: dict[int, dict[int, int]] = {}
            for t in self.tensors_by_module.get(module, ()):
                for size, new in self._changed(t):
                    votes.setdefault(size, {}).setdefault(new, 0)
                    votes[size][new] += 1
            self.maps[module] = {size: max(news, key=news.get) for size, news in votes.items()}
        return self.maps[module]


def _remedy(group: Group, module: str) -> str:
    if group.kind == "head":
        return 'units=("channel",) keeps every head whole'
    return f"ignore={[module or group.members[0][0]]!r} leaves this group out"


def _common_module(names: list[str]) -> str:
    parents = [n.rpartition(".")[0] for n in names]
    prefix = parents[0]
    while prefix and not all(p == prefix or p.startswith(prefix + ".") for p in parents):
        prefix = prefix.rpartition(".")[0]
    return prefix


def _merged(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, {}).update(v)
    return out


def _is_torch_layer(module: nn.Module) -> bool:
    """torch.nn's own layers: surgery keeps their sizes (in_features, groups, num_heads...) right."""
    return type(module).__module__.startswith("torch.nn.")


def _tensors_by_module(scored: Scored) -> dict[str, set[int]]:
    """Module -> the tensor nodes read or written by ops run inside it (or inside its submodules)."""
    found: dict[str, set[int]] = {}
    for op in scored.graph.ops:
        parts = op.module.split(".") if op.module else []
        tensors = op.inputs + op.outputs
        for k in range(len(parts) + 1):
            found.setdefault(".".join(parts[:k]), set()).update(tensors)
    return found


def _track_modules(model: nn.Module, stack: list[str]) -> list[Any]:
    """Hooks that keep `stack` the names of the running modules, innermost last (left as is by a failure)."""
    def enter(name: str) -> Any:
        return lambda module, args: stack.append(name)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    return handles


def _model_line(exc: BaseException) -> str:
    """The last line of the model's own code (not torch's, not ours) that the error went through."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_OWN_DIR)]
    if not frames:
        return ""
    frame = frames[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`"


def describe_frozen(frozen: list[dict[str, Any]]) -> str:
    """One line per frozen group: its module, where the cut broke the copy, and the remedy."""
    lines = []
    for f in frozen:
        where = f"in {f['failed_in'] or 'the model'}" + (f" at {f['op']}" if f["op"] else "")
        tried = f" (width attributes tried: {', '.join(f['attributes_tried'])})" if f["attributes_tried"] else ""
        lines.append(f"{f['kind']} group {f['group']} of {f['module'] or 'the model'} ({len(f['members'])} "
                     f"members) breaks the model {where}: {f['error']}{tried}; {f['remedy']}")
    return "\n".join(lines)


def refusal(frozen: list[dict[str, Any]]) -> IncompatibleLayer:
    """The one-line error when nothing can be cut: the first group's failure and the remedies."""
    first = frozen[0]
    where = f"in {first['failed_in'] or 'the model'}" + (f" at {first['op']}" if first["op"] else "")
    heads = all(f["kind"] == "head" for f in frozen)
    modules = sorted({f["module"] or f["members"][0].rpartition(":")[0] for f in frozen})
    remedy = 'try units=("channel",), which keeps heads whole' if heads else \
        f"leave the failing layers out with ignore={modules[:8]!r}"
    tried = f" (width attributes tried: {', '.join(first['attributes_tried'])})" if first["attributes_tried"] else ""
    return IncompatibleLayer(f"the cut would break this model {where}: {first['error']}{tried}; it was left "
                             f"unchanged: {len(frozen)} group(s) break it and nothing else was chosen; {remedy}")


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Silence FakeTensorMode's traceback log: a failing rehearsal is reported as one line instead."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _real_shapes(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[int, ...]]:
    with torch.no_grad():
        return [tuple(v.shape) for v in _leaves(model.eval()(*args, **kwargs)) if isinstance(v, torch.Tensor)]


def _meta_output_shapes(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[int, ...]] | None:
    """Output shapes of the meta-device `model` run on meta copies of the inputs; None where the
    meta device cannot run it (data-dependent ops, tensors made on the CPU inside forward)."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    flat = [v.to("meta") if isinstance(v, torch.Tensor) else v for v in flat]
    args, kwargs = pytree.tree_unflatten(flat, spec)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(*args, **kwargs)
    except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError, AssertionError, KeyError,
            AttributeError):
        return None
    finally:
        model.train(was_training)
    return [tuple(v.shape) for v in _leaves(output) if isinstance(v, torch.Tensor)]


def _fake_output_shapes(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[int, ...]]:
    """Output shapes of `model` run under FakeTensorMode, its tensors stood in for by CPU fakes of their
    shapes (as the tracer does: a GPU model's rehearsal runs the same ops as its CPU twin's)."""
    with _quiet_fake_tensor_log(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        state = {n: torch.empty(t.shape, dtype=t.dtype, device="cpu")
                 for n, t in list(model.named_parameters(remove_duplicate=False))
                 + list(model.named_buffers(remove_duplicate=False))}
        flat, spec = pytree.tree_flatten((args, kwargs))
        flat = [fake_on_cpu(mode, v) if isinstance(v, torch.Tensor) else v for v in flat]
        args, kwargs = pytree.tree_unflatten(flat, spec)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = torch.func.functional_call(model, state, args, kwargs, tie_weights=False, strict=False)
        finally:
            model.train(was_training)
    return [tuple(v.shape) for v in _leaves(output) if isinstance(v, torch.Tensor)]


__all__ = ["MAX_TRIALS", "Failure", "Rehearsal", "Verdict", "describe_frozen", "refusal", "skeleton"]
