"""Masks that last: zeros that survive training, copying, saving, compiling and DDP.

A mask is a persistent bool buffer ``<param>_prune_mask`` on the module that owns the
weight, so ``deepcopy``, ``state_dict``, ``.to()`` and DDP's buffer broadcast carry it
with no extra code. Unlike ``torch.nn.utils.prune`` there is no ``weight_orig`` copy
and no forward hook: the weight itself holds the zeros, and `keep_sparse` masks the
gradient before each optimizer step and the weight after it, so momentum, Adam moments
and weight decay never move a pruned weight.

Under FSDP2 (`fully_shard`) a weight, its gradient and its optimizer state are DTensors
holding one shard per rank while the mask stays a whole buffer on every rank; each
in-place masking takes the mask's matching shard (`_like`), so nothing is gathered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import IncompatibleLayer, InvalidArgument

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:   # a torch built without distributed support
    DTensor = distribute_tensor = None

MASK_SUFFIX = "_prune_mask"
_VERSION = "_prune_mask_versions"  # plain module attribute: param name -> times its mask changed


@dataclass(frozen=True)
class MaskedParam:
    """A weight with its mask, as found in a model."""

    name: str            # qualified parameter name
    module: nn.Module
    param_name: str

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.param_name)

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.module, self.param_name + MASK_SUFFIX)


def parse_pattern(pattern: str | tuple[int, int]) -> tuple[int, int]:
    """Parse "2:4" into (n, m): keep n weights in every m consecutive inputs."""
    if isinstance(pattern, tuple):
        n, m = pattern
    else:
        parts = str(pattern).split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise InvalidArgument(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}")
        n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise InvalidArgument(f"pattern {n}:{m} needs 0 < N < M (N weights kept in every M)")
    return n, m


def masked_params(model: nn.Module) -> Iterator[MaskedParam]:
    """Every masked weight in `model`, found by its mask buffer."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        for buffer_name in list(module._buffers):
            if not buffer_name.endswith(MASK_SUFFIX):
                continue
            param_name = buffer_name[: -len(MASK_SUFFIX)]
            if isinstance(getattr(module, param_name, None), torch.Tensor):
                full = f"{module_name}.{param_name}" if module_name else param_name
                yield MaskedParam(full, module, param_name)


def _like(mask: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`mask` laid out as `tensor`: its own shard of it when `tensor` is a sharded DTensor (FSDP2)."""
    if DTensor is not None and isinstance(tensor, DTensor) and not isinstance(mask, DTensor):
        # src_data_rank=None: every rank cuts its shard from its own copy, no communication
        return distribute_tensor(mask, tensor.device_mesh, tensor.placements, src_data_rank=None)
    return mask


def set_mask(module: nn.Module, param_name: str, mask: torch.Tensor, replace: bool = False) -> None:
    """Attach `mask` to ``module.<param_name>`` and zero the weights it removes.

    Masks only grow: an existing mask is intersected with the new one, so a weight
    pruned once stays pruned through iterative and gradual schedules. `replace=True`
    takes `mask` as it is (a rank adopting rank 0's masks).
    """
    param = getattr(module, param_name)
    if mask.shape != param.shape:
        raise InvalidArgument(
            f"mask shape {tuple(mask.shape)} does not match {param_name} {tuple(param.shape)}")
    mask = mask.to(device=param.device, dtype=torch.bool)
    buffer_name = param_name + MASK_SUFFIX
    existing = module._buffers.get(buffer_name)
    if existing is not None and replace:
        existing.copy_(mask)
    elif existing is not None:
        existing.logical_and_(mask)
    else:
        module.register_buffer(buffer_name, mask.clone(), persistent=True)
    with torch.no_grad():
        param.mul_(_like(getattr(module, buffer_name), param))
    versions = module.__dict__.setdefault(_VERSION, {})
    versions[param_name] = versions.get(param_name, 0) + 1


def mask_version(mp: MaskedParam) -> int:
    return mp.module.__dict__.get(_VERSION, {}).get(mp.param_name, 0)


def apply_masks(model: nn.Module) -> None:
    """Zero every masked weight again (after a manual edit of the weights, say)."""
    with torch.no_grad():
        for mp in masked_params(model):
            mp.param.mul_(_like(mp.mask, mp.param))


def mask_grads(model: nn.Module) -> None:
    """Zero the gradients of pruned weights so optimizer state never builds up there."""
    for mp in masked_params(model):
        grad = mp.param.grad
        if grad is not None:
            grad.mul_(_like(mp.mask, grad))


def finalize(model: nn.Module) -> int:
    """Make pruning permanent: drop the mask buffers, leaving plain zeroed weights.

    Returns how many masks were removed. Afterwards the model holds no memory beyond
    its own parameters and loads into a fresh, unpruned instance of its class.
    """
    removed = 0
    apply_masks(model)
    for mp in list(masked_params(model)):
        del mp.module._buffers[mp.param_name + MASK_SUFFIX]
        removed += 1
    return removed


class SparsityKeeper:
    """Optimizer hooks that hold pruned weights at exactly zero. Remove with `.remove()`.

    Before every step the gradients of pruned weights are zeroed. After a step, each
    weight whose mask is new or changed since the last step is masked again and its
    optimizer state (momentum, Adam moments) is zeroed where it is pruned. From then on
    a pruned weight has zero value, gradient and state, and SGD, Adam, AdamW, RMSprop
    and the like leave it at zero, so the weights need no masking on later steps.
    `every_step=True` masks the weights after every step as well (for optimizers that
    move a weight whose gradient and state are zero).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, every_step: bool = False):
        self.model, self.optimizer, self.every_step = model, optimizer, every_step
        self._seen: dict[tuple[int, str], int] = {}
        self._handles = [
            optimizer.register_step_pre_hook(lambda *_: mask_grads(self.model)),
            optimizer.register_step_post_hook(lambda *_: self._after_step()),
        ]

    def _after_step(self) -> None:
        with torch.no_grad():
            for mp in masked_params(self.model):
                key, version = (id(mp.module), mp.param_name), mask_version(mp)
                if not self.every_step and self._seen.get(key) == version:
                    continue
                mask = mp.mask
                mp.param.mul_(_like(mask, mp.param))
                for value in self.optimizer.state.get(mp.param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                        value.mul_(_like(mask, value))
                self._seen[key] = version

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def keep_sparse(optimizer: torch.optim.Optimizer, model: nn.Module, every_step: bool = False) -> SparsityKeeper:
    """Keep `model`'s pruned weights at zero through every step of `optimizer`.

    Call once after building the optimizer, in your own training loop; masks added
    later (gradual pruning) are picked up automatically. See SparsityKeeper.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidArgument(f"keep_sparse needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return SparsityKeeper(optimizer, model, every_step)


def nm_mask(rows: torch.Tensor, n: int, m: int, name: str = "layer") -> torch.Tensor:
    """Bool mask keeping the `n` highest scores in every `m` consecutive entries of each row."""
    width = rows.shape[-1]
    if width % m:
        raise IncompatibleLayer(
            f"{name}: input width {width} is not divisible by M={m} of the {n}:{m} pattern; "
            f"leave it out with ignore=[...] (CLI: --ignore)")
    blocks = rows.reshape(-1, m)
    keep = blocks.topk(n, dim=1).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, keep, True)
    return mask.reshape(rows.shape)


def sparsity_of(model: nn.Module) -> dict[str, float]:
    """Fraction of zeros in each masked weight."""
    return {mp.name: int((~mp.mask).sum()) / mp.mask.numel() for mp in masked_params(model)}
