"""Importance criteria, one module per family, and the registry that names them."""
from __future__ import annotations

from ..errors import InvalidArgument
from .activation import APoZ, MeanActivation
from .base import Calibration, Criterion, Scores
from .bn_scale import BNScale
from .gradient import GradientMagnitude, Taylor
from .hessian import OBD
from .magnitude import L1Magnitude, L2Magnitude
from .random import RandomScores
from .wanda import Wanda

CRITERIA: dict[str, type[Criterion]] = {
    "magnitude": L1Magnitude,
    "l1": L1Magnitude,
    "l2": L2Magnitude,
    "gradient": GradientMagnitude,
    "taylor": Taylor,
    "activation": MeanActivation,
    "apoz": APoZ,
    "obd": OBD,
    "hessian": OBD,
    "wanda": Wanda,
    "random": RandomScores,
    "bn_scale": BNScale,
}


def get_criterion(method: str | Criterion, seed: int = 0) -> Criterion:
    """The criterion named `method` (or `method` itself if it is one already)."""
    if isinstance(method, Criterion):
        return method
    cls = CRITERIA.get(str(method).lower())
    if cls is None:
        raise InvalidArgument(f"unknown method {method!r}; expected one of {', '.join(sorted(CRITERIA))}")
    return cls(seed=seed) if cls is RandomScores else cls()


__all__ = ["CRITERIA", "Calibration", "Criterion", "Scores", "get_criterion"]
