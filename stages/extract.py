"""Stage `extract`: every clip of a dataset -> T sampled frames -> frozen VGG-16 trunk -> the HDF5 feature cache.

The extractor (pipeline/features/extractor.py) decodes in worker processes and runs the backbone on
batches that span clips; this stage plans what to extract (pipeline/features/plan.py: only clips the cache
lacks or whose file changed), hands finished clips to a writer thread that flushes them to shards, and
joins the shards into the cache (a folder cache: writes a new index over them, pipeline/features/shards.py).
An interruption loses at most one shard's worth of work.
"""
from __future__ import annotations

import contextlib
import math
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ExtractConfig, check
from pipeline.errors import describe
from pipeline.features import calibration
from pipeline.features.cache import main_file
from pipeline.features.extractor import Extracted, ExtractError, Extractor, decode_pool, fingerprint_or_blank
from pipeline.features.plan import Incompatible, exclusive_lock, parts_dir_for, rerun_plan, start_over
from pipeline.features.provenance import extraction_settings, relative_root, versions
from pipeline.features.reader import open_cache
from pipeline.features.shards import ClipFeatures, ShardWriter, join, pending_shards, remove_unfinished, temp_path
from pipeline.features.space import disk_full, disk_full_message, require_room_for_join
from pipeline.isolate import ChildDied
from pipeline.progress import progress_bar
from pipeline.stamps import source_date
from pipeline.video.folders import discover
from pipeline.workers import GuardedThread

__all__ = ["ExtractError", "ExtractSummary", "exclusive_lock", "parts_dir_for", "print_summary", "run"]
RESUME = "finished clips are kept, rerun to resume"
ENGINES = ("local", "ray")


