"""The hand-over between the reader and the model: a thread that decodes and samples the source, and a
bounded queue of the sampled frames between it and the main thread, which embeds and scores them.

Why a thread and a bound: a live source (a URL, a camera, a file read with --realtime) delivers frames at
the rate they happen whether the model keeps up or not. Were they waiting for the model, each would wait
longer than the last and latency would grow without end. So a live frame that finds the queue full pushes
out the oldest waiting one (counted in `dropped`): a frame waits at most `size` frames' worth of model
time. A file has no such hurry: its reader waits for room, and every sampled frame is embedded.
"""
from __future__ import annotations

import queue
import threading

from pipeline.watch.sources import Frame, Reader, Sampler, SourceBroken

END = object()  # the reader's last item, however the source ended; how it ended is in Feed.error


class Feed:
    """The reader thread: decoded, sampled frames into a queue of `size`; live: the oldest dropped when full."""

    def __init__(self, reader: Reader, sampler: Sampler, size: int, live: bool) -> None:
        self.reader, self.sampler, self.live = reader, sampler, live
        self.items: queue.Queue = queue.Queue(maxsize=size)
        self.stop = threading.Event()
        self.dropped = 0  # sampled frames pushed out of a full queue (a live source only)
        self.error: BaseException | None = None  # why the source stopped giving frames, when it broke
        self.thread = threading.Thread(target=self._run, name="watch-reader", daemon=True)

    def start(self) -> "Feed":
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            for frame in self.reader.frames():
                if self.stop.is_set():
                    return
                if self.sampler.keep(frame.time):
                    self._put(frame)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which says it in one line
            self.error = exc
        finally:
            self._put(END)

    def _put(self, item: Frame | object) -> None:
        """A live frame goes in at once, pushing out the oldest when the queue is full; anything else (a file's
        frame, END) waits for room until the feed is closed."""
        if self.live and item is not END:
            while True:
                try:
                    self.items.put_nowait(item)
                    return
                except queue.Full:
                    try:  # the model is behind: the oldest waiting frame goes, so latency stays bounded
                        self.items.get_nowait()
                        self.dropped += 1
                    except queue.Empty:
                        pass
        while not self.stop.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def take(self, most: int, timeout: float) -> list:
        """The next frames, at least one and at most `most` (a backlog is embedded as one batch); END last.
        SourceBroken when nothing comes for `timeout` seconds."""
        try:
            first = self.items.get(timeout=timeout)
        except queue.Empty:
            raise SourceBroken(f"{self.reader.source.name} stalled: no frame for {timeout:g} s "
                               f"(at {self.reader.position:.1f} s)") from None
        got = [first]
        while first is not END and len(got) < most:
            try:
                item = self.items.get_nowait()
            except queue.Empty:
                break
            got.append(item)
            if item is END:
                break
        return got

    def close(self) -> None:
        """Stop the reader: it sees `stop` at its next frame; a put waiting for room gives up within 0.1 s."""
        self.stop.set()
        while True:  # a blocked put returns once there is room; a reader stuck in a read is a daemon
            try:
                self.items.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=1.0)
