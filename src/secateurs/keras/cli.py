"""`secateurs prune --keras model.keras ...`: the PyTorch path's options, messages and outputs.

Writes `model.keras` (plain Keras), `model.sparse.safetensors`, `plan.json` and
`metrics.json` (`before` / `after`), all at once and only when the whole run succeeded.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ..errors import FileProblem, InvalidArgument


def _calibration(args: argparse.Namespace) -> list[Any] | None:
    """Batches of numpy arrays from --calib: .npz, .safetensors or a torch file with 'inputs' (and 'targets')."""
    from ..inputs import calibration_batches as torch_calibration

    if args.calib is None:
        return None
    if Path(args.calib).suffix != ".npz":
        batches = torch_calibration(args.calib, args.batch_size, args.trust_pickle)
        return [tuple(t.numpy() for t in b) if isinstance(b, tuple) else b.numpy() for b in batches]
    if not Path(args.calib).is_file():
        raise FileProblem(f"calibration file {args.calib} does not exist")
    if args.batch_size < 1:
        raise InvalidArgument(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        with np.load(args.calib, allow_pickle=False) as arrays:
            tensors = {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError) as exc:
        raise FileProblem(f"cannot read calibration file {args.calib}: {exc}") from None
    if "inputs" not in tensors:
        raise FileProblem(f"calibration file {args.calib} has no 'inputs' array (found: {', '.join(sorted(tensors)) or 'nothing'})")
    x, y = tensors["inputs"], tensors.get("targets", tensors.get("labels"))
    if y is not None and len(y) != len(x):
        raise FileProblem(f"calibration file {args.calib}: {len(x)} inputs but {len(y)} targets")
    starts = range(0, len(x), args.batch_size)
    if y is None:
        return [x[i:i + args.batch_size] for i in starts]
    return [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in starts]


def _loss(name: str, model: Any, data: list[Any] | None) -> Any:
    """--loss as a Keras loss: cross_entropy on logits, or on probabilities after a final softmax."""
    from ._backend import keras

    if name == "mse":
        return keras.losses.MeanSquaredError()
    last = model.layers[-1] if model.layers else None
    activation = getattr(last, "activation", None)
    probabilities = isinstance(last, keras.layers.Softmax) or getattr(activation, "__name__", "") == "softmax"
    one_hot = bool(data) and isinstance(data[0], tuple) and np.ndim(data[0][1]) == 2
    cls = keras.losses.CategoricalCrossentropy if one_hot else keras.losses.SparseCategoricalCrossentropy
    return cls(from_logits=not probabilities)


def _example(args: argparse.Namespace, model: Any, data: list[Any] | None) -> Any:
    from .costs import example_for

    if args.input_shape is not None:
        from ..inputs import example_input

        x = example_input(args.input_shape).numpy()
        inputs = getattr(model, "inputs", None) or []
        if inputs and "int" in str(inputs[0].dtype):
            x = np.zeros(x.shape, dtype=str(inputs[0].dtype))
        return x
    if data:
        first = data[0][0] if isinstance(data[0], tuple) else data[0]
        return first[:1]
    try:
        return example_for(model)
    except InvalidArgument:
        raise InvalidArgument("the model's input shape is not fixed: pass --input-shape (e.g. 1,32,32,3) or --calib")\
            from None


def run_prune_keras(args: argparse.Namespace, console: Console) -> int:
    from ..inputs import HF_ONLY, check_common, check_structured, refuse_given
    from ..progress import before_after_table
    from ..io import check_output_dir, staged_output

    refuse_given(args, HF_ONLY, "--keras (it is for --hf)")
    refuse_given(args, ("weights",), "--keras (the .keras file holds the weights)")
    args.threads = args.threads or 1
    if args.structured:
        check_structured(args)
        args.method = args.method or "l2"
    else:
        args.method = args.method or "magnitude"
        check_common(args)
    if args.target is not None and not args.target.strip().startswith(("macs=", "params=", "bytes=")):
        raise InvalidArgument("--target for --keras is macs=, params= or bytes= (latency_ms= is timed by the "
                              "PyTorch latency tables)")
    inputs = [args.keras] + ([args.calib] if args.calib else [])
    check_output_dir(args.out, inputs, overwrite=args.overwrite)

    from . import costs, io
    from .masks import strip
    from .prune import prune
    from .structured import prune_structured

    model = io.load_model(args.keras)
    data = _calibration(args)
    example = _example(args, model, data)
    measured = lambda m: costs.measure(m, example, threads=args.threads).to_dict()  # noqa: E731
    try:
        before = measured(model)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidArgument(f"the model does not run on the example input: {str(exc).strip().splitlines()[0]}") \
            from None
    loss = _loss(args.loss, model, data)
    from ._backend import backend, keras

    name = f"{Path(args.keras).name} (Keras {keras.__version__}, {backend()} backend)"
    if args.structured:
        with console.status(f"removing channels ({args.method})"):
            model, plan = prune_structured(model, args.ratio, target=args.target, method=args.method, data=data,
                                           loss_fn=loss, example_inputs=example, ignore=args.ignore, seed=args.seed)
        title = f"{name}, structured {plan.method}: MACs {plan.macs_after / max(plan.macs_before, 1):.1%} of before"
    else:
        with console.status(f"scoring with {args.method}"):
            plan = prune(model, args.method, args.sparsity, pattern=args.pattern, scope=args.scope, data=data,
                         loss_fn=loss, max_batches=args.max_batches, types=args.types, include=args.include,
                         ignore=args.ignore, prune_last=args.prune_last, min_ratio=args.min_ratio,
                         max_ratio=args.max_ratio, normalize=args.normalize,
                         skip_incompatible=args.skip_incompatible, seed=args.seed)
        strip(model)
        title = f"{name}, {plan.method}, {plan.achieved:.1%} of selected weights removed"
    after = measured(model)
    with staged_output(args.out) as stage:
        io.save(model, stage, plan)
        (stage / "metrics.json").write_text(json.dumps(
            {"before": before, "after": after, "plan": plan.to_dict(),
             "keras": {"version": keras.__version__, "backend": backend()}}, indent=2))
    console.print(before_after_table(title, before, after))
    console.print(f"wrote the pruned model (model.keras, plain Keras), plan.json and metrics.json to {args.out}/")
    return 0