@dataclass
class ExtractSummary:
    cache: Path
    extracted: int = 0
    skipped: int = 0  # already in the cache (or already recorded as failed)
    failed: list[tuple[str, str]] = field(default_factory=list)
    frames: int = 0
    seconds: float = 0.0  # the whole run, start-up and join included
    extract_seconds: float = 0.0  # from the first clip dispatched to the last clip handed to the writer
    steady_frames_per_second: float = 0.0  # after the first backbone batch (no start-up, no join)
    total_clips: int = 0  # in the cache after the run
    total_failed: int = 0
    removed: int = 0  # clips and failures dropped because their file is gone (or a class folder now has videos)
    changed: int = 0  # clips and failures dropped because their file changed; extracted again
    unverified: int = 0  # clips in the cache with no source fingerprint (made before fingerprints existed)
    redecoded: list[tuple[str, str]] = field(default_factory=list)  # (key, why): decoded by PyAV, not decord
    startup_seconds: float | None = None  # --engine ray only: ray.init + dataset plan + first backbone actor
    quantize_seconds: float = 0.0  # precision int8: choosing, decoding and calibrating (or reusing) the calibration

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def print_summary(summary: ExtractSummary) -> None:
    """The CLI's table and notes: what was extracted, skipped, stale and failed, and the speed."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"extract -> {escape(str(summary.cache))}")
    # stale: entries whose file is gone (dropped) or changed (extracted again); the line below splits them
    for col in ("extracted", "skipped (cached)", "stale", "failed", "frames/s", "clips in cache", "failed in cache"):
        table.add_column(col, justify="right")
    table.add_row(str(summary.extracted), str(summary.skipped), str(summary.removed + summary.changed),
                  str(len(summary.failed)), f"{summary.frames_per_second:.1f}", str(summary.total_clips),
                  str(summary.total_failed))
    console = Console()
    console.print(table)
    if getattr(summary, "startup_seconds", None) is not None:  # --engine ray: its start-up, apart from the work
        steady = summary.steady_frames_per_second
        console.print(f"  ray: start-up {summary.startup_seconds:.1f} s (ray.init, plan, first backbone actor), "
                      f"extraction {summary.extract_seconds:.1f} s, steady "
                      f"{f'{steady:.1f} frames/s' if steady > 0 else '- (one backbone batch: no steady state)'}",
                      highlight=False)
    if summary.removed or summary.changed:
        console.print(f"  stale: {summary.removed} dropped (file gone), {summary.changed} re-extracted (file changed)",
                      highlight=False)
    if summary.unverified:
        console.print(f"  [yellow]note[/] {summary.unverified} cached clips predate source fingerprints; a file "
                      "replaced under the same name is not detected for them (--overwrite redoes all)",
                      highlight=False)
    if summary.redecoded:
        why = summary.redecoded[0][1]
        console.print(f"  [yellow]note[/] {len(summary.redecoded)} clips decoded with PyAV because decord's frames "
                      f"failed their check (first: {escape(summary.redecoded[0][0])}: {escape(why)}); the cache "
                      "records the decoder per clip", highlight=False)
    for video, reason in summary.failed[:20]:
        console.print(f"  [red]failed[/] {escape(str(video))}: {escape(str(reason))}", highlight=False)
    if len(summary.failed) > 20:
        console.print(f"  ... and {len(summary.failed) - 20} more (see `python -m pipeline info`)")


def run(videos: Path, cache: Path, cfg: ExtractConfig, *, overwrite: bool = False, strict: bool = False,
        retry_failed: bool = False, progress: bool = True, engine: str = "local",
        address: str | None = None) -> ExtractSummary:
    """Extract every clip of `videos` that `cache` does not hold yet; return what happened.

    `engine` "ray" runs the same plan on Ray Data (pipeline/engines/ray_extract.py; `address` joins a cluster).
    """
    if engine not in ENGINES:
        raise ExtractError(f"unknown --engine {engine!r}: choose {' or '.join(ENGINES)}")
    if address and engine != "ray":
        raise ExtractError("--address needs --engine ray")
    videos, cache, cfg = Path(videos), Path(cache), check(cfg)
    found = discover(videos)
    with contextlib.ExitStack() as early:
        pool = None
        if engine == "local" and found.clips:
            # the decode workers start while the backbone is built and the cache is read (on 2 cores their
            # start-up otherwise delays the first batch: docs/BENCHMARKS.md, the extraction's profile)
            pool = early.enter_context(decode_pool(min(cfg.workers, len(found.clips)), cfg.timeout))
            try:
                pool.start()
            except OSError:  # cannot spawn now (EAGAIN, ENOMEM): the run's own start reports it in one line
                pool = None
        return _run(videos, cache, cfg, found, pool, overwrite, strict, retry_failed, progress, engine, address)


def _run(videos: Path, cache: Path, cfg: ExtractConfig, found, pool, overwrite: bool, strict: bool,
         retry_failed: bool, progress: bool, engine: str, address: str | None) -> ExtractSummary:
    from pipeline.features.backbone import Backbone

    try:
        backbone = Backbone(cfg.weights, cfg.layer, cfg.image_size, cfg.device, cfg.precision)
    except ValueError as exc:  # an option the user gave: layer, device, precision, image size
        raise ExtractError(str(exc)) from None
    pinned = backbone.precision if cfg.precision != "auto" else None  # rows made otherwise are made again
    summary, start = ExtractSummary(cache), time.monotonic()
    with exclusive_lock(cache):
        if backbone.needs_calibration and found.clips:  # int8: the cache's calibration, else the dataset's frames
            summary.quantize_seconds = calibration.prepare(backbone, cache, [(c.video, c.path) for c in found.clips],
                                                           cfg.frames)
        settings = extraction_settings(backbone.provenance(), cfg.frames)
        parts = parts_dir_for(cache)
        remove_unfinished(parts)
        temp_path(cache).unlink(missing_ok=True)
        try:
            plan = rerun_plan(cache, found, settings, retry_failed, pinned)
        except Incompatible:
            if not overwrite:
                raise
            start_over(cache)  # only then: same settings resume, so a DVC rerun keeps finished clips
            plan = rerun_plan(cache, found, settings, retry_failed, pinned)
        todo = [c for c in found.clips if c.video not in plan.done]
        summary.skipped = len(found.clips) - len(todo)
        summary.removed, summary.changed = len(plan.removed), len(plan.changed | plan.repinned)
        writer = ShardWriter(parts, settings, every_clips=cfg.shard_clips)
        for key in (f"{name}/" for name in found.empty_classes if f"{name}/" not in plan.done):
            writer.add_failure(key, "class folder holds no video files")
            summary.failed.append((key, "class folder holds no video files"))
        clip_bytes = 2 * cfg.frames * math.prod(backbone.out_shape)  # float16 cubes: what a full disk is told
        try:
            try:
                if todo:
                    if engine == "ray":
                        _extract_ray(todo, cfg, parts, settings, summary, strict, progress, address)
                    else:
                        backbone.compile(cfg.compile, len(todo) * cfg.frames)
                        _extract(todo, backbone, cfg, writer, summary, strict, progress, pool)
            except BaseException:
                _flush_kept(writer)  # finished clips survive an interruption, a --strict stop or a dead thread
                raise
            _flush_kept(writer, strict=True)
            if pending_shards(cache) or plan.drop or not main_file(cache).exists():  # else the cache stays untouched
                # no absolute path and no wall-clock time: two clones of one commit write the same bytes
                attrs = dict(settings, precision=backbone.precision,
                             dataset_root=relative_root(videos, main_file(cache).parent), versions=versions())
                if (when := source_date()) is not None:
                    attrs["created"] = when
                require_room_for_join(cache)
                join(cache, parts, attrs, drop=plan.drop)
        except Exception as exc:
            if (full := disk_full(exc)) is not None:  # one line: what is safe, what room the rest takes
                why = os.strerror(full.errno)  # not h5py's text: HDF5's error stack, over several lines
                raise ExtractError(disk_full_message(cache, len(found.clips), clip_bytes, why)) from None
            if isinstance(exc, ChildDied):
                raise ExtractError(f"the join into {cache} failed: {exc}; {RESUME}") from None
            raise
        with open_cache(cache) as result:
            summary.total_clips, summary.total_failed = len(result), len(result.failed)
            summary.unverified = result.source.count("")
    summary.seconds = time.monotonic() - start
    return summary


def _flush_kept(writer: ShardWriter, strict: bool = False) -> None:
    """Write the writer's last shard. Under another error (`strict` False) a failure here stays silent: the
    first error is the one to report; on the normal path it is an ExtractError, not a traceback."""
    try:
        writer.flush()
    except Exception as exc:  # noqa: BLE001 - disk full, an h5py error
        if strict:
            raise ExtractError(f"cannot write a shard in {writer.parts_dir}: {describe(exc)}; {RESUME}") from None


def _extract(todo, backbone, cfg: ExtractConfig, writer: ShardWriter, summary: ExtractSummary, strict: bool,
             progress: bool, pool=None) -> None:
    """The extractor's clips -> shards (writer thread), with progress. A dead writer ends the run with an
    ExtractError (exit 2) rather than a hang; whatever the backbone finished is handed to it first."""
    writes: queue.Queue = queue.Queue(maxsize=64)
    clips = {c.video: c for c in todo}

    def write_loop() -> None:
        while (item := writes.get()) is not None:
            if isinstance(item, tuple):  # (key, reason, path): hashed here, off the backbone's thread
                writer.add_failure(item[0], item[1], fingerprint_or_blank(item[2]))
            else:
                writer.add(item)

    writing = GuardedThread("cache writer", write_loop, ExtractError, RESUME)
    writing.thread.start()
    extractor = Extractor(backbone, cfg.frames, cfg.batch_size, cfg.workers, cfg.timeout, hint=RESUME)
    with progress_bar("extract", len(todo), "clips", enabled=progress) as bar:

        def on_result(done: Extracted) -> None:
            clip = clips[done.key]
            if done.ok:
                d = done.decoded
                writing.put(writes, ClipFeatures(clip.video, clip.label, done.features, d.frame_index, d.num_frames,
                                                 d.fps, d.height, d.width, done.source, d.decoder, backbone.precision,
                                                 backbone.trunk_form))
                summary.extracted += 1
                summary.frames += len(done.features)
                if d.decoder != "decord":
                    summary.redecoded.append((clip.video, d.note))
            else:
                writing.put(writes, (clip.video, done.error, clip.path))
                summary.failed.append((clip.video, done.error))
            elapsed = max(time.monotonic() - extractor.timing.started, 1e-9)
            bar.advance(note=f"{summary.extracted / elapsed:.2f} clips/s {summary.frames / elapsed:.1f} frames/s")
            if strict and not done.ok:
                raise ExtractError(f"{clip.video}: {done.error} (--strict stops at the first failure)")

        try:
            timing = extractor.run([(c.video, c.path) for c in todo], on_result, lambda: writing.error is None, pool)
            summary.extract_seconds, summary.steady_frames_per_second = timing.seconds, timing.steady_frames_per_second
        finally:
            if writing.error is None:
                writing.put(writes, None)
            writing.thread.join()
    writing.raise_if_failed()


def _extract_ray(todo, cfg: ExtractConfig, parts: Path, settings: dict, summary: ExtractSummary, strict: bool,
                 progress: bool, address: str | None) -> None:
    """The same `todo` on Ray Data, into the same `parts` shards (joined by run() as always)."""
    from pipeline.engines import ray_extract

    out = ray_extract.extract(todo, cfg, parts, settings, address=address, progress=progress)
    summary.extracted, summary.frames = out.extracted, out.frames
    summary.failed += out.failed
    summary.redecoded += out.redecoded
    summary.extract_seconds, summary.steady_frames_per_second = out.extract_seconds, out.steady_frames_per_second
    summary.startup_seconds = out.startup_seconds
    if strict and out.failed:  # Ray runs clips in parallel: the shards hold every clip, the run still fails
        video, reason = out.failed[0]
        raise ExtractError(f"{video}: {reason} (--strict: {len(out.failed)} clips failed; {RESUME})")
