"""The main thread of a watch run: sampled frames from the feed -> features -> windows -> events, the
annotated video and the summary; and how a run is stopped.

Everything here runs in the main thread, one batch of frames at a time, so a stop (Ctrl-C, or SIGTERM made
to raise `Stopped` the same way) lands between two steps of the model, never inside the writing of the
outputs: `sigterm_ignored` holds a second SIGTERM off while they are finished, and `Watcher.finish` scores
what no window has scored yet, so every frame read reaches the video and every open event is closed.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Callable, Iterator

from pipeline.watch.annotate import Annotator
from pipeline.watch.events import EventTracker
from pipeline.watch.feed import END, Feed
from pipeline.watch.online import OnlineModel, Window
from pipeline.watch.sources import Frame
from pipeline.watch.summary import WatchSummary


class Stopped(Exception):
    """SIGTERM: stop, keep what was done (as Ctrl-C's KeyboardInterrupt does)."""


def stop_on_sigterm() -> contextlib.AbstractContextManager[None]:
    """Inside: SIGTERM raises Stopped in the main thread."""
    return _on_sigterm(_raise_stopped)


def sigterm_ignored() -> contextlib.AbstractContextManager[None]:
    """Inside: SIGTERM ignored (the outputs are being finished: a second one must not cut a file's index)."""
    return _on_sigterm(signal.SIG_IGN)


def _raise_stopped(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise Stopped()


@contextlib.contextmanager
def _on_sigterm(handler) -> Iterator[None]:
    """SIGTERM handled by `handler` inside, the handler before restored after. Only the main thread can set
    one: elsewhere (a run started from a thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Watcher:
    """The model's side of a run: it takes the feed's frames, scores the windows that fall due, and hands
    each to the event tracker, the annotator (None: no --out), the summary and `on_window`."""

    def __init__(self, model: OnlineModel, tracker: EventTracker, annotator: Annotator | None,
                 summary: WatchSummary, top_k: int, on_window: Callable[[Window], None] | None = None) -> None:
        self.model, self.tracker, self.annotator, self.summary = model, tracker, annotator, summary
        self.top_k, self.on_window = top_k, on_window
        self.latest: Frame | None = None  # the newest frame embedded: the last window's box is in its pixels

    def follow(self, feed: Feed, batch: int, read_timeout: float, on_batch: Callable[[], None]) -> None:
        """Until the feed ends: take up to `batch` frames, embed them, score the windows that fall due;
        `on_batch()` after each (the live view). The reader's error, if it broke, is raised here."""
        while True:
            items = feed.take(batch, read_timeout)
            frames: list[Frame] = [f for f in items if f is not END]
            if frames:
                features = self.model.embed([f.image for f in frames])  # (B, C, h, w) float16
                windows = self.model.add(features, [f.time for f in frames])
                if self.annotator is not None:
                    self.annotator.add(frames)
                for window in windows:
                    self._scored(window, frames[-1])
                self.latest = frames[-1]
                self.summary.took(frames, feed.dropped, time.monotonic())
                on_batch()
            if items[-1] is END:
                if feed.error is not None:
                    raise feed.error
                return

    def finish(self) -> None:
        """However the run ended: score the frames no window has scored yet (one last window over what is
        held), write them, close the events still open."""
        model = self.model
        if model.pending and model.held >= 2 and self.latest is not None:  # with or without --out alike
            self._scored(model.score(), self.latest, last=True)
        if self.annotator is not None:
            self.annotator.write(None, self.tracker.active())
        self.tracker.finish()

    def _scored(self, window: Window, latest: Frame, last: bool = False) -> None:
        """A window scored: its events (their boxes in `latest`'s pixels), its frames written, the summary;
        `on_window` too, but for the last window `finish` scores."""
        height, width = latest.image.shape[:2]  # (H, W, 3)
        self.tracker.scored(window, width, height)
        if self.annotator is not None:
            self.annotator.write(window, self.tracker.active())
        self.summary.scored(window.top(self.top_k))
        if self.on_window is not None and not last:
            self.on_window(window)
