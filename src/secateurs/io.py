"""Weight files without unpickling: safetensors, a sparse form, model factories, and safe output dirs.

A pruned model with its plan is saved and loaded by `checkpoint` (`sc.save`, `sc.load`).

The sparse form stores each mostly-zero tensor as its non-zero values plus a packed
bitmask (1 bit per weight), inside an ordinary safetensors file; dense tensors are
stored as they are. Nothing here unpickles unless the caller passes trust_pickle=True.
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import json
import math
import os
import pickle
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:   # Windows: no flock, so abandoned staging folders are not swept
    fcntl = None

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save
from torch import nn

from .errors import FileProblem, InvalidArgument, WeightsMismatch
from .sparsity import MASK_SUFFIX, set_mask

_SPARSE_KEY = "secateurs.sparse"
_ALIAS_KEY = "secateurs.aliases"
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
SPARSE_WEIGHTS_FILE = "model.sparse.safetensors"


def weights_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as plain weights: masks applied and left out."""
    state = model.state_dict()
    return {k: v for k, v in state.items() if not k.endswith(MASK_SUFFIX)}


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied tensors stored once: (unique tensors, alias name -> stored name)."""
    unique, aliases, owner = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in owner:
            aliases[name] = owner[key]
            continue
        owner[key] = name
        unique[name] = tensor.detach().cpu().contiguous()
    return unique, aliases


def _encode(state: dict[str, torch.Tensor], sparse: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, aliases = _dedupe(state)
    metadata = {_ALIAS_KEY: json.dumps(aliases)} if aliases else {}
    if not sparse:
        return tensors, metadata
    encoded, shapes = {}, {}
    for name, tensor in tensors.items():
        nonzero = tensor != 0
        values = tensor[nonzero]
        # a bitmask costs numel/8 bytes; worth it once it saves more than that in values
        if tensor.is_floating_point() and (tensor.numel() - values.numel()) * tensor.element_size() > tensor.numel() / 8:
            encoded[f"{name}/values"] = values.contiguous()
            encoded[f"{name}/bitmask"] = torch.from_numpy(np.packbits(nonzero.reshape(-1).numpy()))
            shapes[name] = list(tensor.shape)
        else:
            encoded[name] = tensor
    metadata[_SPARSE_KEY] = json.dumps(shapes)
    return encoded, metadata


def _metadata_entry(metadata: dict[str, str], key: str, schema: Any) -> dict[str, Any]:
    """One JSON entry of the file's metadata, checked against `schema` (a pydantic type)."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(schema).validate_json(metadata.get(key, "{}"))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise FileProblem(f"metadata {key}{' at ' + where if where else ''}: {first['msg']}") from None


def _sparse_schemas() -> tuple[Any, Any]:
    from typing import Annotated

    from pydantic import Field, StrictInt, StrictStr

    name = Annotated[StrictStr, Field(min_length=1)]
    return dict[name, list[Annotated[StrictInt, Field(ge=0)]]], dict[name, name]


def _densify(name: str, tensors: dict[str, torch.Tensor], shape: list[int]) -> torch.Tensor:
    """One sparse tensor made dense again, after checking its parts agree (so nothing allocates
    more than the file's own bitmask vouches for)."""
    values, bits = tensors.get(f"{name}/values"), tensors.get(f"{name}/bitmask")
    if values is None or bits is None:
        raise FileProblem(f"sparse tensor {name!r} lacks its values or bitmask")
    numel = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (numel + 7) // 8:
        raise FileProblem(f"sparse tensor {name!r}: a bitmask of {bits.numel()} bytes does not fit shape {shape}")
    mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))
    if values.dim() != 1 or values.numel() != int(mask.sum()):
        raise FileProblem(f"sparse tensor {name!r}: {values.numel()} values for {int(mask.sum())} non-zeros")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[mask] = values
    return dense.reshape(shape)


def _decode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """The state `_encode` stored; FileProblem when the metadata does not describe the tensors."""
    metadata = metadata or {}
    shapes_schema, aliases_schema = _sparse_schemas()
    shapes = _metadata_entry(metadata, _SPARSE_KEY, shapes_schema)
    aliases = _metadata_entry(metadata, _ALIAS_KEY, aliases_schema)
    state = {k: v for k, v in tensors.items() if k.rsplit("/", 1)[0] not in shapes}
    for name, shape in shapes.items():
        state[name] = _densify(name, tensors, shape)
    for alias, stored in aliases.items():
        if stored not in state:
            raise FileProblem(f"alias {alias!r} points to {stored!r}, which the file does not hold")
        state[alias] = state[stored]
    return state


