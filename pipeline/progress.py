"""The progress bar the stages that walk a list (evaluate, predict, render) share: one look, one way to drive it."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def counting_bar(name: str, total: int, unit: str, enabled: bool = True,
                 show_item: bool = False) -> Iterator[Callable[..., None]]:
    """A rich bar on stderr over `total` `unit`s; yields `advance(n=1, item="")`.

    stderr keeps stdout for the results; `show_item` adds an ETA and the last item's name, shown as plain
    text because names (clip keys, file names) are user data, not rich markup.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn(f"[bold]{name}"), BarColumn(), TextColumn(f"{{task.completed}}/{{task.total}} {unit}"),
               TimeElapsedColumn()]
    if show_item:
        columns += [TimeRemainingColumn(), TextColumn("{task.fields[item]}", markup=False)]
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as bar:
        task = bar.add_task(name, total=total, item="")

        def advance(n: int = 1, item: str = "") -> None:
            bar.update(task, advance=n, item=item)

        yield advance
