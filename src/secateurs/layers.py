"""What kind of layer a module is, for the layer types that need more than an isinstance.

transformers' GPT-2 `Conv1D` is a linear layer whose weight is stored [in, out]: every
path (surgery, the structured cut, compensation, the LLM engine) recognises it here and
nowhere else. The check needs no import of transformers: a module can only be a Conv1D
if transformers has been imported already.
"""
from __future__ import annotations

import sys

import torch
from torch import nn


def hf_conv1d_type() -> type | None:
    """transformers' Conv1D class if transformers is loaded, else None."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (GPT-2's linear layer, weight stored [in, out])."""
    conv1d = hf_conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_like(module: nn.Module) -> bool:
    """True for nn.Linear and transformers' Conv1D: the layers an LLM prunes row by row."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in]: a view, transposed for Conv1D ([in, out])."""
    weight = module.weight
    return weight.t() if is_conv1d(module) else weight


def out_features(module: nn.Module) -> int:
    """How many output features a linear-like layer has."""
    if hasattr(module, "out_features"):
        return module.out_features
    return weight_out_in(module).shape[0]


__all__ = ["hf_conv1d_type", "is_conv1d", "is_linear_like", "out_features", "weight_out_in"]
