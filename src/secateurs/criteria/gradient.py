"""Gradient-based criteria, accumulated over calibration batches.

- gradient: mean over batches of |dL/dw|.
- taylor: first-order Taylor expansion of the loss change when w is set to zero,
  mean over batches of |w * dL/dw| (Molchanov et al. 2017/2019).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

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


def accumulate_gradients(
    model: nn.Module, targets: list[Target], calibration: Calibration,
    term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Scores:
    """Mean over batches of term(weight, batch gradient) for every target.

    Gradients come from torch.autograd.grad, so the user's .grad fields are untouched.
    """
    params = [t.param for t in targets]
    totals = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    with eval_mode(model), torch.enable_grad(), requiring_grad(params):
        for args, kwargs, labels in calibration.batches(model_device(model)):
            loss = calibration.loss_fn(model(*args, **kwargs), labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for total, p, g in zip(totals, params, grads):
                if g is not None:
                    total += term(p.detach(), g).float()
            count += 1
    if count == 0:
        raise MissingData("the calibration data yielded no batches")
    return {t.name: total / count for t, total in zip(targets, totals)}


class GradientMagnitude(Criterion):
    name = "gradient"
    needs_data = needs_loss = True
    summary = "mean |dL/dw| over batches"

    def compute(self, model: nn.Module, targets: list[Target], calibration: Calibration) -> Scores:
        return accumulate_gradients(model, targets, calibration, lambda w, g: g.abs())


class Taylor(Criterion):
    name = "taylor"
    needs_data = needs_loss = True
    summary = "mean |w * dL/dw| over batches"

    def compute(self, model: nn.Module, targets: list[Target], calibration: Calibration) -> Scores:
        return accumulate_gradients(model, targets, calibration, lambda w, g: (w * g).abs())
