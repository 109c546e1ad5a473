"""ONNX export of a (pruned) model, checked against torch with onnxruntime before it is kept.

`export_onnx(model, example_inputs, "model.onnx")` exports a copy of the model with
torch's dynamo-based exporter (`torch.onnx.export(..., dynamo=True)`): masks are folded
into the weights first (`finalize` on the copy; the user's model is untouched), the
batch dimension is left dynamic unless `dynamic_batch=False`, and the file is run with
onnxruntime on the example (and, with a dynamic batch, on a batch of another size) and
compared with torch's outputs. Only a file that passes is written; a failure is one
line naming the cause. Needs the `onnx` extra: `pip install 'secateurs[onnx]'`.

int8 dynamic-quantized layers are refused: export the float pruned model and quantize
the ONNX file with onnxruntime's own `quantize_dynamic` instead.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import FileProblem, IncompatibleLayer, InvalidArgument, SecateursError
from .graph.trace import _split_inputs
from .sparsity import finalize


@dataclass
class ExportReport:
    """What was written and how closely onnxruntime reproduces torch's outputs."""

    path: str
    bytes: int
    opset: int
    dynamic_batch: bool
    max_abs_diff: float          # over every output, on every batch checked
    batches_checked: list[int]
    converted_from: str | None = None   # the model's fp16 / bf16 dtypes, exported as float32


def _modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise SecateursError("ONNX export needs onnx, onnxscript and onnxruntime: "
                             "pip install 'secateurs[onnx]'") from None
    return onnx, onnxruntime


def _tensors(value: Any) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def _batched(t: Any, batch: int) -> bool:
    """A tensor input whose first dimension is the batch (side inputs of other sizes are left alone)."""
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch


def _with_batch(args: tuple, kwargs: dict, batch: int, size: int) -> tuple[tuple, dict]:
    """The inputs with every batched tensor's first dimension resized from `batch` to `size` (rows repeated)."""
    def resize(t: Any) -> Any:
        if not _batched(t, batch):
            return t
        return t.index_select(0, (torch.arange(size) % batch).to(t.device))
    return pytree.tree_map(resize, (args, kwargs))


def _dynamic_shapes(args: tuple, kwargs: dict, batch: int) -> tuple:
    """Dim 0 of every batched tensor input dynamic, one entry per input, positional then keyword
    (the keyword inputs already in the order the exporter reads them)."""
    dim = torch.export.Dim("batch", min=1)
    mark = lambda t: {0: dim} if _batched(t, batch) else None  # noqa: E731
    return tuple(mark(a) for a in args) + tuple(mark(v) for v in kwargs.values())


def _in_signature_order(model: nn.Module, kwargs: dict) -> dict:
    declared = list(inspect.signature(model.forward).parameters)
    return {k: kwargs[k] for k in sorted(kwargs, key=lambda k: declared.index(k) if k in declared else len(declared))}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints its steps, graph dumps and warnings: keep a CLI's output to one line."""
    names = ["torch", "onnxscript"] + [n for n in logging.root.manager.loggerDict
                                        if n.startswith(("torch", "onnxscript"))]
    loggers = [logging.getLogger(n) for n in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _one_line(exc: BaseException) -> str:
    while exc.__cause__ is not None:   # the exporter wraps the real reason
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


def _check(session: Any, model: nn.Module, args: tuple, kwargs: dict, atol: float, rtol: float) -> float:
    """Largest |onnxruntime - torch| over the outputs; raises IncompatibleLayer past the tolerance."""
    with torch.no_grad():
        expected = _tensors(model(*args, **kwargs))
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), _tensors((args, kwargs)))}
    try:
        got = session.run(None, feeds)
    except Exception as exc:   # noqa: BLE001 - onnxruntime raises its own kinds
        raise IncompatibleLayer(f"onnxruntime cannot run the exported model: {_one_line(exc)}") from None
    if len(got) != len(expected):
        raise IncompatibleLayer(f"the ONNX model returns {len(got)} outputs where torch returns {len(expected)}")
    worst = 0.0
    for i, (o, e) in enumerate(zip(got, expected)):
        e = e.detach().cpu().numpy()
        if o.shape != e.shape:
            raise IncompatibleLayer(f"ONNX output {i} has shape {o.shape}, torch's {e.shape}")
        if not np.issubdtype(e.dtype, np.floating):
            if not np.array_equal(o, e):
                raise IncompatibleLayer(f"ONNX output {i} ({e.dtype}) differs from torch's")
            continue
        gap = float(np.abs(o - e).max()) if o.size else 0.0
        worst = max(worst, gap)
        if not np.allclose(o, e, atol=atol, rtol=rtol):
            raise IncompatibleLayer(f"ONNX output {i} differs from torch's by up to {gap:.3g} "
                                    f"(atol {atol}, rtol {rtol}) at batch {len(o) if o.ndim else 1}")
    return worst


