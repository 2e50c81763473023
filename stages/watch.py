"""`watch`: a trained head online, on a file, a folder, a stream or a camera (not a DVC stage).

In: SOURCE, the checkpoint written by `train` (its backbone rebuilt as predict does), params.yaml's `watch`
section, --alert. Out: the summary (returned; the CLI prints it), and where asked, --out (the annotated
video, written frame by frame) and --events (one JSON line per event, flushed as each closes).

How, in pipeline/watch/: a reader thread decodes the source in order and samples it at the interval the
model was trained at (sources.py), through a bounded queue (feed.py: a live source drops the oldest frame
when the model falls behind, a file none); the main thread embeds each sampled frame once and scores the
last T every S (online.py, loop.py), turns the windows into events (events.py) and draws the frames
(annotate.py).

How a run ends: the source ends (exit status 0); it is stopped (Ctrl-C or SIGTERM: the work so far is
kept, also 0); it breaks (cut short, a decoding error, no frame for `watch.read_timeout` seconds: 1). In
every case the open events are closed and written, and the annotated video is finished so it plays.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from pipeline.config import WatchConfig, check
from pipeline.watch.annotate import AnnotatedVideo, Annotator
from pipeline.watch.events import EventLog, EventTracker, parse_alerts
from pipeline.watch.feed import Feed
from pipeline.watch.loop import Stopped, Watcher, sigterm_ignored, stop_on_sigterm
from pipeline.watch.online import Window, load_online
from pipeline.watch.sources import Reader, Sampler, SourceBroken, parse_source
from pipeline.watch.summary import WatchSummary, print_summary
from pipeline.watch.view import LiveView

__all__ = ["WatchSummary", "print_summary", "run"]  # print_summary: the CLI's lines, pipeline/watch/summary.py


def run(source: str, model_path: Path, cfg: WatchConfig, *, out: Path | None = None, events: Path | None = None,
        alerts: Sequence[str] = (), weights: str | None = None, realtime: bool = False, progress: bool = True,
        alpha: float = 0.5, on_window: Callable[[Window], None] | None = None) -> WatchSummary:
    """Watch `source` with the head at `model_path`; see the module docstring. Everything a user can get
    wrong (the source, the model, --out, --alert) is a UserError before the first frame.

    `realtime` reads a file at its own frame rate, as a camera delivers it; `alpha` is the heatmap's opacity
    (render's); `on_window` sees every window the run scores."""
    cfg = check(cfg)
    spec = parse_source(source)
    video = AnnotatedVideo(out, alpha) if out is not None else None  # checks the suffix and the folder
    model, ckpt, interval, note = load_online(model_path, cfg.device, weights, cfg.window, cfg.stride)
    thresholds = parse_alerts(alerts, ckpt.classes, cfg.threshold)
    live = spec.live or realtime
    reader = Reader(spec, cfg.read_timeout, paced=live)
    reader.check()  # SourceError (exit 2) now, before anything is written
    # compiled when the run's sampled frames pay the compilation back: a file's from its headers. A live source
    # stays eager under auto: its batches are 1 to `batch` frames, each padded to the first one's size when
    # compiled, and frames would be dropped while it compiles (5-13 s); `compile: on` compiles it anyway
    model.backbone.compile(cfg.compile, 0 if live and cfg.compile == "auto" else reader.sampled_frames(interval))

    summary = WatchSummary(source, interval, model.window, model.stride, live, note=note, out=out)
    log = EventLog(events) if events is not None else None
    tracker = EventTracker(ckpt.classes, thresholds, cfg.hysteresis, cfg.min_duration,
                           on_event=log.write if log is not None else None)
    summary.events = tracker.events  # the same list: the live view shows them as they close
    top_k = min(cfg.top_k, len(ckpt.classes))
    annotator = Annotator(video, top_k) if video is not None else None
    watcher = Watcher(model, tracker, annotator, summary, top_k, on_window)
    feed = Feed(reader, Sampler(interval), cfg.queue if live else 2 * cfg.batch, live)
    view = LiveView(summary, enabled=progress)
    started = time.monotonic()
    with stop_on_sigterm():
        try:
            with view:
                feed.start()
                watcher.follow(feed, cfg.batch, cfg.read_timeout, view.update)
        except (KeyboardInterrupt, Stopped) as exc:
            summary.outcome = "stopped"
            summary.message = f"stopped by {'SIGTERM' if isinstance(exc, Stopped) else 'Ctrl-C'} at " \
                              f"{reader.position:.1f} s of {spec.name}"
        except SourceBroken as exc:
            summary.outcome, summary.message = "broken", str(exc)
        finally:
            with sigterm_ignored():  # a second SIGTERM must not cut the video's index short
                feed.close()
                wall = time.monotonic() - started  # the run's, without finishing its outputs
                try:
                    watcher.finish()
                finally:
                    if video is not None:
                        video.close()
                    if log is not None:
                        log.close()
                    summary.ended(feed.dropped, reader.position, wall, video.frames if video is not None else None)
    return summary
