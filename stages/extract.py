"""Stage one: every clip of a dataset -> T sampled frames -> frozen VGG-16 trunk -> the HDF5 feature cache.

Three things run at once: decoding in worker processes (each clip with a time limit), the backbone on
batches of frames that span clips (main thread), and shard writes (a writer thread). Finished clips are
flushed to shards as they complete, so an interruption loses at most one shard's worth of work.

A rerun follows the dataset: entries whose file is gone are dropped, entries whose file changed (by content
fingerprint) are dropped and extracted again, and an unchanged dataset costs one stat per clip and leaves the
cache file untouched.
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

from pipeline.config import ExtractConfig, check
from pipeline.video.folders import Clip, Discovery, discover
from pipeline.features.cache import (CacheError, ClipFeatures, FeatureCache, ShardWriter, extraction_settings, join,
                               remove_unfinished, settings_mismatch, shard_paths, source_changed, source_fingerprint)
from pipeline.video.decode import DecodedClip, decode_sampled, enter_decode_worker
from pipeline.progress import progress_bar
from pipeline.video.workers import TimedPool, stop_producer
from pipeline.errors import UserError



class ExtractError(UserError):
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
    removed: int = 0  # clips and failures dropped because their file is gone (or a class folder now has videos)
    changed: int = 0  # clips and failures dropped because their file changed; extracted again
    unverified: int = 0  # clips in the cache with no source fingerprint (made before fingerprints existed)
    redecoded: list[tuple[str, str]] = field(default_factory=list)  # (key, why): decoded by PyAV, not decord

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


def decode_task(task: tuple[str, int]) -> tuple[DecodedClip, str]:
    """Worker-process entry point: (path, frames) -> the sampled frames and the file's source fingerprint.

    Hashing here reads the file in parallel with the other workers, just before decord reads it again from
    the page cache. FFmpeg's and decord's own complaints about broken files would scribble over the
    progress bar; the reason is recorded in the cache instead, so the worker's stderr goes to /dev/null.
    """
    enter_decode_worker()
    path, frames = task
    source = _fingerprint_or_blank(Path(path))  # a missing file fails in decode, with its reason
    return decode_sampled(path, frames), source


def _fingerprint_or_blank(path: Path) -> str:
    try:
        return source_fingerprint(path)
    except OSError:
        return ""


def _versions() -> dict[str, str]:
    """Versions of what made the features, each asked of the module itself (decord may be decord2 or 0.6)."""
    import importlib

    import pipeline

    found = {"pipeline": pipeline.__version__}
    for name in ("torch", "torchvision", "decord", "av", "h5py"):
        try:
            found[name] = str(getattr(importlib.import_module(name), "__version__", "unknown"))
        except Exception:  # noqa: BLE001 - a broken optional install must not stop the record
            found[name] = "not importable"
    return found


class _Incompatible(ExtractError):
    """The cache or a shard was made with other settings, or cannot be read: --overwrite starts over."""


def _start_over(cache: Path) -> None:
    """--overwrite on an incompatible cache: the cache and its unjoined shards go."""
    cache.unlink(missing_ok=True)
    shutil.rmtree(parts_dir_for(cache), ignore_errors=True)


def _require_compatible(existing: FeatureCache, cache: Path, settings: dict) -> None:
    """Refuse to mix features made with other settings into `cache`."""
    diffs = settings_mismatch(existing.settings, settings)
    if diffs:
        raise _Incompatible(f"{cache} was made with other settings ({'; '.join(diffs)}); "
                            "pass --overwrite to start over, or write to another path")


@dataclass
class _Plan:
    """What a rerun keeps, drops and redoes of the entries that the cache and its shards hold."""

    done: set[str] = field(default_factory=set)  # keys with a current row (or failure, unless retrying)
    drop: set[tuple[str, str]] = field(default_factory=set)  # stale (key, fingerprint) entries, for join
    removed: set[str] = field(default_factory=set)  # keys whose file is gone
    changed: set[str] = field(default_factory=set)  # keys whose file changed since it was extracted


def _plan(cache: Path, found: Discovery, settings: dict, retry_failed: bool) -> _Plan:
    """Check every row and failure of the cache and its shards against the dataset as it is now.

    Each file is opened once: its settings must match `settings` (else ExtractError), then its entries
    are read.

    A key no longer discovered is gone; a fingerprint that no longer matches its file is changed; both are
    dropped (changed ones are then extracted again). An entry without a fingerprint (a cache from before
    they were recorded) cannot be checked for changes: it is kept while its file exists and is not
    rewritten just to add one (delete the cache to extract everything again). A class-folder failure ("name/")
    is gone once the folder holds videos or no longer exists.
    """
    paths: dict[str, Path | None] = {c.video: c.path for c in found.clips}
    paths.update((f"{name}/", None) for name in found.empty_classes)
    verdicts: dict[tuple[str, str], str] = {}  # the same entry in the cache and a shard is checked once
    plan = _Plan()
    for source in ([cache] if cache.exists() else []) + shard_paths(parts_dir_for(cache)):
        entries = _entries(source, cache, settings)
        for video, fingerprint, is_failure in entries:
            entry = (video, fingerprint)
            if entry not in verdicts:
                verdicts[entry] = _verdict(video, fingerprint, paths)
            if verdicts[entry] == "current":
                if not (is_failure and retry_failed):
                    plan.done.add(video)
                continue
            plan.drop.add(entry)
            (plan.removed if verdicts[entry] == "gone" else plan.changed).add(video)
    return plan


def _entries(source: Path, cache: Path, settings: dict) -> list[tuple[str, str, bool]]:
    """(key, fingerprint, is_failure) of every row and failure of `source`, a part of `cache`."""
    try:
        with FeatureCache(source) as existing:
            _require_compatible(existing, cache, settings)
            entries = [(v, s, False) for v, s in zip(existing.videos, existing.source)]
            return entries + [(v, s, True) for (v, _), s in zip(existing.failed, existing.failed_source)]
    except CacheError as exc:
        raise _Incompatible(f"{exc}; pass --overwrite to start a new cache") from None


def _verdict(video: str, fingerprint: str, paths: dict[str, Path | None]) -> str:
    """"gone", "changed" or "current" (also a class-folder entry, or one without a fingerprint)."""
    if video not in paths:
        return "gone"
    path = paths[video]
    if path is None or not source_changed(fingerprint, path):
        return "current"
    return "changed"


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
    from pipeline.features.backbone import Backbone

    videos, cache = Path(videos), Path(cache)
    cfg = check(cfg)
    found = discover(videos)
    try:
        backbone = Backbone(cfg.weights, cfg.layer, cfg.image_size, cfg.device, cfg.precision)
    except ValueError as exc:  # an option the user gave: layer, device, precision, image size
        raise ExtractError(str(exc)) from None
    provenance = backbone.provenance()
    settings = extraction_settings(provenance, cfg.frames)
    summary = ExtractSummary(cache)
    start = time.monotonic()
    with exclusive_lock(cache):
        parts = parts_dir_for(cache)
        remove_unfinished(parts)
        cache.with_name(cache.name + ".tmp").unlink(missing_ok=True)
        try:
            plan = _plan(cache, found, settings, retry_failed)
        except _Incompatible:
            if not overwrite:
                raise
            _start_over(cache)  # only then: same settings resume, so a DVC rerun keeps finished clips
            plan = _plan(cache, found, settings, retry_failed)
        done = plan.done
        todo = [c for c in found.clips if c.video not in done]
        summary.skipped = len(found.clips) - len(todo)
        summary.removed, summary.changed = len(plan.removed), len(plan.changed)
        writer = ShardWriter(parts, settings, every_clips=int(os.environ.get("PIPELINE_SHARD_CLIPS", "32")))
        for name in found.empty_classes:
            key = f"{name}/"
            if key not in done:
                writer.add_failure(key, "class folder holds no video files")
                summary.failed.append((key, "class folder holds no video files"))
        try:
            if todo:
                _extract(todo, backbone, cfg, writer, summary, strict, progress)
        except BaseException:
            _flush_kept(writer)  # finished clips survive an interruption, a --strict stop or a dead thread
            raise
        _flush_kept(writer, strict=True)
        if shard_paths(parts) or plan.drop or not cache.exists():
            attrs = dict(settings, precision=provenance.get("precision"), dataset_root=str(videos.resolve()),
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         versions=_versions())
            join(cache, parts, attrs, drop=plan.drop)
        with FeatureCache(cache) as result:
            summary.total_clips, summary.total_failed = len(result), len(result.failed)
            summary.unverified = result.source.count("")
    summary.seconds = time.monotonic() - start
    return summary


class _Stage:
    """A helper thread of the extraction pipeline whose death is seen, never waited on forever.

    The thread's body runs under a guard: an exception (a decoder pool that cannot spawn: EAGAIN, ENOMEM,
    too many open files; a writer that cannot write: disk full, an h5py error) is kept in `error` and
    `done` is set, so the main loop that feeds or drains it stops with that error instead of blocking.
    """

    def __init__(self, name: str, body) -> None:
        self.name, self.error = name, None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._guarded, args=(body,), name=name, daemon=True)

    def _guarded(self, body) -> None:
        try:
            body()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread, with the stage's name
            self.error = exc
        finally:
            self.done.set()

    def put(self, items: queue.Queue, item) -> None:
        """Put `item` for this stage to consume; raises if the stage has died (its queue would never drain)."""
        while True:
            self.raise_if_failed()
            try:
                items.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def get(self, items: queue.Queue):
        """The next item this stage produced; raises if it died before producing its end marker."""
        while True:
            try:
                return items.get(timeout=0.2)
            except queue.Empty:
                if self.done.is_set() and items.empty():
                    self.raise_if_failed()
                    raise ExtractError(f"the {self.name} stopped without finishing; finished clips are kept, "
                                       "rerun to resume")

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise ExtractError(f"the {self.name} failed: {_describe(self.error)}; finished clips are kept, "
                               "rerun to resume") from None


def _describe(exc: BaseException) -> str:
    from pipeline.errors import first_line

    text = first_line(exc)
    return text if text == exc.__class__.__name__ else f"{exc.__class__.__name__}: {text}"


def _flush_kept(writer: ShardWriter, strict: bool = False) -> None:
    """Write the writer's last shard. Under another error (`strict` False) a failure here stays silent: the
    first error is the one to report; on the normal path it is an ExtractError, not a traceback."""
    try:
        writer.flush()
    except Exception as exc:  # noqa: BLE001 - disk full, an h5py error
        if strict:
            raise ExtractError(f"cannot write a shard in {writer.parts_dir}: {_describe(exc)}; finished "
                               "clips are kept, rerun to resume") from None


def _extract(todo: list[Clip], backbone, cfg: ExtractConfig, writer: ShardWriter, summary: ExtractSummary,
             strict: bool, progress: bool) -> None:
    """Decode (workers) -> backbone (this thread) -> shards (writer thread), with progress.

    Either helper thread dying ends the run with an ExtractError (exit 2) rather than a hang; whatever the
    backbone finished is handed to the writer first, and flushed shards stay for the rerun.
    """
    writes: queue.Queue = queue.Queue(maxsize=64)
    decoded_q: queue.Queue = queue.Queue(maxsize=2 * cfg.workers + 2)
    stop = threading.Event()
    by_path = {str(c.path): c for c in todo}
    precision = str(backbone.provenance().get("precision") or "")

    def write_loop() -> None:
        while (item := writes.get()) is not None:
            if isinstance(item, tuple):  # (key, reason, path): hashed here, off the backbone's thread
                video, reason, path = item
                writer.add_failure(video, reason, _fingerprint_or_blank(path))
            else:
                writer.add(item)

    def decode_loop() -> None:  # ends with None on success only: a failure is seen through _Stage.get
        with TimedPool(decode_task, cfg.workers, cfg.timeout) as pool:
            for task, result in pool.imap_unordered((str(c.path), cfg.frames) for c in todo):
                if stop.is_set():
                    return
                decoded_q.put((by_path[task[0]], result))
        decoded_q.put(None)

    writing, decoding = _Stage("cache writer", write_loop), _Stage("decoding workers", decode_loop)
    writing.thread.start()
    decoding.thread.start()
    t0 = time.monotonic()

    with progress_bar("extract", len(todo), "clips", enabled=progress) as bar:

        def advance() -> None:
            elapsed = max(time.monotonic() - t0, 1e-9)
            bar.advance(note=f"{summary.extracted / elapsed:.2f} clips/s {summary.frames / elapsed:.1f} frames/s")

        sources: dict[str, str] = {}  # key -> fingerprint, from decode until the clip's features are done

        def emit(clip: Clip, decoded: DecodedClip, feats: np.ndarray) -> None:
            writing.put(writes, ClipFeatures(clip.video, clip.label, feats, decoded.frame_index, decoded.num_frames,
                                             decoded.fps, decoded.height, decoded.width, sources.pop(clip.video),
                                             decoded.decoder, precision))
            summary.extracted += 1
            summary.frames += len(feats)
            if decoded.decoder != "decord":
                summary.redecoded.append((clip.video, decoded.note))
            advance()

        batcher = _Batcher(backbone, cfg.batch_size, emit)
        try:
            try:
                while (item := decoding.get(decoded_q)) is not None:
                    clip, result = item
                    if isinstance(result, BaseException):
                        reason = str(result) or result.__class__.__name__
                        writing.put(writes, (clip.video, reason, clip.path))
                        summary.failed.append((clip.video, reason))
                        advance()
                        if strict:
                            raise ExtractError(f"{clip.video}: {reason} (--strict stops at the first failure)")
                        continue
                    if not isinstance(result, tuple):  # a decode_task that returns frames only (test doubles)
                        result = (result, _fingerprint_or_blank(clip.path))
                    decoded, sources[clip.video] = result
                    batcher.add(clip, decoded)
            finally:
                if writing.error is None:
                    batcher.finish()  # clips already decoded are not thrown away, whatever stopped the loop
            summary.extract_seconds = time.monotonic() - t0
        finally:
            stop_producer(stop, decoding.thread, decoded_q)
            if writing.error is None:
                writing.put(writes, None)
            writing.thread.join()
    writing.raise_if_failed()
