"""A ready-made fine-tune loop for the common case, with masks kept in place."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import LossFn, eval_mode, model_device, split_batch, to_device
from ..errors import InvalidArgument
from ..sparsity import keep_sparse

OPTIMIZERS = {
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
}


def finetune(
    model: nn.Module,
    data: Iterable[Any],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    loss_fn: LossFn = F.cross_entropy,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    penalty: Callable[[], torch.Tensor] | None = None,
    on_step: Callable[[int], Any] | None = None,
) -> list[float]:
    """Train `model` on `data` for `epochs`; pruned weights stay exactly zero.

    `penalty()` is added to the loss (see SparsityPenalty); `on_step(step)` runs after
    each optimizer step (pass `AGP(...).step` for gradual pruning). Returns the mean
    loss of each epoch.
    """
    if optimizer not in OPTIMIZERS:
        raise InvalidArgument(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if epochs < 0:
        raise InvalidArgument(f"epochs must be >= 0, got {epochs}")
    opt = OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad], lr, weight_decay)
    keeper = keep_sparse(opt, model)
    device = model_device(model)
    was_training = model.training
    model.train()
    history, step = [], 0
    try:
        for _ in range(epochs):
            total, batches = 0.0, 0
            for batch in data:
                args, kwargs, targets = split_batch(to_device(batch, device))
                loss = loss_fn(model(*args, **kwargs), targets)
                if penalty is not None:
                    loss = loss + penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if on_step is not None:
                    on_step(step)
                total += float(loss.detach())
                batches += 1
            history.append(total / max(batches, 1))
    finally:
        keeper.remove()
        model.train(was_training)
    return history


def evaluate_accuracy(model: nn.Module, data: Iterable[Any]) -> float:
    """Top-1 accuracy of a classifier over (inputs, labels) batches."""
    correct = seen = 0
    device = model_device(model)
    with torch.no_grad(), eval_mode(model):
        for batch in data:
            args, kwargs, labels = split_batch(to_device(batch, device))
            predictions = model(*args, **kwargs).argmax(dim=-1)
            correct += int((predictions == labels).sum())
            seen += labels.numel()
    return correct / seen if seen else 0.0
