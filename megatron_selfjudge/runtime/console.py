"""Rank-0 console output: one-line log messages and rich progress bars (other ranks stay quiet)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


class Console:
    """Log lines and progress bars on stderr, printed by the main rank only."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.console import Console as RichConsole

            self.console = RichConsole(stderr=True)

    def info(self, msg: str) -> None:
        """One log line."""
        if self.enabled:
            # soft_wrap: one log line stays one line in Slurm logs, whatever the terminal width.
            self.console.print(f"[selfjudge] {msg}", highlight=False, markup=False, soft_wrap=True)

    @contextmanager
    def progress(self, title: str, total: int, done: int) -> Iterator[Callable[[str], None]]:
        """Yields advance(description) for a progress bar of `total` items, `done` of them already done."""
        if not self.enabled:
            yield lambda desc="": None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                      console=self.console, transient=False) as prog:
            task = prog.add_task(title, total=total, completed=done, info="")
            yield lambda desc="": prog.update(task, advance=1, info=desc)
