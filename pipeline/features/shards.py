"""Writing the cache without ever modifying it in place: shards of finished clips, the join, the index.

Extraction appends finished clips to small shard files (each written under a temporary name and renamed when
complete): in `<cache>.parts/` for a one-file cache, straight into the folder for a folder cache
(`parts_dir_for`). The run then ends with one of two steps over the previous cache and the new shards, which
share the choice of rows (`collect`: later sources win, stale entries are dropped):

* `join` (one file) copies them all into `<cache>.tmp` and renames it over the cache, then deletes the shards;
* `write_index` (folder) writes a new `index.h5` naming which shard and row holds each clip (temporary
  `index.h5.tmp`, then rename), then deletes the shards it no longer references. Old shards are never
  rewritten: adding clips costs their shards and a new index.

After `kill -9` at any moment the cache path holds the previous complete cache or index (or nothing) and
the shards hold the work since, so a rerun resumes. Both go through the one atomic writer
(`pipeline.files.atomic_path`) with fixed temporary names, so the next run finds and deletes what a crash
left (`remove_unfinished`, and extract's removal of `temp_path`).
"""
from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np

from pipeline.features.cache import (
    FORMAT_VERSION,
    INDEX_NAME,
    FeatureCache,
    attr,
    dataset,
    is_folder,
    main_file,
    str_dtype,
)
from pipeline.features.provenance import canonical_fingerprint, per_row_summary
from pipeline.features.reader import FolderCache, indexed_names, retired_names
from pipeline.files import atomic_path
from pipeline.isolate import abandon, run_forked

SHARD_GLOB = "shard-*.h5"


def temp_path(cache_path: Path) -> Path:
    """Where the join (or the index writer) writes before the rename: `<cache>.tmp`, or the folder's
    `index.h5.tmp`; a run that finds it there deletes it (a crashed join)."""
    target = main_file(cache_path)
    return target.with_name(target.name + ".tmp")


def parts_dir_for(cache: Path) -> Path:
    """Where the shards of `cache` are written: `<cache>.parts/` beside a file, the folder itself."""
    cache = Path(cache)
    return cache if is_folder(cache) else cache.with_name(cache.name + ".parts")


@dataclass
class ClipFeatures:
    """One extracted clip, as the writer receives it."""

    video: str  # key relative to the dataset root, POSIX separators
    label: str  # class name
    features: np.ndarray  # (T, C, h, w) float16
    frame_index: np.ndarray  # (T,) int32
    num_frames: int
    fps: float
    height: int
    width: int
    source: str = ""  # source_fingerprint of the file the features were made from; "" = not recorded
    # which decoder made the frames (pipeline.video.decode.DECODERS); render decodes the same way
    decoder: str = "decord"
    precision: str = ""  # the backbone's precision for this clip (fp32 | bf16): one cache may mix them
    trunk: str = "eager"  # eager | compiled: how the backbone ran (extract.compile), within bf16 of each other


def _write_table(h5, clips: Sequence[ClipFeatures], labels: np.ndarray, frames: int) -> None:
    """The per-clip datasets shared by shards and the joined cache."""
    n = len(clips)
    shape = clips[0].features.shape if n else (0, 0, 0, 0)
    dataset(h5, "features", shape=(n, *shape), dtype="float16",
                      chunks=(1, *shape) if n else None)
    for i, clip in enumerate(clips):
        h5["features"][i] = clip.features
    dataset(h5, "label", data=labels.astype(np.int16))
    dataset(h5, "video", data=[c.video for c in clips], dtype=str_dtype())
    dataset(h5, "frame_index", data=np.array([c.frame_index for c in clips], dtype=np.int32).reshape(n, frames))
    dataset(h5, "num_frames", data=np.array([c.num_frames for c in clips], dtype=np.int32))
    dataset(h5, "fps", data=np.array([c.fps for c in clips], dtype=np.float32))
    dataset(h5, "height", data=np.array([c.height for c in clips], dtype=np.int16))
    dataset(h5, "width", data=np.array([c.width for c in clips], dtype=np.int16))
    dataset(h5, "source", data=[c.source for c in clips], dtype=str_dtype())
    dataset(h5, "decoder", data=[c.decoder for c in clips], dtype=str_dtype())
    dataset(h5, "precision", data=[c.precision for c in clips], dtype=str_dtype())
    dataset(h5, "trunk", data=[c.trunk for c in clips], dtype=str_dtype())


