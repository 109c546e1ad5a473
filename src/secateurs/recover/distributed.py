"""Recovery on several processes (torchrun): DDP or FSDP2, with the masks kept on every rank.

Launched with `torchrun --nproc_per_node N`, a script that initializes the default
process group (`torch.distributed.init_process_group`) trains on all N processes:

- `finetune` and `distill` given a model you wrapped yourself (`DistributedDataParallel`,
  or `fully_shard` from FSDP2) train it as it is, on the batches each rank yields.
- Given a plain model, they wrap it for the run (`parallel="ddp"`, the default under
  torchrun, or `"fsdp"`), give each rank its share of a list of batches, and leave the
  same trained model on every rank.

Either way pruned weights stay exactly zero on every rank (see `secateurs.sparsity`:
under FSDP2 each rank masks its own shard), the losses returned are the means over all
ranks, and at the end every rank holds rank 0's buffers (BatchNorm statistics, masks),
so all ranks agree. `save_checkpoint` gathers the full state (masks included) and rank 0
writes it; `load_into` reloads it into a fresh model.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import InvalidArgument
from ..sparsity import masked_params, set_mask

PARALLEL = ("ddp", "fsdp")


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def torchrun_group() -> Iterator[int]:
    """The default process group for the block when launched by torchrun; yields this rank.

    Under torchrun (WORLD_SIZE > 1 in the environment) and with no group yet, one is
    initialized (gloo for CPU tensors, NCCL for CUDA ones) and destroyed on leaving; a group
    already initialized, or a single process, is left as it is.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield world()[0]
        return
    dist.init_process_group("cpu:gloo,cuda:nccl" if dist.is_nccl_available() else "gloo")
    try:
        yield world()[0]
    finally:
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialized."""
    return world()[1] > 1


def _fsdp_module() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def is_wrapped(model: nn.Module) -> bool:
    """True for a DistributedDataParallel model or one sharded with FSDP2's `fully_shard`."""
    fsdp = _fsdp_module()
    return isinstance(model, DistributedDataParallel) or (fsdp is not None and isinstance(model, fsdp))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (an FSDP2 model is its own module)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def resolve_parallel(parallel: str | None, model: nn.Module) -> str | None:
    """How to wrap `model` for training: "ddp", "fsdp", or None (train it as it is).

    None in a single process, for a model already wrapped, and for parallel=None;
    under torchrun "auto" is "ddp".
    """
    if parallel not in ("auto", None, *PARALLEL):
        raise InvalidArgument(f"parallel must be 'auto', 'ddp', 'fsdp' or None, got {parallel!r}")
    if parallel is None or is_wrapped(model) or not is_distributed():
        return None
    return "ddp" if parallel == "auto" else parallel


