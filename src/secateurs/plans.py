"""The small base every pruning plan shares: a dict for plan.json, a file, and one screen of summary.

Each verb returns its own plan type (`Plan` for masks, `StructuredPlan` for channels and
heads, `BlockPlan` for whole blocks, `LLMPlan` for the LLM engine); each says what it did in
`summary()` (label -> value rows), and this base turns that into `str(plan)`, a rich table
and `plan.save(path)`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any


class PlanRecord:
    """Mixin for the plan dataclasses: `to_dict`, `save`, a one-screen `__str__` and a rich table."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> dict[str, str]:
        """Label -> value: the few facts a user reads first."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write `to_dict()` as JSON to `path`; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path

    def __str__(self) -> str:
        rows = self.summary()
        width = max((len(k) for k in rows), default=0)
        return "\n".join([type(self).__name__] + [f"  {k.ljust(width)}  {v}" for k, v in rows.items()])

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title=type(self).__name__, show_header=False)
        for label, value in self.summary().items():
            table.add_row(label, value)
        return table


def fraction(after: int, before: int) -> str:
    """"1,234 -> 617 (50.0%)": a cost before and after, with what is left."""
    share = f" ({after / before:.1%})" if before else ""
    return f"{before:,} -> {after:,}{share}"


__all__ = ["PlanRecord", "fraction"]