def _write_failed(h5, failed: Sequence[tuple[str, str]], sources: Sequence[str] | None = None) -> None:
    dataset(h5, "failed", data=np.array(failed, dtype=object).reshape(-1, 2), dtype=str_dtype())
    sources = [""] * len(failed) if sources is None else list(sources)
    dataset(h5, "failed_source", data=sources, dtype=str_dtype())


def write_shard(parts_dir: Path, clips: Sequence[ClipFeatures], failed: Sequence[tuple[str, str]],
                settings: dict[str, Any], failed_source: Sequence[str] | None = None) -> Path:
    """Write one complete shard: temporary name, fsync, rename. Returns its final path.

    `failed_source[i]` is the fingerprint of failed[i]'s file ("" or None: not recorded).
    """
    import h5py

    name = f"shard-{time.time_ns():020d}-{os.getpid()}"
    final = parts_dir / f"{name}.h5"
    classes = sorted({c.label for c in clips})
    labels = np.array([classes.index(c.label) for c in clips], dtype=np.int16)
    # Built in memory, written by Python: a full disk is then a plain OSError here and never reaches HDF5,
    # which crashes the process when a file it could not write is closed (pipeline/isolate.py).
    image = io.BytesIO()
    with h5py.File(image, "w") as h5:
        for key, value in settings.items():
            h5.attrs[key] = attr(value)
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["classes"] = attr(classes)
        _write_table(h5, clips, labels, int(settings["frames"]))
        _write_failed(h5, failed, failed_source)
    with atomic_path(final, parts_dir / f"{name}.tmp") as tmp, open(tmp, "wb") as out:
        out.write(image.getbuffer())
    return final


class ShardWriter:
    """Collects finished clips and rotates them into shards every `every_clips` clips or `every_seconds`.

    At most that much finished work can be lost to a crash; everything flushed survives it.
    """

    def __init__(self, parts_dir: Path, settings: dict[str, Any], every_clips: int = 32, every_seconds: float = 20.0):
        self.parts_dir, self.settings = parts_dir, settings
        self.every_clips, self.every_seconds = every_clips, every_seconds
        self._clips: list[ClipFeatures] = []
        self._failed: list[tuple[str, str]] = []
        self._failed_source: list[str] = []
        self._since = time.monotonic()

    def add(self, clip: ClipFeatures) -> None:
        self._clips.append(clip)
        self._maybe_flush()

    def add_failure(self, video: str, reason: str, source: str = "") -> None:
        self._failed.append((video, reason))
        self._failed_source.append(source)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._clips) >= self.every_clips or time.monotonic() - self._since >= self.every_seconds:
            self.flush()

    def flush(self) -> None:
        if self._clips or self._failed:
            write_shard(self.parts_dir, self._clips, self._failed, self.settings, self._failed_source)
        self._clips, self._failed, self._failed_source = [], [], []
        self._since = time.monotonic()


def shard_paths(parts_dir: Path) -> list[Path]:
    return sorted(parts_dir.glob(SHARD_GLOB)) if parts_dir.is_dir() else []


def pending_shards(cache: Path) -> list[Path]:
    """Shards written for `cache` that it does not hold yet (oldest first): all of `<cache>.parts/`, or the
    folder's shards that its index neither references nor retired."""
    parts = parts_dir_for(cache)
    if not is_folder(cache):
        return shard_paths(parts)
    taken = indexed_names(cache)
    return [p for p in shard_paths(parts) if p.name not in taken]


