"""The rehearsal: cut a data-free copy of the model and run it on fake tensors before the model is touched.

A model can hold widths the graph does not show (Phi-3 slices its fused q/k/v projection
with bounds read from its config): such a model fails here, while the user's model is
still whole.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import IncompatibleLayer
from ..graph.groups import Group
from ..graph.trace import _leaves, _split_inputs, fake_on_cpu
from .cut import apply_cut


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device (no memory, no data)."""
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def rehearse(model: nn.Module, example_inputs: Any, keeps: dict[tuple[str, int], torch.Tensor],
              heads: list[tuple[Group, int]], shapes: list[tuple[int, ...]], fake: bool) -> None:
    """Cut a data-free copy of `model` and run it on fake tensors; raise if the cut would break it.

    A model can hold widths the graph does not show (Phi-3 slices its fused q/k/v
    projection with bounds read from its config): such a model fails here, while the
    user's model is still whole. Models the tracer could only run for real (data-
    dependent control flow) are rehearsed on a real copy instead.
    """
    rehearsal = skeleton(model) if fake else copy.deepcopy(model)
    try:
        apply_cut(rehearsal, keeps, heads)
        args, kwargs = _split_inputs(rehearsal, example_inputs)
        if fake:
            after = _meta_output_shapes(rehearsal, args, kwargs) or _fake_output_shapes(rehearsal, args, kwargs)
        else:
            with torch.no_grad():
                after = [tuple(v.shape) for v in _leaves(rehearsal.eval()(*args, **kwargs))
                         if isinstance(v, torch.Tensor)]
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IncompatibleLayer(f"the cut would break this model ({first}); it was left unchanged: "
                                "leave the failing layers out with ignore=[...]") from None
    if after != shapes:
        raise IncompatibleLayer(f"the cut would change the output shapes {shapes} -> {after}; "
                                "the model was left unchanged: please report it")


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Silence FakeTensorMode's traceback log: a failing rehearsal is reported as one line instead."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _meta_output_shapes(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[int, ...]] | None:
    """Output shapes of the meta-device `model` run on meta copies of the inputs; None where the
    meta device cannot run it (data-dependent ops, tensors made on the CPU inside forward).

    Meta kernels compute shapes with a fraction of FakeTensorMode's overhead per op; a
    failure here is only a reason to try the slower fake run, which then decides.
    """
    flat, spec = pytree.tree_flatten((args, kwargs))
    flat = [v.to("meta") if isinstance(v, torch.Tensor) else v for v in flat]
    args, kwargs = pytree.tree_unflatten(flat, spec)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(*args, **kwargs)
    except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError, AssertionError):
        return None
    finally:
        model.train(was_training)
    return [tuple(v.shape) for v in _leaves(output) if isinstance(v, torch.Tensor)]


def _fake_output_shapes(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[int, ...]]:
    """Output shapes of `model` run under FakeTensorMode, its tensors stood in for by CPU fakes of their
    shapes (as the tracer does: the rehearsal of a GPU model runs the same ops as its CPU twin's)."""
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


__all__ = ["rehearse", "skeleton"]
