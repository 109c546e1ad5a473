"""Pruning a Hugging Face checkpoint larger than memory: weights stream from safetensors shards.

The model is built as a skeleton whose parameters sit on the meta device (no memory);
buffers are computed as usual, so non-persistent ones such as the rotary `inv_freq`,
which no checkpoint holds, are right. The modules outside the blocks (embeddings, norms,
heads) are mapped from the shards to capture the first block's inputs, then dropped. Each
block in turn is then read, pruned from its calibration inputs, run to give the next
block's inputs, written to its own output shard and dropped, so memory holds one block,
its statistics and the calibration activations, never the model. The tensors outside
the blocks are finally copied through byte for byte, a chunk at a time.

Shards are memory-mapped (`safetensors.safe_open`) and each is closed as soon as the
tensors needed from it are copied out: the pages of a mapping that were read count in
the resident set while it is open, so reading all of a 5 GB shard would cost 5 GB of RSS.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import torch
from torch import nn

from ..errors import FileProblem, InvalidArgument, MissingData, WeightsMismatch
from ..io import check_output_dir, staged_output
from .blocks import BlockLayout, find_block_layout
from .engine import (
    BlockInputs,
    LayerReport,
    LLMConfig,
    LLMPlan,
    as_batch_list,
    cache_off,
    capture_inputs,
    make_config,
    needs_inputs,
    place_inputs,
    prune_block,
    walk_blocks,
)
from .owl import outlier_ratio, spread

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files of a model folder that hold (dense) weights: never copied next to the pruned ones.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json", ".h5.index.json", ".msgpack.index.json")
SHARD_BYTES = 1 << 30  # the most non-block bytes per output shard (a larger tensor gets a shard alone)
_COPY_CHUNK = 64 << 20  # bytes read at a time when tensors are copied through unchanged


# ------------------------------------------------------------------ reading shards

@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in its shard file, as its safetensors header says."""

    dtype: str               # safetensors dtype code: "F32", "BF16", ...
    shape: tuple[int, ...]
    start: int               # byte offsets of its data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _header(path: Path) -> dict[str, StoredTensor]:
    """Tensor name -> where it is stored, from a safetensors header (8-byte length, then JSON)."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > path.stat().st_size - 8:  # garbage, not a header length: never read that much
                raise ValueError(f"header length {length} exceeds the file size")
            header = json.loads(handle.read(length))
        base = 8 + length
        tensors = {k: StoredTensor(v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0],
                                   base + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}
        if tensors and max(t.end for t in tensors.values()) > path.stat().st_size:
            raise ValueError("the file is shorter than its header says (truncated?)")
        return tensors
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise FileProblem(f"cannot read the safetensors header of {path}: {exc}") from None


@dataclass
class Checkpoint:
    """A folder of safetensors weights: which shard holds each tensor, and where in it."""

    folder: Path
    weight_map: dict[str, str]               # tensor name -> shard file name
    tensors: dict[str, StoredTensor]         # tensor name -> dtype, shape, byte range

    @classmethod
    def open(cls, folder: Path) -> "Checkpoint":
        """The checkpoint in `folder` (a sharded index or one model.safetensors), or FileProblem."""
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise FileProblem(f"{index} is not a safetensors index with a weight_map: {exc}") from None
        elif (folder / SINGLE_FILE).is_file():
            weight_map = dict.fromkeys(_header(folder / SINGLE_FILE), SINGLE_FILE)
        else:
            raise FileProblem(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}; streaming needs "
                              f"safetensors weights (re-save the model with save_pretrained)")
        tensors: dict[str, StoredTensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileProblem(f"shard {shard} named in {folder / INDEX_FILE} is missing")
            tensors.update((k, v) for k, v in _header(folder / shard).items() if weight_map.get(k) == shard)
        absent = [k for k in weight_map if k not in tensors]
        if absent:
            raise FileProblem(f"tensors {absent[:3]} are in the index of {folder} but not in their shards")
        return cls(folder, weight_map, tensors)

    @contextlib.contextmanager
    def mapped(self, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
        """The tensors `names` as views of the memory-mapped shards, valid inside the block only."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        with contextlib.ExitStack() as stack:
            tensors = {}
            for shard, members in by_shard.items():
                handle = stack.enter_context(safe_open(str(self.folder / shard), framework="pt"))
                tensors.update((name, handle.get_tensor(name)) for name in members)
            yield tensors

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors `names` copied into memory (as `dtype` if floating); the shards are closed after."""
        names = list(names)
        out = {}
        for shard in dict.fromkeys(self.weight_map[n] for n in names):
            # one shard open at a time, so at most one shard's worth of mapped pages is resident
            with self.mapped([n for n in names if self.weight_map[n] == shard]) as views:
                out.update((n, _cast(v, dtype).clone()) for n, v in views.items())
        return out

    def copy_into(self, names: list[str], path: Path) -> None:
        """Write the tensors `names` into a new safetensors file `path`, byte for byte.

        Read through plain file reads in chunks, not a mapping, so however large the
        tensors (a 32000 x 4096 embedding) the copy costs one chunk of memory.
        """
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            stored = self.tensors[name]
            header[name] = {"dtype": stored.dtype, "shape": list(stored.shape),
                            "data_offsets": [offset, offset + stored.nbytes]}
            offset += stored.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors keeps the data 8-byte aligned
        with path.open("wb") as out:
            out.write(struct.pack("<Q", len(encoded)) + encoded)
            for name in names:
                self._copy_bytes(name, out)

    def _copy_bytes(self, name: str, out: BinaryIO) -> None:
        stored = self.tensors[name]
        with (self.folder / self.weight_map[name]).open("rb") as source:
            source.seek(stored.start)
            left = stored.nbytes
            while left:
                chunk = source.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise FileProblem(f"{self.folder / self.weight_map[name]} ends inside tensor {name}")
                out.write(chunk)
                left -= len(chunk)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


# ------------------------------------------------------------------ the skeleton

@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, every new parameter moves to the meta device as it is registered.

    Buffers stay real, so a module computes its non-persistent buffers (rotary inv_freq,
    position ids) in its constructor as usual; the parameters, which the checkpoint holds,
    cost nothing. (The same idea as accelerate's init_empty_weights(include_buffers=False).)
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(folder: Path) -> nn.Module:
    """The model class named by `folder`/config.json, parameters on the meta device, in eval mode."""
    import transformers

    from ..hf import _model_class

    try:
        hf_config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise FileProblem(f"cannot read {folder / 'config.json'}: {str(exc).splitlines()[0]}") from None
    with _parameters_on_meta():
        model = _model_class(hf_config)(hf_config)
    return model.eval()


def _put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make `tensor` the parameter or buffer `name` of `model` (a new Parameter, no copy)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def _drop(model: nn.Module, names: Iterable[str]) -> None:
    """Send the tensors `names` of `model` back to the meta device, freeing their memory."""
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for name in names:
        _put(model, name, torch.empty_like(state[name], device="meta"))


def _checkpoint_names(model: nn.Module, checkpoint: Checkpoint) -> dict[str, str]:
    """Model tensor name -> its name in the checkpoint, trying the base model prefix both ways.

    A head model's checkpoint may lack its base prefix (a BertModel file loaded as
    BertForMaskedLM) or a base model's may have it; transformers accepts both, so do we.
    Raises WeightsMismatch when a parameter is not in the checkpoint (tied copies excepted).
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    stored = checkpoint.weight_map
    names: dict[str, str] = {}
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        candidates = [name]
        if prefix:
            candidates += [name[len(prefix) + 1:] if name.startswith(prefix + ".") else f"{prefix}.{name}"]
        found = next((c for c in candidates if c in stored), None)
        if found is not None:
            names[name] = found
    missing = [n for n, _ in model.named_parameters() if n not in names]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsMismatch(f"checkpoint {checkpoint.folder} lacks parameters of {type(model).__name__}: "
                              f"{', '.join(missing[:3])}{more}")
    _check_shapes(model, names, checkpoint)
    return names