def remove_unfinished(parts_dir: Path) -> int:
    """Delete shards and joins that a crash left half-written, and the shards a folder's index retired but a
    crash kept from being deleted; returns how many."""
    if not parts_dir.is_dir():
        return 0
    stale = list(parts_dir.glob("*.tmp"))
    if (parts_dir / INDEX_NAME).exists():
        stale += [parts_dir / name for name in retired_names(parts_dir) if (parts_dir / name).exists()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


@dataclass
class JoinResult:
    clips: int
    failed: int
    classes: list[str] = field(default_factory=list)


@dataclass
class Collected:
    """The rows and failures a new cache keeps, picked from its sources (previous cache first, then shards)."""

    sources: list[FeatureCache]
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # video -> (source number, row)
    labels: dict[str, str] = field(default_factory=dict)  # video -> class name
    failed: dict[str, tuple[str, str, int, int]] = field(default_factory=dict)  # video -> (reason, fingerprint,
    #                                                                               source number, failure number)

    @property
    def videos(self) -> list[str]:
        return sorted(self.rows)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.values()))

    def meta(self, videos: Sequence[str]) -> dict[str, list]:
        """The eagerly read per-row metadata of `videos`, from whichever source holds each."""
        meta: dict[str, list] = {k: [] for k in ("frame_index", "num_frames", "fps", "height", "width", "source",
                                                 "decoder", "precision", "trunk")}
        for video in videos:
            s, r = self.rows[video]
            for key in meta:
                meta[key].append(getattr(self.sources[s], key)[r])
        return meta

    def feature_shape(self) -> tuple[int, ...]:
        videos = self.videos
        return self.sources[self.rows[videos[0]][0]].feature_shape if videos else (0, 0, 0, 0)


def collect(sources: Sequence[FeatureCache], drop: Collection[tuple[str, str]] = frozenset()) -> Collected:
    """Pick rows and failures from `sources` in order: a later source wins over earlier data for the same video
    (a retried failure becomes a success), and entries named in `drop` as (video, fingerprint) are left out."""
    drop = set(drop)
    picked = Collected(list(sources))
    for s, src in enumerate(picked.sources):
        for r, video in enumerate(src.videos):
            if (video, src.source[r]) in drop:
                continue
            picked.rows[video] = (s, r)
            picked.labels[video] = src.classes[src.labels[r]]
            picked.failed.pop(video, None)
        for i, ((video, reason), source) in enumerate(zip(src.failed, src.failed_source)):
            if video not in picked.rows and (video, source) not in drop:
                picked.failed[video] = (reason, source, s, i)
    return picked


def _write_rows(h5, picked: Collected, videos: list[str], classes: list[str], attrs: dict[str, Any]) -> None:
    """The per-row metadata and failures that a joined file and a folder's index both hold, and the attrs."""
    for key, value in attrs.items():
        h5.attrs[key] = attr(value)
    h5.attrs["format_version"] = FORMAT_VERSION
    h5.attrs["classes"] = attr(classes)
    meta, n = picked.meta(videos), len(videos)
    dataset(h5, "label", data=np.array([classes.index(picked.labels[v]) for v in videos], dtype=np.int16))
    dataset(h5, "video", data=videos, dtype=str_dtype())
    frames = int(attrs.get("frames", 0))
    dataset(h5, "frame_index", data=np.array(meta["frame_index"], dtype=np.int32).reshape(n, frames))
    for key, dtype in (("num_frames", np.int32), ("fps", np.float32), ("height", np.int16), ("width", np.int16)):
        dataset(h5, key, data=np.array(meta[key], dtype=dtype))
    meta["source"] = [canonical_fingerprint(s) for s in meta["source"]]  # an old cache's mtimes go
    for key in ("source", "decoder", "precision", "trunk"):
        dataset(h5, key, data=meta[key], dtype=str_dtype())
    h5.attrs["precision"] = per_row_summary(meta["precision"])  # of the rows, whatever run made them
    h5.attrs["trunk"] = per_row_summary(meta["trunk"])  # "compiled", "eager" or "mixed: compiled 12, eager 3"
    failed_keys = sorted(picked.failed)
    _write_failed(h5, [(v, picked.failed[v][0]) for v in failed_keys],
                  [canonical_fingerprint(picked.failed[v][1]) for v in failed_keys])


