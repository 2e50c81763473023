"""The one progress bar every command uses (synth, weights, extract, train, evaluate, render, predict).

One look and one way to drive it, so no command can render a column whose field it never set: the only
fields are `label` (left, e.g. "epoch 3/60") and `note` (right, e.g. the last loss or clip name), both
always present, both plain text (clip keys and file names are user data, never rich markup). The bar goes
to stderr, so stdout keeps the results; to a file or a pipe rich prints no live bar, only the final line.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class Bar:
    """A handle on one running bar: `advance`, `restart` (a new pass, e.g. the next epoch), `note`."""

    def __init__(self, progress, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self._progress.advance(self._task, n)
        if note is not None:
            self.note(note)

    def note(self, text: str) -> None:
        self._progress.update(self._task, note=str(text))

    def restart(self, total: int | None, label: str = "") -> None:
        # Progress.reset() replaces a task's fields with the ones it is given: give it every field
        self._progress.reset(self._task, total=total, label=str(label), note="")

    @property
    def speed(self) -> float | None:
        """Items per second over rich's recent window; None until it has two samples."""
        return self._progress.tasks[self._task].speed


@contextlib.contextmanager
def progress_bar(name: str, total: int | None, unit: str = "", *, enabled: bool = True, label: str | None = None,
                 transient: bool = False) -> Iterator[Bar]:
    """A rich bar on stderr over `total` `unit`s (None: unknown total); `unit="bytes"` shows sizes and speed.

    `label` (when not None) adds a column left of the bar that `Bar.restart` changes.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns: list = [TextColumn(f"[bold]{escape(name)}")]
    if label is not None:
        columns.append(TextColumn("{task.fields[label]}", markup=False))
    columns.append(BarColumn())
    if unit == "bytes":
        columns += [DownloadColumn(), TransferSpeedColumn()]
    else:
        columns += [MofNCompleteColumn(), TextColumn(unit, markup=False)]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    columns.append(TextColumn("{task.fields[note]}", markup=False))
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=transient) as progress:
        task = progress.add_task(name, total=total, label=label or "", note="")
        yield Bar(progress, task)
