"""The stress progress bar: schedules done of the total, schedules per second, distinct bugs.

It draws on stderr and only when stderr is an interactive terminal (rich's own detection, so
TTY_COMPATIBLE / TTY_INTERACTIVE / FORCE_COLOR apply), and it is transient: piped or redirected
output, and the report printed after it, never contain a trace of it.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text


class _Rate(ProgressColumn):
    """Schedules per second since the start: results from workers arrive a chunk at a time, and
    rich's windowed speed would jump with every chunk."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed
        if not task.completed or not elapsed:
            return Text("- schedules/s")
        return Text(f"{task.completed / elapsed:,.0f} schedules/s")


class StressProgress:
    """A context manager; update() after every finished schedule. ``total`` None: a count
    without a bar (explore does not know how many schedules its bound holds)."""

    def __init__(self, total: int | None, enabled: bool = True, console: Console | None = None,
                 label: str = "stress") -> None:
        console = console or Console(stderr=True)
        self.enabled = enabled and console.is_interactive
        self.progress = Progress(
            TextColumn(label), BarColumn(), MofNCompleteColumn(), _Rate(),
            TextColumn("{task.fields[bugs]} distinct bug(s)"), TimeElapsedColumn(),
            console=console, transient=True, disable=not self.enabled)
        self.task = self.progress.add_task(label, total=total, bugs=0)

    def update(self, done: int, bugs: int) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=done, bugs=bugs)

    def __enter__(self) -> StressProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
