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


def _with_batch(args: tuple, kwargs: dict, size: int) -> tuple[tuple, dict]:
    """The inputs with every tensor's first dimension resized to `size` (rows repeated)."""
    def resize(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        index = torch.arange(size) % t.shape[0]
        return t.index_select(0, index.to(t.device))
    return pytree.tree_map(resize, (args, kwargs))


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """Dim 0 of every tensor input dynamic, one entry per input: positional ones, then the
    keyword ones in the order `forward` declares them (as torch.export reads a tuple)."""
    batch = torch.export.Dim("batch", min=1)
    mark = lambda t: {0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None  # noqa: E731
    declared = list(inspect.signature(model.forward).parameters)
    keys = sorted(kwargs, key=lambda k: declared.index(k) if k in declared else len(declared))
    return tuple(mark(a) for a in args) + tuple(mark(kwargs[k]) for k in keys)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints its steps and warns about torchvision ops and more: keep a CLI's output clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _check(session: Any, model: nn.Module, args: tuple, kwargs: dict, atol: float, rtol: float) -> float:
    """Largest |onnxruntime - torch| over the outputs; raises IncompatibleLayer past the tolerance."""
    with torch.no_grad():
        expected = _tensors(model(*args, **kwargs))
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), _tensors((args, kwargs)))}
    got = session.run(None, feeds)
    if len(got) != len(expected):
        raise IncompatibleLayer(f"the ONNX model returns {len(got)} outputs where torch returns {len(expected)}")
    worst = 0.0
    for i, (o, e) in enumerate(zip(got, expected)):
        e = e.detach().cpu().numpy()
        if o.shape != e.shape:
            raise IncompatibleLayer(f"ONNX output {i} has shape {o.shape}, torch's {e.shape}")
        worst = max(worst, float(np.abs(o - e).max()) if o.size else 0.0)
        if not np.allclose(o, e, atol=atol, rtol=rtol):
            raise IncompatibleLayer(f"ONNX output {i} differs from torch's by up to {np.abs(o - e).max():.3g} "
                                    f"(atol {atol}, rtol {rtol}) at batch {len(o) if o.ndim else 1}")
    return worst


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, dynamic_batch: bool = True,
                opset: int | None = None, atol: float = 1e-4, rtol: float = 1e-3,
                overwrite: bool = False) -> ExportReport:
    """Write `model` as ONNX to `path`, checked with onnxruntime against torch; returns the report.

    `example_inputs`: a tensor, a tuple of them, or a dict of keyword tensors, as for
    `prune_structured`. `path` must not exist unless `overwrite`.
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
    model = copy.deepcopy(model).eval()
    finalize(model)   # masks folded into plain zeroed weights: no buffers or hooks left to export
    args, kwargs = _split_inputs(model, example_inputs)
    if not _tensors((args, kwargs)):
        raise InvalidArgument("example_inputs holds no tensor to export the model with")
    first = _tensors((args, kwargs))[0]
    batches = [first.shape[0] if first.dim() else 1]
    if dynamic_batch:
        # torch.export fixes a dimension of size 1 for good: trace with 2 rows, then check other sizes
        args, kwargs = _with_batch(args, kwargs, max(2, batches[0]))
        batches = sorted({batches[0], max(2, batches[0]), 3})
    options: dict[str, Any] = {"dynamo": True, "verbose": False}
    if dynamic_batch:
        options["dynamic_shapes"] = _dynamic_shapes(model, args, kwargs)
    if opset is not None:
        options["opset_version"] = opset
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".secateurs-", suffix=".onnx", dir=out.parent)
    os.close(handle)
    try:
        try:
            with torch.no_grad(), _quiet_exporter():
                program = torch.onnx.export(model, args, kwargs=kwargs or None, **options)
            program.save(staging)
        except Exception as exc:   # noqa: BLE001 - the exporter raises many kinds; one line names it
            while exc.__cause__ is not None:   # the exporter wraps the real reason
                exc = exc.__cause__
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IncompatibleLayer(f"torch.onnx.export failed: {type(exc).__name__}: {first[:300]}") from None
        onnx.checker.check_model(staging)
        session = onnxruntime.InferenceSession(staging, providers=["CPUExecutionProvider"])
        worst = max(_check(session, model, *_with_batch(args, kwargs, size), atol, rtol) for size in batches)
        os.replace(staging, out)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    imports = onnx.load(str(out), load_external_data=False).opset_import
    used = next((o.version for o in imports if o.domain in ("", "ai.onnx")), 0)
    return ExportReport(str(out), out.stat().st_size, int(used), dynamic_batch, worst, batches)


__all__ = ["ExportReport", "export_onnx"]
