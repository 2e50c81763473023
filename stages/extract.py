"""Stage one: every clip of a dataset -> T sampled frames -> frozen VGG-16 trunk -> the HDF5 feature cache.

Three things run at once: decoding in worker processes (each clip with a time limit), the backbone on
batches of frames that span clips (main thread), and shard writes (a writer thread). Finished clips are
flushed to shards as they complete, so an interruption loses at most one shard's worth of work.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import os
import queue
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.config import ExtractConfig
from pipeline.data import Clip, discover
from pipeline.features import (ClipFeatures, FeatureCache, ShardWriter, join, remove_unfinished, settings_mismatch,
                                shard_paths, CacheError)
from pipeline.video import DecodedClip, decode_sampled, silence_native_stderr
from pipeline.workers import TimedPool

SAMPLING = "segment-centre: floor((k + 0.5) * n / T) over frames decoded in order"


class ExtractError(Exception):
    """Extraction cannot start or must stop; the message says what to do."""


@dataclass
class ExtractSummary:
    cache: Path
    extracted: int = 0
    skipped: int = 0  # already in the cache (or already recorded as failed)
    failed: list[tuple[str, str]] = field(default_factory=list)
    frames: int = 0
    seconds: float = 0.0  # the whole run, start-up and join included
    extract_seconds: float = 0.0  # from the first clip dispatched to the last clip handed to the writer
    total_clips: int = 0  # in the cache after the run
    total_failed: int = 0

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def parts_dir_for(cache: Path) -> Path:
    return cache.with_name(cache.name + ".parts")


@contextmanager
def exclusive_lock(cache: Path) -> Iterator[None]:
    """One writer per cache: a second extract on the same cache refuses at once instead of interleaving."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    lock_path = cache.with_name(cache.name + ".lock")
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ExtractError(f"{cache} is being written by {holder}; wait for it to finish") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    try:
        yield
    finally:
        handle.close()


def decode_task(task: tuple[str, int]) -> DecodedClip:
    """Worker-process entry point: (path, frames) -> the sampled frames.

    FFmpeg's and decord's own complaints about broken files would scribble over the progress bar; the
    reason is recorded in the cache instead, so the worker's stderr goes to /dev/null.
    """
    silence_native_stderr()
    path, frames = task
    return decode_sampled(path, frames)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import pipeline

    found = {"pipeline": pipeline.__version__}
    for name, dist in (("torch", "torch"), ("torchvision", "torchvision"), ("decord", "decord2"), ("h5py", "h5py")):
        try:
            found[name] = version(dist)
        except PackageNotFoundError:
            found[name] = "decord 0.6" if name == "decord" else "unknown"
    return found