def dense_bytes(model: nn.Module) -> int:
    """Size of the model's weights as a plain safetensors file."""
    tensors, metadata = _encode(weights_state(model), sparse=False)
    return len(st_save(tensors, metadata=metadata))


def sparse_bytes(model: nn.Module) -> int:
    """Size of the model's weights in secateurs' sparse safetensors form."""
    tensors, metadata = _encode(weights_state(model), sparse=True)
    return len(st_save(tensors, metadata=metadata))


def save_weights(model: nn.Module, path: str | os.PathLike, sparse: bool = False) -> None:
    tensors, metadata = _encode(weights_state(model), sparse=sparse)
    save_file(tensors, str(path), metadata=metadata)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return _decode(load_file(str(path)), metadata)


def load_state(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a weights file: safetensors (dense or sparse), or a torch file of plain tensors.

    Torch files are read with weights_only=True; one that holds other pickled objects
    is refused unless `trust_pickle` is true, because unpickling runs arbitrary code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileProblem(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            try:
                state = _read_safetensors(path)
            except FileProblem as exc:
                raise FileProblem(f"{path} is not a weights file secateurs wrote: {exc}") from None
        else:
            state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        raise FileProblem(
            f"{path} holds pickled objects besides tensors; refusing to unpickle it "
            f"(pass trust_pickle=True, CLI --trust-pickle, only for files you trust): "
            f"{str(exc).splitlines()[0]}") from None
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise FileProblem(f"cannot read weights file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FileProblem(f"{path} does not hold a state dict of tensors")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load `state` into `model`, or raise WeightsMismatch naming what does not fit.

    Masks saved in the state (``*_prune_mask``) are re-attached to the model first.
    """
    masks = {k: v for k, v in state.items() if k.endswith(MASK_SUFFIX)}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(MASK_SUFFIX)]
    unexpected = [k for k in state if k not in own and k not in masks]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise WeightsMismatch(f"{source} do not match the model: " + "; ".join(problems))
    for key, mask in masks.items():
        module_name, _, buffer = key.rpartition(".")
        module = model.get_submodule(module_name)
        set_mask(module, buffer[: -len(MASK_SUFFIX)], mask)
    model.load_state_dict(state, strict=False)


def import_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable named by "package.module:factory"."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgument(f"model factory must look like 'package.module:function', got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise InvalidArgument(f"model factory {spec!r}: {module_name!r} is not a module name (a dotted Python name "
                              "importable from the current folder, not a path)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(f"cannot import module {module_name!r} of factory {spec!r}: {exc}") from None
    except Exception as exc:   # noqa: BLE001 - the user's module ran and failed: their code, one line
        raise InvalidArgument(f"importing {module_name!r} of factory {spec!r} raised {_one_line(exc)}") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise InvalidArgument(f"module {module_name!r} has no attribute {attr!r} (factory {spec!r})")
    if not callable(factory):
        raise InvalidArgument(f"factory {spec!r} is not callable")
    return factory


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def build_model(spec: str) -> nn.Module:
    """The model the factory named by `spec` builds; InvalidArgument when it raises or returns something else."""
    factory = import_factory(spec)
    try:
        model = factory()
    except Exception as exc:   # noqa: BLE001 - the user's code: one line, as theirs, not a secateurs crash
        raise InvalidArgument(f"your factory {spec!r} raised {_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def check_output_dir(out_dir: str | os.PathLike, inputs: list[str | os.PathLike], overwrite: bool = False) -> Path:
    """Refuse an output directory that holds an input, or is not empty without `overwrite`."""
    out = Path(out_dir).resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == out or out in path.parents:
            raise FileProblem(f"output directory {out_dir} would overwrite input {item}")
    if out.exists() and not out.is_dir():
        raise FileProblem(f"output path {out_dir} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileProblem(f"output directory {out_dir} is not empty (pass --overwrite to replace its files)")
    return out


# Beside every staging folder, a lock file (`<folder>.owner.json`) its process holds an
# exclusive flock on while the folder is in use. The kernel drops the lock when the process
# dies however it dies (SIGKILL, a lost session), so a later run that can take the lock
# knows the folder is abandoned and removes it, however young; across containers and PID
# namespaces too, where a pid means nothing. The record is locked before it gets its name,
# so no sweeper can find it unlocked. Beside, not inside: the folder must stay empty for
# nested outputs. Without flock (Windows) nothing is swept and nothing is locked.
OWNER_SUFFIX = ".owner.json"


def _lock(fd: int, wait: bool) -> bool:
    """Take an exclusive flock on `fd`; False when another process holds it (and not `wait`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _owner_record() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()


def sweep_dead_stages(parent: str | os.PathLike) -> list[Path]:
    """Remove the staging folders in `parent` whose owner has gone (its lock is free); returns them.

    Only folders with an unlocked owner record beside them are touched, so nothing a
    user made and nothing in use is.
    """
    removed: list[Path] = []
    if fcntl is None:
        return removed
    for record in Path(parent).glob(".secateurs-*" + OWNER_SUFFIX):
        try:
            fd = os.open(record, os.O_RDONLY)
        except OSError:
            continue   # gone meanwhile, or unreadable: leave it alone
        try:
            if not _lock(fd, wait=False):
                continue   # its owner is alive
            stage = record.with_name(record.name[:-len(OWNER_SUFFIX)])
            shutil.rmtree(stage, ignore_errors=True)
            record.unlink(missing_ok=True)
            removed.append(stage)
        finally:
            os.close(fd)
    return removed


def _locked_record(record: Path) -> int:
    """A file descriptor holding the flock of `record`, created locked under a temporary name first."""
    fd, temporary = tempfile.mkstemp(prefix=".lock-", dir=record.parent)
    _lock(fd, wait=True)   # a fresh file nobody else has opened: immediate
    os.write(fd, _owner_record())
    os.replace(temporary, record)
    return fd


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.secateurs-lock"


def _take(path: Path) -> int | None:
    """A file descriptor holding the flock of `path`, or None while another process holds it."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        if not _lock(fd, wait=False):
            os.close(fd)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)   # its holder removed it between our open and our lock: take the new one


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the output folder `out_dir` for the block: a second secateurs
    process writing there gets FileProblem at once instead of mixing its files with ours.

    The lock is a file beside the folder (`.<name>.secateurs-lock`), removed on the way out.
    """
    out = Path(out_dir).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileProblem(f"cannot create the parent of output folder {out_dir}: {exc.strerror or exc}") from None
    if fcntl is None:
        yield out
        return
    path = _lock_path(out)
    try:
        fd = _take(path)
    except OSError as exc:
        raise FileProblem(f"cannot lock output folder {out_dir}: {exc.strerror or exc}") from None
    if fd is None:
        try:
            holder = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        who = f" (pid {holder['pid']} on {holder.get('host')})" if isinstance(holder, dict) and "pid" in holder else ""
        raise FileProblem(f"output folder {out_dir} is being written by another secateurs process{who}; "
                          "wait for it to finish or choose another folder")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, _owner_record())
        yield out
    finally:
        path.unlink(missing_ok=True)   # before unlocking, so a waiter never locks a file about to vanish
        os.close(fd)


# What a full disk, a read-only filesystem or a folder the user may not write report: not a bug
_UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def staged_output(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory whose files move into `out_dir` only if the block succeeds.

    Staging folders left beside `out_dir` by killed runs are removed first. `out_dir` is
    locked (`output_lock`) while its files move, so two writers never interleave.
    """
    out = Path(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_dead_stages(out.parent)
        stage = Path(tempfile.mkdtemp(prefix=".secateurs-", dir=out.parent))
    except OSError as exc:
        raise FileProblem(f"cannot write beside output folder {out_dir}: {exc.strerror or exc}") from None
    record = stage.with_name(stage.name + OWNER_SUFFIX)
    fd = None
    try:
        if fcntl is not None:
            fd = _locked_record(record)
        yield stage
        with output_lock(out):
            _move_into(stage, out)
    except OSError as exc:
        if exc.errno not in _UNWRITABLE:
            raise
        raise FileProblem(f"cannot write output folder {out_dir}: {exc.strerror}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if fd is not None:
            record.unlink(missing_ok=True)
            os.close(fd)   # releases the lock


def _move_into(stage: Path, out: Path) -> None:
    """Every file of `stage` renamed into `out`, with the permissions the user's umask gives."""
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise FileProblem(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    umask = os.umask(0)
    os.umask(umask)
    for item in stage.iterdir():
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)  # folders need their x bit
        os.replace(item, out / item.name)


__all__ = ["load_state", "load_into", "save_weights", "dense_bytes", "sparse_bytes"]


def __getattr__(name: str):
    """`secateurs.io.save` / `load` moved to `secateurs.checkpoint` (plans live there, not in the file layer)."""
    if name in ("save", "load"):
        import importlib
        import warnings

        warnings.warn(f"secateurs.io.{name} moved to secateurs.checkpoint.{name} (also secateurs.{name})",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(".checkpoint", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
