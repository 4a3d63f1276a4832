"""A small progress bar for long work (rich), silent when disabled or when stderr is not a terminal."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressBar:
    """``advance(description)`` after each unit of work; ``close()`` at the end."""

    def __init__(self, total: int, title: str, enabled: bool = True, completed: int = 0) -> None:
        self._progress = (
            Progress(
                TextColumn(f"[bold]{title}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                transient=False,
            )
            if enabled
            else None
        )
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("", total=total, completed=completed)

    def advance(self, description: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=description)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def progress_bar(total: int, title: str, enabled: bool = True, completed: int = 0) -> ProgressBar:
    """A :class:`ProgressBar` over ``total`` steps, ``completed`` of them already done (resume)."""
    return ProgressBar(total, title, enabled, completed)