def _as_float32(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict, str | None]:
    """fp16 / bf16 models and inputs as float32 (onnxruntime's CPU kernels lack most of them)."""
    dtypes = {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    if dtypes <= {torch.float32}:
        return args, kwargs, None
    model.float()
    to32 = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    args, kwargs = pytree.tree_map(to32, (args, kwargs))
    return args, kwargs, ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes - {torch.float32}))


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, dynamic_batch: bool = True,
                opset: int | None = None, atol: float = 1e-4, rtol: float = 1e-3,
                overwrite: bool = False) -> ExportReport:
    """Write `model` as ONNX to `path`, checked with onnxruntime against torch; returns the report.

    `example_inputs`: a tensor, a tuple of them, or a dict of keyword tensors, as for
    `prune_structured`. The batch is the first dimension of the first input tensor; every
    input whose first dimension has that size is batched. fp16 / bf16 models are exported
    in float32. Weights over 2 GB go to `<path>.data` beside the file, as ONNX requires.
    `path` must not exist unless `overwrite`.
    """
    onnx, onnxruntime = _modules()
    from .quantize import quantized_layers

    out = Path(path)
    if out.is_dir():
        raise FileProblem(f"ONNX output {path} is a directory; give a file name such as model.onnx")
    if out.exists() and not overwrite:
        raise FileProblem(f"ONNX output {path} exists (pass overwrite=True / --overwrite to replace it)")
    if quantized_layers(model):
        raise IncompatibleLayer("int8 dynamic-quantized layers do not export to ONNX: export the float model "
                                "and quantize the ONNX file with onnxruntime.quantization.quantize_dynamic")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise InvalidArgument(f"opset must be an integer >= 7, got {opset!r}")
    model = copy.deepcopy(model).eval().cpu()   # an ONNX file has no device; checked on onnxruntime's CPU
    finalize(model)   # masks folded into plain zeroed weights: no buffers or hooks left to export
    args, kwargs = pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t,
                                   _split_inputs(model, example_inputs))
    kwargs = _in_signature_order(model, kwargs)   # the order the exporter pairs dynamic shapes with
    if not _tensors((args, kwargs)):
        raise InvalidArgument("example_inputs holds no tensor to export the model with")
    args, kwargs, converted = _as_float32(model, args, kwargs)
    first = _tensors((args, kwargs))[0]
    batch = first.shape[0] if first.dim() else 1
    batches = [batch]
    options: dict[str, Any] = {"dynamo": True, "verbose": False}
    if dynamic_batch:
        # torch.export fixes a dimension of size 1 for good: trace with 2 rows, then check other sizes
        args, kwargs = _with_batch(args, kwargs, batch, max(2, batch))
        options["dynamic_shapes"] = _dynamic_shapes(args, kwargs, max(2, batch))
        batches = sorted({1, 2, 3, batch})
        batch = max(2, batch)
    if opset is not None:
        options["opset_version"] = opset
    made_parent = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".secateurs-", dir=out.parent))
    staged = stage / out.name   # large weights land beside it as <name>.data: both move together
    try:
        try:
            with torch.no_grad(), _quiet_exporter():
                program = torch.onnx.export(model, args, kwargs=kwargs or None, **options)
                program.save(str(staged))
        except Exception as exc:   # noqa: BLE001 - the exporter raises many kinds; one line names it
            hint = " (an input whose first dimension is not the batch? try dynamic_batch=False / --static-batch)" \
                if dynamic_batch else ""
            raise IncompatibleLayer(f"torch.onnx.export failed: {_one_line(exc)}{hint}") from None
        imports = onnx.load(str(staged), load_external_data=False).opset_import
        used = next((o.version for o in imports if o.domain in ("", "ai.onnx")), 0)
        if opset is not None and used != opset:
            raise IncompatibleLayer(f"the exporter wrote opset {used}, not the requested {opset}")
        try:
            onnx.checker.check_model(str(staged))
            session = onnxruntime.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        except Exception as exc:   # noqa: BLE001 - onnx and onnxruntime raise their own kinds
            raise IncompatibleLayer(f"onnxruntime cannot load the exported model: {_one_line(exc)}") from None
        worst = max(_check(session, model, *_with_batch(args, kwargs, batch, size), atol, rtol) for size in batches)
        stale = out.with_name(out.name + ".data")
        if stale.exists() and not (stage / stale.name).exists():
            stale.unlink()   # an earlier export's weights, which this file does not use
        written = 0
        for item in stage.iterdir():
            written += item.stat().st_size
            os.replace(item, out.parent / item.name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if made_parent:
            with contextlib.suppress(OSError):
                out.parent.rmdir()   # only if nothing but our stage was ever in it
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return ExportReport(str(out), written, int(used), dynamic_batch, worst, batches, converted)


__all__ = ["ExportReport", "export_onnx"]
