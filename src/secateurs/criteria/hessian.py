"""Optimal Brain Damage (LeCun et al. 1990): saliency w^2 * H_ii / 2.

The Hessian diagonal is approximated by the empirical Fisher, the mean over calibration
samples of the squared per-sample gradient. Per-sample gradients come from torch.func
(vmap over grad); models vmap cannot handle fall back to one backward pass per sample.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import MissingData
from ..select import Target
from .base import (
    Calibration,
    Criterion,
    Scores,
    eval_mode,
    model_device,
    requiring_grad,
)


def _take(x: Any, i: int) -> Any:
    """Sample i of a batch structure, keeping a batch dimension of one."""
    if isinstance(x, torch.Tensor):
        return x[i:i + 1]
    if isinstance(x, (tuple, list)):
        return type(x)(_take(v, i) for v in x)
    if isinstance(x, dict):
        return {k: _take(v, i) for k, v in x.items()}
    return x


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise MissingData("a calibration batch holds no tensor to take samples from")


def _vmap_squared_grads(model, params, loss_fn, args, labels, chunk_size):
    def loss_one(p, sample_args, label):
        inputs = tuple(a.unsqueeze(0) for a in sample_args)
        return loss_fn(functional_call(model, p, inputs, strict=False), label.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, args, labels)
    return {name: g.float().pow(2).sum(0) for name, g in per_sample.items()}


def _loop_squared_grads(model, params, loss_fn, args, kwargs, labels):
    names, tensors = list(params), list(params.values())
    totals = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for i in range(_batch_size(args, kwargs)):
        out = model(*_take(args, i), **_take(kwargs, i))
        grads = torch.autograd.grad(loss_fn(out, _take(labels, i)), tensors, allow_unused=True)
        for name, g in zip(names, grads):
            if g is not None:
                totals[name] += g.float().pow(2)
    return totals


def empirical_fisher(model: nn.Module, targets: list[Target], calibration: Calibration,
                     chunk_size: int = 32) -> Scores:
    """Mean over samples of the squared per-sample gradient of each target weight."""
    params = {t.name: t.param for t in targets}
    totals = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    samples = 0
    use_vmap = True
    with eval_mode(model), torch.enable_grad(), requiring_grad(params.values()):
        for args, kwargs, labels in calibration.batches(model_device(model)):
            batch = None
            if use_vmap and not kwargs and isinstance(labels, torch.Tensor):
                try:
                    batch = _vmap_squared_grads(model, params, calibration.loss_fn, args, labels, chunk_size)
                except (RuntimeError, ValueError, TypeError, NotImplementedError):
                    use_vmap = False  # an op vmap cannot batch: loop over samples instead
            if batch is None:
                batch = _loop_squared_grads(model, params, calibration.loss_fn, args, kwargs, labels)
            for name in totals:
                totals[name] += batch[name]
            samples += _batch_size(args, kwargs)
    if samples == 0:
        raise MissingData("the calibration data yielded no batches")
    return {name: total / samples for name, total in totals.items()}


class OBD(Criterion):
    name = "obd"
    needs_data = needs_loss = True
    summary = "w^2 * H_ii / 2, H_ii from the empirical Fisher"

    def compute(self, model: nn.Module, targets: list[Target], calibration: Calibration) -> Scores:
        fisher = empirical_fisher(model, targets, calibration)
        return {t.name: 0.5 * t.param.detach().float().pow(2) * fisher[t.name] for t in targets}