def _check_compatible(cache: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to mix features made with other settings, or start over when asked to."""
    parts = parts_dir_for(cache)
    if overwrite:
        cache.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
        return
    for source in ([cache] if cache.exists() else []) + shard_paths(parts):
        try:
            with FeatureCache(source) as existing:
                diffs = settings_mismatch(existing.settings, settings)
        except CacheError as exc:
            raise ExtractError(f"{exc}; pass --overwrite to start a new cache") from None
        if diffs:
            raise ExtractError(f"{cache} was made with other settings ({'; '.join(diffs)}); "
                               "pass --overwrite to start over, or write to another path")


def _already_done(cache: Path, retry_failed: bool) -> set[str]:
    done: set[str] = set()
    for source in ([cache] if cache.exists() else []) + shard_paths(parts_dir_for(cache)):
        with FeatureCache(source) as existing:
            done.update(existing.videos)
            if not retry_failed:
                done.update(v for v, _ in existing.failed)
    return done


class _Batcher:
    """Packs preprocessed frames of consecutive clips into backbone batches and reassembles clips."""

    def __init__(self, backbone, batch_size: int, emit):
        self.backbone, self.batch_size, self.emit = backbone, batch_size, emit
        self._frames: list = []  # preprocessed (t, 3, S, S) tensors waiting for the backbone
        self._pending: list[list] = []  # [clip, decoded, list of feature blocks, frames still missing]
        self._queued = 0

    def add(self, clip: Clip, decoded: DecodedClip) -> None:
        import torch

        x = self.backbone.preprocess(torch.from_numpy(decoded.frames))  # (T, 3, S, S)
        self._frames.append(x)
        self._pending.append([clip, decoded, [], len(x)])
        self._queued += len(x)
        while self._queued >= self.batch_size:
            self._run(self.batch_size)

    def finish(self) -> None:
        if self._queued:
            self._run(self._queued)

    def _run(self, count: int) -> None:
        import torch

        batch = torch.cat(self._frames)  # (F, 3, S, S)
        head, rest = batch[:count], batch[count:]
        self._frames = [rest] if len(rest) else []
        self._queued = len(rest)
        feats = self.backbone.forward(head).to(torch.float16).cpu().numpy()  # (count, C, h, w)
        offset = 0
        while offset < count:
            entry = self._pending[0]
            take = min(entry[3], count - offset)
            entry[2].append(feats[offset:offset + take])
            entry[3] -= take
            offset += take
            if entry[3] == 0:
                self._pending.pop(0)
                clip, decoded, blocks, _ = entry
                self.emit(clip, decoded, np.concatenate(blocks))


def run(videos: Path, cache: Path, cfg: ExtractConfig, *, overwrite: bool = False, strict: bool = False,
        retry_failed: bool = False, progress: bool = True) -> ExtractSummary:
    """Extract every clip of `videos` that `cache` does not hold yet; return what happened."""
    from rich.console import Console

    from pipeline.backbone import Backbone

    console = Console(stderr=True)
    videos, cache = Path(videos), Path(cache)
    if cfg.frames < 1:
        raise ExtractError(f"--frames must be >= 1, got {cfg.frames}")
    found = discover(videos)
    try:
        backbone = Backbone(cfg.weights, cfg.layer, cfg.image_size, cfg.device, cfg.precision)
    except ValueError as exc:  # an option the user gave: layer, device, precision, image size
        raise ExtractError(str(exc)) from None
    provenance = backbone.provenance()
    settings = {
        "backbone": provenance["backbone"], "layer": cfg.layer,
        "weights": f"{provenance['weights']} sha256:{provenance['weights_sha256']}",
        "image_size": cfg.image_size, "frames": cfg.frames, "sampling": SAMPLING,
        "mean": list(provenance["mean"]), "std": list(provenance["std"]), "dtype": "float16",
    }
    summary = ExtractSummary(cache)
    start = time.monotonic()
    with exclusive_lock(cache):
        parts = parts_dir_for(cache)
        remove_unfinished(parts)
        cache.with_name(cache.name + ".tmp").unlink(missing_ok=True)
        _check_compatible(cache, settings, overwrite)
        done = _already_done(cache, retry_failed)
        todo = [c for c in found.clips if c.video not in done]
        summary.skipped = len(found.clips) - len(todo)
        writer = ShardWriter(parts, settings, every_clips=int(os.environ.get("PIPELINE_SHARD_CLIPS", "32")))
        for name in found.empty_classes:
            key = f"{name}/"
            if key not in done:
                writer.add_failure(key, "class folder holds no video files")
                summary.failed.append((key, "class folder holds no video files"))
        try:
            if todo:
                _extract(todo, backbone, cfg, writer, summary, strict, progress, console)
        finally:
            writer.flush()  # finished clips survive an interruption or a --strict stop
        if shard_paths(parts) or not cache.exists():
            attrs = dict(settings, precision=provenance.get("precision"), dataset_root=str(videos.resolve()),
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         versions=_versions())
            join(cache, parts, attrs)
        with FeatureCache(cache) as result:
            summary.total_clips, summary.total_failed = len(result), len(result.failed)
    summary.seconds = time.monotonic() - start
    return summary


def _extract(todo: list[Clip], backbone, cfg: ExtractConfig, writer: ShardWriter, summary: ExtractSummary,
             strict: bool, progress: bool, console) -> None:
    """Decode (workers) -> backbone (this thread) -> shards (writer thread), with progress."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    writes: queue.Queue = queue.Queue(maxsize=64)
    decoded_q: queue.Queue = queue.Queue(maxsize=2 * cfg.workers + 2)
    stop = threading.Event()
    by_path = {str(c.path): c for c in todo}

    def write_loop() -> None:
        while (item := writes.get()) is not None:
            if isinstance(item, tuple):
                writer.add_failure(*item)
            else:
                writer.add(item)

    def decode_loop() -> None:
        with TimedPool(decode_task, cfg.workers, cfg.timeout) as pool:
            for task, result in pool.imap_unordered((str(c.path), cfg.frames) for c in todo):
                if stop.is_set():
                    break
                decoded_q.put((by_path[task[0]], result))
        decoded_q.put(None)

    columns = (TextColumn("[bold]extract"), BarColumn(), TextColumn("{task.completed}/{task.total} clips"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    writer_thread = threading.Thread(target=write_loop, name="cache-writer", daemon=True)
    decoder_thread = threading.Thread(target=decode_loop, name="decoders", daemon=True)
    writer_thread.start()
    decoder_thread.start()
    t0 = time.monotonic()

    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task_id = bar.add_task("extract", total=len(todo), rate="")

        def advance() -> None:
            elapsed = max(time.monotonic() - t0, 1e-9)
            bar.advance(task_id)
            bar.update(task_id,
                       rate=f"{summary.extracted / elapsed:.2f} clips/s {summary.frames / elapsed:.1f} frames/s")

        def emit(clip: Clip, decoded: DecodedClip, feats: np.ndarray) -> None:
            writes.put(ClipFeatures(clip.video, clip.label, feats, decoded.frame_index, decoded.num_frames,
                                    decoded.fps, decoded.height, decoded.width))
            summary.extracted += 1
            summary.frames += len(feats)
            advance()

        batcher = _Batcher(backbone, cfg.batch_size, emit)
        try:
            while (item := decoded_q.get()) is not None:
                clip, result = item
                if isinstance(result, BaseException):
                    reason = str(result) or result.__class__.__name__
                    writes.put((clip.video, reason))
                    summary.failed.append((clip.video, reason))
                    advance()
                    if strict:
                        raise ExtractError(f"{clip.video}: {reason} (--strict stops at the first failure)")
                    continue
                batcher.add(clip, result)
            batcher.finish()
            summary.extract_seconds = time.monotonic() - t0
        finally:
            stop.set()
            while decoder_thread.is_alive():  # unblock a decoder waiting on a full queue
                try:
                    decoded_q.get(timeout=0.1)
                except queue.Empty:
                    pass
            writes.put(None)
            writer_thread.join()
