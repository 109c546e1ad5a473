"""What the front doors check about a model and its example input before tracing or cutting.

Each problem a user can hand in by mistake (a DataParallel wrapper, weights still on the
meta device, a string for an example, an input of the wrong shape, a model with nothing
to prune) becomes one InvalidArgument line instead of an error deep inside torch.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .batches import eval_mode
from .errors import InvalidArgument

_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def check_model(model: Any, traced: bool = True) -> None:
    """`model` is an nn.Module with real weights and something to prune; a `traced` one (structured
    pruning follows its graph) is not wrapped in DataParallel, which torch's tracing refuses."""
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if traced and isinstance(model, _WRAPPERS):
        raise InvalidArgument(f"model is wrapped in {type(model).__name__}: prune model.module (the model inside), "
                              "then wrap it again")
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_meta for t in tensors):
        raise InvalidArgument("the model has weights on the meta device (shapes without data): materialize them "
                              "first, e.g. model.to_empty(device='cpu') and load_state_dict(...)")
    if not any(True for _ in model.parameters()):
        raise InvalidArgument(f"the model ({type(model).__name__}) has no parameters: nothing to prune")


def _check_example_type(example: Any) -> None:
    if isinstance(example, torch.Tensor) and example.dim() == 0:
        raise InvalidArgument("example_inputs is a single number (a 0-d tensor); give it a batch dimension")
    if not isinstance(example, (torch.Tensor, tuple, list, dict)) or (not isinstance(example, torch.Tensor)
                                                                       and not example):
        raise InvalidArgument(f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword inputs, "
                              f"got {type(example).__name__}")


def _describe(example: Any) -> str:
    if isinstance(example, torch.Tensor):
        return f"of shape {tuple(example.shape)}"
    return f"({type(example).__name__})"


def check_example(model: nn.Module, example: Any) -> None:
    """`example` is an input `model` runs on (one forward, no gradients); the model's own error, in one line, if not."""
    _check_example_type(example)
    args, kwargs = ((), example) if isinstance(example, dict) else (
        (tuple(example) if isinstance(example, (tuple, list)) else (example,)), {})
    try:
        with torch.no_grad(), eval_mode(model):
            model(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InvalidArgument(f"your model raised {type(exc).__name__} on example_inputs {_describe(example)}: "
                              f"{first}") from None


__all__ = ["check_example", "check_model"]
