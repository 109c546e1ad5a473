"""The one validation of the structured options, called by the API, the CLI, recipes and the LLM pipeline.

Meanings, the same in every verb: `ratio` is the fraction of units removed; `target` is
the fraction of a cost kept ("macs=0.5": half the MACs remain); `round_to` makes every
kept width a multiple; `max_ratio` caps the fraction of any group removed.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..criteria import get_criterion
from ..errors import InvalidArgument
from .budget import Budget, parse_target
from .units import UNIT_KINDS, check_spec

SCOPES = ("local", "global")


def check_options(*, ratio: Any = None, target: Any = None, scope: str = "local",
                  units: Sequence[str] = UNIT_KINDS, round_to: Any = None, max_ratio: Any = None,
                  method: Any = None, require_one: bool = True) -> Budget | None:
    """Raise InvalidArgument for the first option out of range; returns the target's Budget, if one was given.

    `require_one`: exactly one of ratio and target must be given (the LLM pipeline, which
    can also drop whole layers, asks only that they are not both given).
    """
    if require_one and (ratio is None) == (target is None):
        raise InvalidArgument("give exactly one of ratio (the fraction of channels / heads removed, e.g. 0.3) "
                              f"or target (the fraction of a cost kept, e.g. 'macs=0.5'); got ratio={ratio!r}, "
                              f"target={target!r}")
    if ratio is not None and target is not None:
        raise InvalidArgument(f"give ratio or target, not both (got ratio={ratio!r}, target={target!r})")
    if scope not in SCOPES:
        raise InvalidArgument(f"unknown scope {scope!r}; expected 'local' or 'global'")
    if isinstance(units, str) or not units or any(u not in UNIT_KINDS for u in units):
        bad = units if isinstance(units, str) or not units else next(u for u in units if u not in UNIT_KINDS)
        raise InvalidArgument(f"unknown unit kind {bad!r}; expected some of {UNIT_KINDS}")
    if round_to is not None and round_to != "auto" and (isinstance(round_to, bool) or not isinstance(round_to, int)
                                                         or round_to < 1):
        raise InvalidArgument(f"round_to must be a positive integer, 'auto' or None, got {round_to!r}")
    if max_ratio is not None:
        check_spec("max_ratio", max_ratio, upper_inclusive=True)
    if ratio is not None:
        check_spec("ratio", ratio, upper_inclusive=False)
        if isinstance(ratio, dict) and scope != "local":
            raise InvalidArgument(f"a per-group ratio dict needs scope='local', got scope={scope!r}")
    if method is not None and not hasattr(method, "compute"):
        get_criterion(method)
    return parse_target(target) if target is not None else None


# The kept-width multiple `round_to="auto"` picks, by device type and dtype: tensor cores take
# fp16 / bf16 GEMMs and convolutions at full speed only on multiples of 8 (TF32 on multiples of
# 4). On the CPU (fp32) widths stay free by default: oneDNN pads a remainder of its 8- or
# 16-channel blocks, but on small models a multiple of 8 forbids most cuts (a 16-channel layer
# could only halve); pass round_to=8 there for large models (BENCHMARKS.md measures both).
ALIGNMENT: dict[tuple[str, str], int] = {("cuda", "half"): 8, ("cuda", "float32"): 4}


def resolve_round_to(round_to: int | str | None, model: nn.Module) -> int | None:
    """`round_to` as a number: "auto" becomes the alignment for the model's device and dtype (None: none)."""
    if round_to != "auto":
        return round_to
    param = next(iter(model.parameters()), None)
    if param is None:
        return None
    precision = "half" if param.dtype in (torch.float16, torch.bfloat16) else "float32"
    return ALIGNMENT.get((param.device.type, precision))


__all__ = ["ALIGNMENT", "SCOPES", "check_options", "resolve_round_to"]
