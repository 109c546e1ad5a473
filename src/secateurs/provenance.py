"""What a run records about where it ran: the versions of Python, the libraries and secateurs."""
from __future__ import annotations

import importlib.metadata
import platform

import numpy as np
import torch


def versions(*packages: str) -> dict[str, str]:
    """Python, platform, torch, numpy and secateurs versions, plus each of `packages` installed."""
    found = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
             "numpy": np.__version__}
    for name in ("secateurs", *packages):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


__all__ = ["versions"]
