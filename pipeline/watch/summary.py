"""How a watch run went, and the lines the CLI prints about it when it is over.

One record, filled in as the run goes, by its own methods only (`took`, `scored`, `ended`): the live view
(view.py) draws it, the CLI prints it (`print_summary`), the tests and bench/watch.py read it. Formatting
only here (rich, imported lazily).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.watch.events import Event


@dataclass
class WatchSummary:
    """How a run went: what the CLI prints, what the tests and the bench read."""

    source: str
    interval: float  # seconds between sampled frames (the model's)
    window: int
    stride: int
    live: bool
    outcome: str = "end"  # end | stopped | broken
    message: str = ""  # one line: why it stopped or broke
    note: str | None = None  # the checkpoint's fallback interval, when it records none
    sampled: int = 0  # sampled frames the model embedded
    dropped: int = 0  # sampled frames dropped because the model was behind (a live source only)
    windows: int = 0
    source_seconds: float = 0.0  # of the source read
    wall_seconds: float = 0.0
    # a live source's sampled frames: from a frame's arrival in the queue to the end of the model's step that
    # embedded it (and scored the windows that fell due then); a file's frames wait in the queue by design
    latencies: list[float] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    out: Path | None = None
    out_frames: int = 0
    last_top: list[tuple[str, float]] = field(default_factory=list)

    @property
    def required_fps(self) -> float:
        return 1.0 / self.interval

    @property
    def sampled_fps(self) -> float:
        """Sampled frames the model took a second of wall time."""
        return self.sampled / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def took(self, frames: list, dropped: int, now: float) -> None:
        """A model step over `frames` (sources.Frame, in order) ended at `now` (time.monotonic)."""
        if self.live:
            self.latencies.extend(now - f.arrived for f in frames)
        self.sampled += len(frames)
        self.source_seconds = frames[-1].time
        self.dropped = dropped

    def scored(self, top: list[tuple[str, float]]) -> None:
        """A window was scored; `top` its top classes."""
        self.windows += 1
        self.last_top = top

    def ended(self, dropped: int, source_seconds: float, wall_seconds: float, out_frames: int | None) -> None:
        """The run is over, however it ended: the final counts (`out_frames` None: no --out)."""
        self.dropped, self.source_seconds, self.wall_seconds = dropped, source_seconds, wall_seconds
        if out_frames is not None:
            self.out_frames = out_frames

    def latency(self, q: float) -> float | None:
        return float(np.percentile(self.latencies, q)) if self.latencies else None


def print_summary(summary: WatchSummary) -> None:
    """One line on how the run ended (stderr, red when the source broke), then a short table (stdout)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    err = Console(stderr=True, soft_wrap=True)
    if summary.note:
        err.print(f"[yellow]note[/] {escape(summary.note)}", highlight=False)
    wrote = f"; {summary.out_frames} frames in {summary.out}" if summary.out is not None else ""
    if summary.outcome == "broken":
        err.print(f"[bold red]error:[/] {escape(summary.message)}{escape(wrote)}", highlight=False)
    elif summary.outcome == "stopped":
        err.print(f"{escape(summary.message)}{escape(wrote)}", highlight=False)
    table = Table(title=f"watch {escape(summary.source)} ({'live' if summary.live else 'file'})")
    for col in ("source s", "sampled", "needed fps", "sampled fps", "dropped", "windows", "latency p50/p95 s",
                "events"):
        table.add_column(col, justify="right")
    p50, p95 = summary.latency(50), summary.latency(95)
    table.add_row(f"{summary.source_seconds:.1f}", str(summary.sampled), f"{summary.required_fps:.1f}",
                  f"{summary.sampled_fps:.1f}", str(summary.dropped), str(summary.windows),
                  "-" if p50 is None else f"{p50:.2f} / {p95:.2f}", str(len(summary.events)))
    console = Console()
    console.print(table)
    for event in summary.events:
        console.print(f"  {escape(event.label)} {event.start:.1f}-{event.end:.1f} s, peak {event.probability:.0%}, "
                      f"box {event.box}", highlight=False)
