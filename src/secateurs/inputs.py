"""What the command line reads: its options' two spellings, calibration files into batches, and
example inputs checked on the model."""
from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from .batches import LOSSES, check_data_tensors, mean_loss
from .errors import FileProblem, InvalidArgument
from .io import load_state


def _one_of(args: argparse.Namespace, new: str, old: str) -> None:
    """Copy `--new` into the old option's place; both given is a mistake."""
    value = getattr(args, new, None)
    if value is None:
        return
    if getattr(args, old) is not None:
        raise InvalidArgument(f"--{new} and --{old} say the same thing: give one of them")
    setattr(args, old, value)


def resolve_spellings(args: argparse.Namespace) -> None:
    """`--remove` and `--keep` into the options they mean: --sparsity or --ratio (removed), and --target (kept)."""
    if args.remove is not None and args.command == "prune" and args.structured:
        _one_of(args, "remove", "ratio")
    elif args.remove is not None:
        if args.command == "demo":
            args.sparsity = None   # the demo's own default gives way
        _one_of(args, "remove", "sparsity")
    if hasattr(args, "keep"):
        _one_of(args, "keep", "target")


def check_unstructured(args: argparse.Namespace) -> None:
    """Structured-only options without --structured: say so, instead of asking for a sparsity."""
    for name, given in (("--target", args.target), ("--ratio", args.ratio)):
        if given is not None:
            spelled = {"--target": "--keep / --target", "--ratio": "--ratio"}[name]
            raise InvalidArgument(f"{spelled} {given} removes whole channels: add --structured "
                                  "(or give --remove F / --sparsity F to zero weights)")



def calibration_batches(path: str | None, batch_size: int, trust_pickle: bool) -> list[Any] | None:
    """The file's `inputs` (and `targets` or `labels`, where present) split into batches; None for no file."""
    if path is None:
        return None
    tensors = load_state(path, trust_pickle=trust_pickle)
    if "inputs" not in tensors:
        raise FileProblem(f"calibration file {path} has no 'inputs' tensor (found: {', '.join(sorted(tensors)) or 'nothing'})")
    if batch_size < 1:
        raise InvalidArgument(f"--batch-size must be at least 1, got {batch_size}")
    inputs = tensors["inputs"]
    targets = tensors.get("targets", tensors.get("labels"))
    check_data_tensors(f"calibration file {path}", inputs, targets)
    if targets is None:
        return list(inputs.split(batch_size))
    return list(zip(inputs.split(batch_size), targets.split(batch_size)))


def example_input(shape: str | None, dtype: str = "float") -> torch.Tensor | None:
    """A seeded random tensor of `shape` ("1,3,224,224"); token ids of 0 and 1 for dtype "long"."""
    if shape is None:
        return None
    try:
        dims = [int(d) for d in shape.split(",")]
    except ValueError:
        dims = []
    if not dims or any(d < 1 for d in dims):
        raise InvalidArgument(f"--input-shape must be positive integers separated by commas, e.g. 1,3,224,224; got {shape!r}")
    generator = torch.Generator().manual_seed(0)
    if dtype == "long":
        return torch.randint(0, 2, dims, generator=generator)
    return torch.randn(dims, generator=generator)


def _fails(model: nn.Module, example: torch.Tensor) -> str | None:
    """None if `model` runs on `example`, else the first line of its error."""
    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def example_for(model: nn.Module, shape: str, dtype: str = "float") -> tuple[torch.Tensor, str | None]:
    """The example input of `shape`, checked on `model`, and a note where a forgotten batch dimension was added.

    A shape the model runs on only with a batch of 1 in front ("3,32,32" for 1,3,32,32)
    gets it; a shape it does not run on either way is InvalidArgument, one line.
    """
    example = example_input(shape, dtype)
    problem = _fails(model, example)
    if problem is None:
        return example, None
    batched = example.unsqueeze(0)
    if _fails(model, batched) is None:
        return batched, (f"the model does not run on --input-shape {shape} but does on 1,{shape}: "
                         "using 1 as the batch dimension")
    raise InvalidArgument(f"the model does not run on an input of shape {shape} (nor with a batch of 1 "
                          f"in front): {problem}")


def quality_on(model: nn.Module, data: list[Any] | None, loss: str) -> dict[str, float]:
    """The mean loss and, for class labels with cross-entropy, the accuracy on batches with targets; {} without."""
    if not data or not isinstance(data[0], tuple):
        return {}
    from .recover.finetune import evaluate_accuracy

    try:
        result = {"loss": mean_loss(model, data, LOSSES[loss])}
        targets = data[0][1]
        if loss == "cross_entropy" and not targets.is_floating_point() and targets.dim() == 1:
            result["accuracy"] = evaluate_accuracy(model, data)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise InvalidArgument(f"the calibration targets do not fit the model's outputs with --loss {loss}: "
                              f"{str(exc).splitlines()[0]}") from None
    return result


__all__ = ["calibration_batches", "check_unstructured", "example_for", "example_input", "quality_on",
           "resolve_spellings"]
