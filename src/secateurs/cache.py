"""Where secateurs keeps what it computes once and reuses: $SECATEURS_CACHE or ~/.cache/secateurs."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (not created here): $SECATEURS_CACHE, else $XDG_CACHE_HOME/secateurs, else ~/.cache/secateurs."""
    root = os.environ.get("SECATEURS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "secateurs"
    return Path(root)


__all__ = ["cache_dir"]
