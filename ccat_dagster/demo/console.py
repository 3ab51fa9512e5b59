"""The demo's progress bars (rich): one bar per long step, redrawn in a terminal, one final line in a pipe or log."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A bar for ``total`` items; yields ``update(done, total)`` (callable from any thread)."""
    console = Console(file=sys.stdout, soft_wrap=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done, new_total: bar.update(task, completed=done, total=new_total)