def shard_batches(data: Sequence[Any], rank: int, size: int) -> list[Any]:
    """Rank `rank`'s share of `data`: every size-th batch, padded from the start so all ranks
    take the same number of steps (as DistributedSampler does; an unequal count would hang)."""
    if not data:
        return []
    per_rank = -(-len(data) // size)
    padded = list(data) + [data[i % len(data)] for i in range(per_rank * size - len(data))]
    return padded[rank::size]


def _broadcast(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite `tensors` on every rank with rank 0's values (bools travel as uint8 for gloo)."""
    with torch.no_grad():
        for tensor in tensors:
            if tensor.dtype == torch.bool:
                carrier = tensor.to(torch.uint8)
                dist.broadcast(carrier, src=0)
                tensor.copy_(carrier.bool())
            else:
                dist.broadcast(tensor.data, src=0)


def broadcast_module(model: nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers (masks included)."""
    _broadcast(list(model.parameters()) + list(model.buffers()))


def sync_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers: BatchNorm statistics drift apart on per-rank batches."""
    if is_distributed():
        _broadcast(list(unwrap(model).buffers()))


def sync_masks(model: nn.Module) -> None:
    """Every rank adopts rank 0's masks and masked weights (after each rank pruned on its own).

    A model whose ranks pruned alike is left unchanged; one whose ranks differ (ties broken
    differently, per-rank calibration data) would otherwise train diverging replicas.
    """
    if not is_distributed():
        return
    for mp in masked_params(unwrap(model)):
        mask = mp.mask.clone()
        # a sharded (FSDP2) weight has no replicas to disagree: each rank masks its own shard
        _broadcast([mask] if _is_sharded(mp.param) else [mask, mp.param])
        set_mask(mp.module, mp.param_name, mask, replace=True)


def mean_over_ranks(totals: list[float], counts: list[int], model: nn.Module) -> list[float]:
    """Per entry, sum(totals) / sum(counts): over all ranks when `model` trains on them all (is wrapped)."""
    if not (is_distributed() and is_wrapped(model)):
        return [t / max(c, 1) for t, c in zip(totals, counts)]
    pairs = torch.tensor([totals, counts], dtype=torch.float64)
    dist.all_reduce(pairs)
    return [float(t / max(c, 1.0)) for t, c in zip(pairs[0].tolist(), pairs[1].tolist())]


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of parameters no wrapper manages (distillation projections) over ranks."""
    size = world()[1]
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad.div_(size)


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """True when some of `model`'s parameters are DTensor shards (FSDP2)."""
    return any(_is_sharded(p) for p in model.parameters())


def _shard(model: nn.Module) -> nn.Module:
    """FSDP2: each module that holds parameters of its own becomes a shard group, then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    return fully_shard(model)


def full_state_dict(model: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's state (masks included), gathered from its shards, on the CPU.

    On rank 0 only (the other ranks get {}), or on every rank with `everywhere`. Keys are
    those of the unwrapped model (no "module." prefix), so `load_into` a plain model takes them.
    """
    if not is_distributed():
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    state = get_model_state_dict(model, options=options)
    return {k: v.detach().cpu() for k, v in state.items()}


@contextlib.contextmanager
def parallel_training(model: nn.Module, parallel: str | None, data: Any) -> Iterator[tuple[nn.Module, Any]]:
    """Yield (model to train, this rank's data) for `resolve_parallel(parallel, model)`.

    "ddp" wraps `model` itself; "fsdp" trains a sharded copy and loads its full state back
    into `model` at the end. A list (or tuple) of batches is split between the ranks; any
    other iterable is taken as this rank's own (a DataLoader with a DistributedSampler).
    On leaving, every rank holds rank 0's buffers.
    """
    mode = resolve_parallel(parallel, model)
    if mode is None:
        yield model, data
        if is_wrapped(model):
            sync_buffers(model)
        return
    rank, size = world()
    if isinstance(data, (list, tuple)):
        data = shard_batches(data, rank, size)
    if mode == "ddp":
        yield DistributedDataParallel(model), data   # broadcasts rank 0's parameters and buffers
        sync_buffers(model)
        return
    sharded = copy.deepcopy(model)
    broadcast_module(sharded)     # fully_shard cuts each rank's own copy: they must agree first
    yield _shard(sharded), data
    model.load_state_dict(full_state_dict(sharded, everywhere=True))
    sync_buffers(model)


# ------------------------------------------------------------------------ checkpoints

def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names and bytes: equal digests, equal checkpoints."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_consistent(model: nn.Module) -> str:
    """The digest of the model's full state, after checking every rank holds the same one.

    Raises InvalidArgument naming the ranks that disagree with rank 0.
    """
    digest = state_digest(full_state_dict(model, everywhere=True))
    if not is_distributed():
        return digest
    digests: list[Any] = [None] * world()[1]
    dist.all_gather_object(digests, digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise InvalidArgument(f"ranks {differ} hold a different model than rank 0 (weights, masks or buffers)")
    return digest


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the whole model's state (masks included) to one safetensors file from rank 0.

    Every rank must call it (the shards are gathered); it returns once the file is complete.
    `secateurs.io.load_into(fresh_model, load_state(path))` reloads it, masks re-attached.
    """
    from safetensors.torch import save_file

    from ..io import _encode

    path = Path(path)
    state = full_state_dict(model)
    if world()[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, metadata = _encode(state, sparse=False)
        partial = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)
    if is_distributed():
        dist.barrier()
    return path


# ------------------------------------------------------------------------ run directories

def rank_output_dir(out: Path, resume: bool) -> Path:
    """Where this rank's copy of a recipe run writes: `out` on rank 0, a private folder elsewhere.

    Every rank runs the whole recipe (the training stages need them all) but only rank 0
    writes the run directory; the others write a throwaway copy (started from the run's
    checkpoints when resuming), removed at exit. Called after every rank has checked `out`.
    """
    if not is_distributed():
        return out
    rank = world()[0]
    private = None
    if rank != 0:
        private = Path(tempfile.mkdtemp(prefix=f".secateurs-rank{rank}-"))
        if resume and out.is_dir():
            shutil.copytree(out, private, dirs_exist_ok=True)
    dist.barrier()   # nobody writes before every rank has read and checked `out`
    if private is None:
        return out
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    return private


__all__ = ["PARALLEL", "broadcast_module", "check_consistent", "full_state_dict", "is_distributed", "is_sharded", "is_wrapped",
           "mean_over_ranks", "parallel_training", "rank_output_dir", "resolve_parallel", "save_checkpoint",
           "shard_batches", "state_digest", "sync_buffers", "sync_masks", "torchrun_group", "unwrap", "world"]