def join(cache_path: Path, parts_dir: Path, attrs: dict[str, Any],
         drop: Collection[tuple[str, str]] = frozenset()) -> JoinResult:
    """Write previous cache + shards as one new cache beside `cache_path`, then rename it into place.

    It runs in a forked child (pipeline/isolate.py): a disk that fills during the join is an OSError here (the
    child's HDF5 crash, if any, stays in the child), the temporary file is removed, the shards are kept.

    Later shards win over earlier data for the same video (a retried failure becomes a success); the
    shards are removed only after the rename, and a rerun after a crash in between deduplicates.
    `drop` names stale entries as (video, source fingerprint): rows and failures matching one are left out,
    while a re-extraction of the same video (a new fingerprint) is kept. Classes left without a clip vanish
    and labels are renumbered. A folder cache gets a new index instead (`write_index`).
    """
    try:
        return run_forked(_join, Path(cache_path), Path(parts_dir), attrs, frozenset(drop))
    finally:
        temp_path(Path(cache_path)).unlink(missing_ok=True)  # what a crashed child left


def _join(cache_path: Path, parts_dir: Path, attrs: dict[str, Any], drop: Collection[tuple[str, str]]) -> JoinResult:
    import h5py

    if is_folder(cache_path):
        return write_index(cache_path, attrs, drop)
    sources: list[Path] = ([cache_path] if cache_path.exists() else []) + shard_paths(parts_dir)
    handles = [FeatureCache(p) for p in sources]
    try:
        picked = collect(handles, drop)
        videos, classes = picked.videos, picked.classes
        with atomic_path(cache_path, temp_path(cache_path)) as tmp, h5py.File(tmp, "w") as h5:
            try:
                shape, n = picked.feature_shape(), len(videos)
                feats = dataset(h5, "features", shape=(n, *shape), dtype="float16",
                                chunks=(1, *shape) if n else None)
                for i, video in enumerate(videos):
                    s, r = picked.rows[video]
                    feats[i] = handles[s].features[r]
                _write_rows(h5, picked, videos, classes, attrs)
                h5.flush()  # a full disk shows here, while the file can still be left unclosed
            except BaseException as exc:
                abandon(exc)
                raise
    finally:
        for handle in handles:
            handle.close()
    for shard in sources[1 if sources and sources[0] == cache_path else 0:]:
        shard.unlink(missing_ok=True)
    return JoinResult(len(videos), len(picked.failed), classes)


def write_index(folder: Path, attrs: dict[str, Any], drop: Collection[tuple[str, str]] = frozenset()) -> JoinResult:
    """Write the folder's new `index.h5` over its previous index and the shards not indexed yet; never touch a
    shard. Then delete the shards the new index no longer references (rows all dropped or superseded); they
    are listed in its `retired` until then, so a crash in between is finished by the next run.
    """
    import h5py

    folder = Path(folder)
    index = folder / INDEX_NAME
    handles: list[FeatureCache] = [FolderCache(folder)] if index.exists() else []
    try:
        handles += [FeatureCache(p) for p in pending_shards(folder)]
        picked = collect(handles, drop)
        videos, classes = picked.videos, picked.classes
        places = [handles[s].location(r) for s, r in (picked.rows[v] for v in videos)]
        failed_keys = sorted(picked.failed)
        failed_files = [handles[s].failure_location(i) for _, _, s, i in (picked.failed[v] for v in failed_keys)]
        shards = sorted({p.name for p, _ in places} | {p.name for p in failed_files if p.name != INDEX_NAME})
        number = {name: i for i, name in enumerate(shards)}
        retired = sorted(p.name for p in shard_paths(folder) if p.name not in number)
        with atomic_path(index, temp_path(folder)) as tmp, h5py.File(tmp, "w") as h5:
            try:
                _write_rows(h5, picked, videos, classes, attrs)
                h5.attrs["feature_shape"] = attr(list(picked.feature_shape()))
                dataset(h5, "shards", data=shards, dtype=str_dtype())
                dataset(h5, "retired", data=retired, dtype=str_dtype())
                dataset(h5, "shard", data=np.array([number[p.name] for p, _ in places], dtype=np.int32))
                dataset(h5, "row", data=np.array([r for _, r in places], dtype=np.int64))
                dataset(h5, "failed_shard", data=np.array([number.get(p.name, -1) for p in failed_files],
                                                          dtype=np.int32))
                h5.flush()  # as in the join: a full disk shows here, and the child leaves the file unclosed
            except BaseException as exc:
                abandon(exc)
                raise
    finally:
        for handle in handles:
            handle.close()
    for name in retired:
        (folder / name).unlink(missing_ok=True)
    return JoinResult(len(videos), len(picked.failed), classes)
