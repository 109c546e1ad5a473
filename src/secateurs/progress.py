"""Progress of long work that reads well where it is shown: a live bar in a terminal, lines in a log."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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


__all__ = ["Steps"]
