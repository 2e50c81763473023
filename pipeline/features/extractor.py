"""The one extractor: video files -> sampled frames (decode pool) -> backbone batches that span clips ->
float16 feature cubes, the rows the cache stores. `extract` writes them to shards, `predict` applies a head
to them, and the engines run the same pieces past one process.

Decoding runs in worker processes (each clip with a time limit: a hung or crashing decoder costs only its
clip) fed by a helper thread; the backbone runs in the calling thread on batches of `batch_size` frames
that span clip boundaries (so no batch is short but the last), and each clip is handed to `on_result` as
soon as its last frame is embedded. No warm-up batch while the workers start: measured on 2 cores
(bench/extract.py, paired runs) it competed with the workers' start-up and lost 10% end to end.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.errors import UserError
from pipeline.features.provenance import source_fingerprint
from pipeline.video.decode import DecodedClip, VideoError, decode_sampled, enter_decode_worker, warm_decode_worker
from pipeline.workers import GuardedThread, TimedPool, stop_producer


class ExtractError(UserError):
    """Extraction cannot start or must stop; the message says what to do."""


@dataclass
class Extracted:
    """One clip's outcome: its cubes, or why it has none."""

    key: str  # the caller's name for the clip (the cache's video key, or a file for predict)
    path: Path
    decoded: DecodedClip | None = None  # the sampled frames and what decoding saw
    features: np.ndarray | None = None  # (T, C, h, w) float16, as the cache stores them
    source: str = ""  # the file's fingerprint, taken just before it was decoded ("" when unreadable)
    error: str | None = None  # why the clip failed (decode error, timeout, crashed decoder)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Timing:
    """When the backbone's output flowed: steady state excludes the start-up (workers, first batch)."""

    started: float = 0.0  # monotonic time the first clip was dispatched
    first_batch: float = 0.0  # the first backbone batch finished
    first_batch_frames: int = 0
    finished: float = 0.0  # the last clip handed on
    frames: int = 0

    @property
    def seconds(self) -> float:
        return max(self.finished - self.started, 0.0)

    @property
    def steady_frames_per_second(self) -> float:
        span = self.finished - self.first_batch
        frames = self.frames - self.first_batch_frames
        return frames / span if span > 0 and frames > 0 else 0.0


def decode_task(task: tuple[str, int]) -> tuple[DecodedClip, str]:
    """Worker-process entry point: (path, frames) -> the sampled frames and the file's source fingerprint.

    Hashing here reads the file in parallel with the other workers, just before the decoder reads it again
    from the page cache. A folder (predict accepts them) is a failure, not a crash.
    """
    enter_decode_worker()
    path, frames = Path(task[0]), task[1]
    if path.is_dir():
        raise VideoError("folder holds no video files")
    return decode_sampled(path, frames), fingerprint_or_blank(path)


def fingerprint_or_blank(path: Path) -> str:
    """The file's fingerprint; "" when it cannot be read (the decoder then says why)."""
    try:
        return source_fingerprint(path)
    except OSError:
        return ""


def decode_pool(workers: int, timeout: float) -> TimedPool:
    """The timed pool of decode workers (at least one), not started: `start()` it to spawn them early."""
    return TimedPool(decode_task, max(1, workers), timeout, warm=warm_decode_worker)