def _check_shapes(model: nn.Module, names: dict[str, str], checkpoint: Checkpoint) -> None:
    """Raise WeightsMismatch when a stored tensor's shape differs from the model's (before any work)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    wrong = [f"{stored} is {list(checkpoint.tensors[stored].shape)}, expected {list(tensor.shape)}"
             for name, tensor in tensors if (stored := names.get(name)) is not None
             and checkpoint.tensors[stored].shape != tuple(tensor.shape)]
    if wrong:
        more = f" and {len(wrong) - 2} more" if len(wrong) > 2 else ""
        raise WeightsMismatch(f"checkpoint {checkpoint.folder} does not match its config.json: "
                              f"{'; '.join(wrong[:2])}{more}")


# ------------------------------------------------------------------ the output

@dataclass
class _Layout:
    """Which checkpoint tensors go where: per block, and the rest (copied through unchanged)."""

    blocks: list[dict[str, str]]   # per block: model name -> checkpoint name
    outside: dict[str, str]        # model tensors outside the blocks: model name -> checkpoint name
    passthrough: list[str]         # checkpoint names not in any block (outside + unknown), in order


def _split(names: dict[str, str], checkpoint: Checkpoint, blocks_path: str, count: int) -> _Layout:
    blocks: list[dict[str, str]] = [{} for _ in range(count)]
    outside: dict[str, str] = {}
    for model_name, stored in names.items():
        head, _, rest = model_name.partition(blocks_path + ".")
        index = rest.split(".", 1)[0] if not head and rest else ""
        if index.isdigit() and int(index) < count:
            blocks[int(index)][model_name] = stored
        else:
            outside[model_name] = stored
    in_blocks = {s for block in blocks for s in block.values()}
    passthrough = [k for k in checkpoint.weight_map if k not in in_blocks]
    return _Layout(blocks, outside, passthrough)


def _pack(names: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    """`names` in order, cut into groups of at most `limit` bytes (a larger tensor alone)."""
    groups: list[list[str]] = []
    total = limit
    for name in names:
        if total + sizes[name] > limit:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += sizes[name]
    return groups


@dataclass
class _ShardWriter:
    """Writes numbered shards model-0000k-of-0000N.safetensors and, at the end, their index."""

    folder: Path
    count: int
    written: int = 0
    total_size: int = 0
    weight_map: dict[str, str] = dataclasses.field(default_factory=dict)

    def _next(self, names: Iterable[str], nbytes: int) -> Path:
        """The path of the next shard, recorded as holding `names` (`nbytes` in all)."""
        self.written += 1
        name = f"model-{self.written:05d}-of-{self.count:05d}.safetensors"
        self.total_size += nbytes
        self.weight_map.update(dict.fromkeys(names, name))
        return self.folder / name

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write `tensors` as the next shard."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        path = self._next(tensors, sum(t.numel() * t.element_size() for t in tensors.values()))
        save_file(tensors, str(path), metadata={"format": "pt"})

    def copy(self, checkpoint: Checkpoint, names: list[str]) -> None:
        """Copy the stored tensors `names` unchanged into the next shard."""
        checkpoint.copy_into(names, self._next(names, sum(checkpoint.tensors[n].nbytes for n in names)))

    def write_index(self) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _is_weights_file(path: Path) -> bool:
    name = path.name
    return name.endswith(_WEIGHT_INDEXES) or path.suffix in _WEIGHT_SUFFIXES


def _copy_companions(src: Path, stage: Path, dtype: torch.dtype | None) -> None:
    """Copy config, generation config, tokenizer and other non-weight files of `src` into `stage`."""
    for item in src.iterdir():
        if item.name.startswith(".") or _is_weights_file(item):
            continue
        if item.is_dir():
            shutil.copytree(item, stage / item.name, ignore=lambda d, names: [
                n for n in names if _is_weights_file(Path(d) / n)])
        elif item.is_file():
            shutil.copy2(item, stage / item.name)
    if dtype is not None:
        config = json.loads((stage / "config.json").read_text())
        key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
        config[key] = str(dtype).removeprefix("torch.")
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ------------------------------------------------------------------ checking the arguments

def _check_options(dtype: Any, shard_bytes: Any) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidArgument(f"dtype must be None or a floating torch dtype such as torch.float16, got {dtype!r}")
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise InvalidArgument(f"shard_bytes must be a positive integer (bytes per output shard), got {shard_bytes!r}")


# ------------------------------------------------------------------ checking the folders

def _check_folders(src: str | Path, out: str | Path) -> tuple[Path, Path]:
    source = Path(src)
    if not source.is_dir():
        raise FileProblem(f"model folder src={str(src)!r} does not exist or is not a directory")
    if not (source / "config.json").is_file():
        raise FileProblem(f"model folder {src} has no config.json: not a saved Hugging Face model")
    target = Path(out).resolve()
    if source.resolve() in target.parents:
        raise FileProblem(f"output directory {out} is inside the model folder {src}; write it elsewhere")
    return source, check_output_dir(target, [source])


# ------------------------------------------------------------------ the road

def _stream_blocks(model: nn.Module, checkpoint: Checkpoint, layout: _Layout, blocks: BlockLayout,
                   inputs: BlockInputs | None, dtype: torch.dtype | None, device: str | None,
                   visit: Callable[[int, nn.Module, BlockInputs | None], None]) -> list[float]:
    """Read each block in turn from the shards, onload it to `device`, call visit(i, block, inputs),
    run it for the next inputs (if any), drop it."""
    def load(i: int) -> None:
        loaded = checkpoint.read(layout.blocks[i].values(), dtype)
        for model_name, stored in layout.blocks[i].items():
            _put(model, model_name, loaded.pop(stored))

    def unload(i: int) -> None:
        _drop(model, layout.blocks[i])
        _release_freed_memory()

    return walk_blocks(blocks, inputs, visit, device, load=load, unload=unload)


def _release_freed_memory() -> None:
    """Hand the memory freed with a block back to the system (glibc only; elsewhere a no-op).

    glibc keeps freed heap memory for reuse, and tensors of a few MB land on the heap once
    its mmap threshold has risen; the holes they leave between longer-lived objects are not
    returned on their own. Without this, pruning a 45-block LLaMA saw the resident set
    creep from 0.8 to 1.95 GB although no tensor outlived its block (benchmarks/llm_memory.py).
    """
    if sys.platform.startswith("linux"):
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # absent on musl
        if trim is not None:
            trim(0)


def prune_pretrained(src: str | Path, out: str | Path, batches: Iterable[Any], config: LLMConfig | None = None,
                     *, dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES,
                     **overrides: Any) -> LLMPlan:
    """Prune the Hugging Face model saved in `src` block by block, streaming it; write it to `out`.

    Only one block is in memory at a time, so a model larger than RAM can be pruned. `out`
    becomes a folder that plain `from_pretrained` loads: one safetensors shard per block
    plus shards for the other tensors, the index, and src's config, generation config and
    tokenizer files. `dtype` (say torch.float16) is the dtype the blocks are pruned and
    written in; None keeps the checkpoint's. Nothing is written to `out` unless the whole
    run succeeds; `src` is never written.
    """
    config = make_config(config, **overrides)
    _check_options(dtype, shard_bytes)
    batches = as_batch_list(batches)
    if (needs_inputs(config) or config.owl is not None) and not batches:
        raise MissingData(f"prune_pretrained with method {config.method!r} needs at least one calibration batch, "
                          f"got none")
    source, target = _check_folders(src, out)
    start = time.perf_counter()
    checkpoint = Checkpoint.open(source)
    model = build_skeleton(source)
    blocks = find_block_layout(model)
    layout = _split(_checkpoint_names(model, checkpoint), checkpoint, blocks.blocks_path, len(blocks.blocks))
    with cache_off(model):
        calibrated = needs_inputs(config) or config.owl is not None
        inputs = place_inputs(_capture(model, checkpoint, layout, blocks, batches, dtype), config) \
            if calibrated else None
        ratios = _block_ratios(model, checkpoint, layout, blocks, inputs, config, dtype)
        inputs = inputs if needs_inputs(config) else None
        passthrough = _pack(layout.passthrough, {n: t.nbytes for n, t in checkpoint.tensors.items()}, shard_bytes)
        reports: list[LayerReport] = []
        with staged_output(target) as stage:
            writer = _ShardWriter(stage, len(passthrough) + len(blocks.blocks))

            def prune_and_write(i: int, block: nn.Module, block_inputs: BlockInputs) -> None:
                block_config = dataclasses.replace(config, sparsity=ratios[i])
                reports.extend(prune_block(block, block_inputs, block_config, prefix=f"{blocks.blocks_path}.{i}."))
                state = dict(block.state_dict(prefix=f"{blocks.blocks_path}.{i}.", keep_vars=True))
                writer.write({stored: state[name] for name, stored in layout.blocks[i].items()})

            seconds = _stream_blocks(model, checkpoint, layout, blocks, inputs, dtype, config.device, prune_and_write)
            for group in passthrough:
                _write_unpruned(writer, checkpoint, group, dtype)
            writer.write_index()
            _copy_companions(source, stage, dtype)
    block_sparsity = ratios if config.pattern is None else [config.target] * len(ratios)
    return LLMPlan(config, reports, time.perf_counter() - start, block_sparsity, seconds)


def _write_unpruned(writer: _ShardWriter, checkpoint: Checkpoint, names: list[str], dtype: torch.dtype | None) -> None:
    """Write the tensors outside the blocks: byte for byte, or cast to `dtype` through a mapping."""
    if dtype is None:
        writer.copy(checkpoint, names)
        return
    with checkpoint.mapped(names) as views:
        writer.write({n: _cast(v, dtype) for n, v in views.items()})


def _capture(model: nn.Module, checkpoint: Checkpoint, layout: _Layout, blocks: BlockLayout,
             batches: list[Any], dtype: torch.dtype | None) -> BlockInputs:
    """The first block's inputs, with the modules outside the blocks mapped just for this.

    They stay views of the mapped shards, not copies: the embedding lookup touches only the
    pages of the calibration tokens' rows, and the LM head, which does not run, none.
    """
    with checkpoint.mapped(layout.outside.values()) as views:
        for model_name, stored in layout.outside.items():
            _put(model, model_name, _cast(views[stored], dtype))
        try:
            return capture_inputs(model, blocks, batches)
        finally:
            params = dict(model.named_parameters(remove_duplicate=False))
            _drop(model, [n for n in layout.outside if n in params])
            buffers = dict(model.named_buffers(remove_duplicate=False))
            for name in (n for n in layout.outside if n in buffers):
                _put(model, name, buffers[name].clone())  # a buffer stays; it must not outlive the mapping
            _release_freed_memory()


def _block_ratios(model: nn.Module, checkpoint: Checkpoint, layout: _Layout, blocks: BlockLayout,
                  inputs: BlockInputs | None, config: LLMConfig, dtype: torch.dtype | None) -> list[float]:
    """Each block's sparsity: uniform, or OWL's from a first streaming pass over the dense blocks."""
    count = len(layout.blocks)
    if config.owl is None:
        return [config.sparsity] * count
    ratios: list[float] = []
    _stream_blocks(model, checkpoint, layout, blocks, inputs, dtype, config.device,
                   lambda i, block, block_inputs: ratios.append(
                       outlier_ratio(block, block_inputs, config, prefix=f"{blocks.blocks_path}.{i}.")))
    return spread(ratios, config.sparsity, config.owl)


__all__ = ["prune_pretrained", "build_skeleton", "Checkpoint"]
