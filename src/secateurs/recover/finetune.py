"""A ready-made fine-tune loop for the common case, with masks kept in place."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import LossFn, eval_mode, model_device, split_batch, to_device
from ..errors import InvalidArgument
from ..sparsity import keep_sparse
from .distributed import mean_over_ranks, parallel_training, resolve_parallel

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
    parallel: str | None = "auto",
) -> list[float]:
    """Train `model` on `data` for `epochs`; pruned weights stay exactly zero.

    `penalty()` is added to the loss (see SparsityPenalty); `on_step(step)` runs after
    each optimizer step (pass `AGP(...).step` for gradual pruning). Returns the mean
    loss of each epoch (over all ranks under torchrun).

    Under torchrun `parallel` picks how a plain model trains on all processes: "auto"
    (DDP), "ddp" or "fsdp" (FSDP2), or None (each rank alone); a model already wrapped in
    DDP or sharded with `fully_shard` trains as it is. See `secateurs.recover.distributed`.
    """
    if optimizer not in OPTIMIZERS:
        raise InvalidArgument(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if epochs < 0:
        raise InvalidArgument(f"epochs must be >= 0, got {epochs}")
    check_hooks_follow(model, parallel, penalty=penalty, on_step=on_step)
    with parallel_training(model, parallel, data) as (trainee, batches):
        return _train(trainee, batches, epochs, OPTIMIZERS[optimizer], lr, weight_decay, loss_fn, penalty, on_step)


def check_hooks_follow(model: nn.Module, parallel: str | None, **hooks: Any) -> None:
    """Refuse hooks bound to `model` when FSDP2 would train a sharded copy of it instead."""
    given = [name for name, hook in hooks.items() if hook is not None]
    if given and resolve_parallel(parallel, model) == "fsdp":
        raise InvalidArgument(f"{' and '.join(given)} would act on the unsharded model while parallel='fsdp' trains "
                              f"a sharded copy; shard the model yourself (fully_shard) and build them on it")


def _train(model: nn.Module, data: Iterable[Any], epochs: int, make_optimizer: Callable, lr: float,
           weight_decay: float, loss_fn: LossFn, penalty: Callable[[], torch.Tensor] | None,
           on_step: Callable[[int], Any] | None) -> list[float]:
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], lr, weight_decay)
    keeper = keep_sparse(opt, model)
    device = model_device(model)
    was_training = model.training
    model.train()
    totals, counts, step = [], [], 0
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
            totals.append(total)
            counts.append(batches)
    finally:
        keeper.remove()
        model.train(was_training)
    return mean_over_ranks(totals, counts, model)


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
