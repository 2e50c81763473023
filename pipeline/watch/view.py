"""The live view of `watch` (rich, on stderr): the current top classes, the sampled frame rate against the
rate the model needs, latency, drops and events. Off with --no-progress, and where stderr is no terminal
(a pipe or a file gets only the summary at the end)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.watch.summary import WatchSummary

REFRESH_SECONDS = 0.25  # redraw at most this often: the view must not cost the model its frames


class LiveView:
    """Draws the run's `WatchSummary` as it fills in, at most every REFRESH_SECONDS; a context manager."""

    def __init__(self, summary: WatchSummary, enabled: bool = True) -> None:
        from rich.console import Console

        self.summary = summary
        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self._live = None
        self._drawn = 0.0
        self._recent: list[tuple[float, int]] = []  # (wall time, frames sampled so far), the last few seconds

    def __enter__(self) -> "LiveView":
        if self.enabled:
            from rich.live import Live

            self._live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(*exc)
            self._live = None

    def update(self) -> None:
        now = time.monotonic()
        self._recent = [(t, n) for t, n in self._recent if now - t <= 5.0] + [(now, self.summary.sampled)]
        if self._live is None or now - self._drawn < REFRESH_SECONDS:
            return
        self._drawn = now
        self._live.update(self._table())

    def recent_fps(self) -> float:
        """Sampled frames a second over the last few seconds."""
        if len(self._recent) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._recent[0], self._recent[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def _table(self):
        from rich.markup import escape
        from rich.table import Table

        s = self.summary
        table = Table(title=f"watch {escape(str(s.source))}", show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        top = ", ".join(f"{escape(c)} {p:.0%}" for c, p in s.last_top) or "(waiting for a full window)"
        table.add_row("now", top)
        fps, need = self.recent_fps(), s.required_fps
        colour = "green" if fps >= 0.95 * need or not s.live else "red"
        table.add_row("sampled", f"[{colour}]{fps:.1f}[/] frames/s (the model needs {need:.1f}), "
                      f"{s.sampled} frames, {s.windows} windows, source at {s.source_seconds:.1f} s")
        recent = s.latencies[-100:]
        if recent:
            table.add_row("latency", f"p50 {np.percentile(recent, 50):.2f} s, p95 {np.percentile(recent, 95):.2f} s")
        table.add_row("dropped", f"[{'red' if s.dropped else 'green'}]{s.dropped}[/] sampled frames")
        table.add_row("events", ", ".join(f"{escape(e.label)} {e.start:.1f}-{e.end:.1f} s" for e in s.events[-3:])
                      or "none")
        return table
