"""Progress of long work that reads well where it is shown: a live bar in a terminal, lines in a log."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .measure import Timing

ROWS = ("accuracy", "loss", "params", "nonzeros", "macs", "nonzero_macs", "size_bytes", "dense_size_bytes",
        "latency_ms")


class Steps:
    """`with steps("training", total=24) as update: ... update(done, total)`.

    In a terminal: a transient bar, then one line with the step's time. Elsewhere (a log,
    CI, a pipe): a line when the step starts, a line at each quarter of a step with eight
    or more parts, and a line when it ends; no escape codes, nothing redrawn.
    """

    def __init__(self, console: Console) -> None:
        self.console = console

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def __call__(self, text: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
        started = time.perf_counter()
        if self.console.is_terminal:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=self.console, transient=True) as progress:
                task = progress.add_task(text, total=total)
                yield lambda done, total: progress.update(task, completed=done, total=total)
            self.line(f"{text}: done in {time.perf_counter() - started:.1f} s")
            return
        self.line(f"{text} ...")
        shown = [0]

        def update(done: int, total: int) -> None:
            if total >= 8 and done < total and 4 * done // total > shown[0]:
                shown[0] = 4 * done // total
                self.line(f"  {done}/{total} ({time.perf_counter() - started:.0f} s)")

        yield update
        self.line(f"  done in {time.perf_counter() - started:.1f} s")


def cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "accuracy":
        return f"{value:.2%}"
    return f"{value:.4g}" if isinstance(value, float) else f"{value:,}"


def before_after_table(title: str, before: dict[str, Any], after: dict[str, Any]) -> Table:
    """Before and after, row by row; latency as median ± half the IQR, its ratio marked where within noise."""
    table = Table(title=title)
    for column in ("", "before", "after", "after / before"):
        table.add_column(column, justify="right" if column else "left")
    for key in ROWS:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        if key == "latency_ms":
            tb, ta = Timing.of(before), Timing.of(after)
            noise = ", within noise" if ta.within_noise(tb) else ""
            table.add_row(f"latency ({tb.threads} thread{'s' * (tb.threads > 1)})", str(tb), str(ta),
                          f"{a / b:.3f}{noise}" if b else "-")
            continue
        table.add_row(key, cell(key, b), cell(key, a), f"{a / b:.3f}" if b else "-")
    return table


__all__ = ["ROWS", "Steps", "before_after_table", "cell"]