class _Batcher:
    """Packs preprocessed frames of consecutive clips into backbone batches and reassembles clips."""

    def __init__(self, backbone, batch_size: int, emit: Callable[[Extracted], None], timing: Timing):
        self.backbone, self.batch_size, self.emit, self.timing = backbone, batch_size, emit, timing
        self._frames: list = []  # preprocessed (t, 3, S, S) tensors waiting for the backbone
        self._pending: list[tuple[Extracted, list[np.ndarray]]] = []  # clip, its feature blocks so far
        self._missing: list[int] = []  # frames of each pending clip not embedded yet
        self._queued = 0

    def add(self, clip: Extracted) -> None:
        import torch

        x = self.backbone.preprocess(torch.from_numpy(clip.decoded.frames))  # (T, 3, S, S)
        self._frames.append(x)
        self._pending.append((clip, []))
        self._missing.append(len(x))
        self._queued += len(x)
        while self._queued >= self.batch_size:
            self._run(self.batch_size)

    def finish(self) -> None:
        if self._queued:
            self._run(self._queued)

    def _run(self, count: int) -> None:
        import torch

        batch = self._frames[0] if len(self._frames) == 1 else torch.cat(self._frames)  # (F, 3, S, S)
        head, rest = batch[:count], batch[count:]
        self._frames = [rest] if len(rest) else []
        self._queued = len(rest)
        feats = self.backbone.forward(head).to(torch.float16).cpu().numpy()  # (count, C, h, w)
        if not self.timing.first_batch:
            self.timing.first_batch, self.timing.first_batch_frames = time.monotonic(), count
        offset = 0
        while offset < count:
            take = min(self._missing[0], count - offset)
            self._pending[0][1].append(feats[offset:offset + take])
            self._missing[0] -= take
            offset += take
            if self._missing[0] == 0:
                clip, blocks = self._pending.pop(0)
                self._missing.pop(0)
                clip.features = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
                self.timing.frames += len(clip.features)
                self.emit(clip)


class Extractor:
    """Decode pool -> cross-clip batches -> backbone -> float16 cubes; see the module docstring."""

    def __init__(self, backbone, frames: int, batch_size: int = 32, workers: int = 2, timeout: float = 60.0,
                 hint: str = ""):
        self.backbone, self.frames, self.batch_size = backbone, frames, batch_size
        self.workers, self.timeout = max(1, workers), timeout
        self.hint = hint  # appended to the error when the decoding pool dies, e.g. "rerun to resume"
        self.timing = Timing()

    def run(self, clips: Sequence[tuple[str, Path]], on_result: Callable[[Extracted], None],
            can_flush: Callable[[], bool] = lambda: True, pool: TimedPool | None = None) -> Timing:
        """Extract every (key, path) of `clips`, handing each outcome to `on_result` in completion order.

        A clip that fails is one result with its `error`; a decoding pool that dies (cannot spawn: EAGAIN,
        ENOMEM) is an ExtractError. Whatever stops the run (that, or `on_result` raising), clips already
        decoded are still embedded and handed on first, while `can_flush()` says their consumer can take
        them. `pool`: decode workers the caller started early (see `decode_pool`), else the run starts its own;
        either way the run closes it as soon as the last clip is decoded (workers with FFmpeg and the CUDA
        libraries loaded take ~1 s to exit: done then, it overlaps the last backbone batches).
        """
        decoded_q: queue.Queue = queue.Queue(maxsize=2 * self.workers + 2)
        stop = threading.Event()
        by_path = {str(path): (key, Path(path)) for key, path in clips}
        pool = pool or decode_pool(min(self.workers, len(by_path)), self.timeout)

        def decode_loop() -> None:  # ends with None on success only: a failure is seen through get()
            try:
                for task, result in pool.imap_unordered((path, self.frames) for path in by_path):
                    if stop.is_set():
                        return
                    decoded_q.put((by_path[task[0]], result))
            finally:
                pool.close()
            decoded_q.put(None)

        decoding = GuardedThread("decoding workers", decode_loop, ExtractError, self.hint)
        self.timing = timing = Timing(started=time.monotonic())
        decoding.thread.start()
        batcher = _Batcher(self.backbone, self.batch_size, on_result, timing)
        try:
            try:
                while (item := decoding.get(decoded_q)) is not None:
                    (key, path), result = item
                    if isinstance(result, BaseException):
                        on_result(Extracted(key, path, error=str(result) or result.__class__.__name__))
                        continue
                    decoded, source = result
                    batcher.add(Extracted(key, path, decoded, source=source))
            finally:
                if can_flush():
                    batcher.finish()  # clips already decoded are not thrown away, whatever stopped the loop
            timing.finished = time.monotonic()
        finally:
            stop_producer(stop, decoding.thread, decoded_q)
        return timing
