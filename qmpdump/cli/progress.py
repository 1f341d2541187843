"""The progress bar of the CLI: rich, on stderr, only when stderr is a terminal (else silent),
so that stdout stays clean for ``--json`` and pipes."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

__all__ = ["ProgressBar"]


class ProgressBar:
    """``with ProgressBar("dump") as bar: bar.show(done, total)``."""

    def __init__(self, label: str, *, enabled: bool | None = None) -> None:
        self.label = label
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        if sys.stderr.isatty() if enabled is None else enabled:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self) -> ProgressBar:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def show(self, completed: int, total: int | None, description: str | None = None) -> None:
        """Move the bar (a total of None or 0 shows an indeterminate bar)."""
        if self.progress is not None and self.task is not None:
            self.progress.update(
                self.task,
                completed=completed,
                total=total or None,
                description=description or self.label,
            )
