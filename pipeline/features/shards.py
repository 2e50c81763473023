"""Writing the cache without ever modifying it in place: shards of finished clips, and the join.

Extraction appends finished clips to small shard files in `<cache>.parts/` (each written under a temporary
name and renamed when complete); the join copies the previous cache and all shards into `<cache>.tmp` and
renames it over the cache. After `kill -9` at any moment the cache path holds the previous complete cache
(or nothing) and the shards hold the work since, so a rerun resumes. Both go through the one atomic writer
(`pipeline.files.atomic_path`) with fixed temporary names, so the next run finds and deletes what a crash
left (`remove_unfinished`, and extract's removal of `<cache>.tmp`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np

from pipeline.features.cache import FORMAT_VERSION, FeatureCache, attr, str_dtype
from pipeline.features.provenance import precision_summary
from pipeline.files import atomic_path

SHARD_GLOB = "shard-*.h5"


def temp_path(cache_path: Path) -> Path:
    """Where the join writes before the rename; a run that finds it there deletes it (a crashed join)."""
    return cache_path.with_name(cache_path.name + ".tmp")


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
    decoder: str = "decord"  # which decoder made the frames (pipeline.video.decode.DECODERS); render decodes the same way
    precision: str = ""  # the backbone's precision for this clip (fp32 | bf16): one cache may mix them


def _write_table(h5, clips: Sequence[ClipFeatures], labels: np.ndarray, frames: int) -> None:
    """The per-clip datasets shared by shards and the joined cache."""
    n = len(clips)
    shape = clips[0].features.shape if n else (0, 0, 0, 0)
    h5.create_dataset("features", shape=(n, *shape), dtype="float16",
                      chunks=(1, *shape) if n else None)
    for i, clip in enumerate(clips):
        h5["features"][i] = clip.features
    h5.create_dataset("label", data=labels.astype(np.int16))
    h5.create_dataset("video", data=[c.video for c in clips], dtype=str_dtype())
    h5.create_dataset("frame_index", data=np.array([c.frame_index for c in clips], dtype=np.int32).reshape(n, frames))
    h5.create_dataset("num_frames", data=np.array([c.num_frames for c in clips], dtype=np.int32))
    h5.create_dataset("fps", data=np.array([c.fps for c in clips], dtype=np.float32))
    h5.create_dataset("height", data=np.array([c.height for c in clips], dtype=np.int16))
    h5.create_dataset("width", data=np.array([c.width for c in clips], dtype=np.int16))
    h5.create_dataset("source", data=[c.source for c in clips], dtype=str_dtype())
    h5.create_dataset("decoder", data=[c.decoder for c in clips], dtype=str_dtype())
    h5.create_dataset("precision", data=[c.precision for c in clips], dtype=str_dtype())


def _write_failed(h5, failed: Sequence[tuple[str, str]], sources: Sequence[str] | None = None) -> None:
    h5.create_dataset("failed", data=np.array(failed, dtype=object).reshape(-1, 2), dtype=str_dtype())
    sources = [""] * len(failed) if sources is None else list(sources)
    h5.create_dataset("failed_source", data=sources, dtype=str_dtype())


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
    with atomic_path(final, parts_dir / f"{name}.tmp") as tmp, h5py.File(tmp, "w") as h5:
        for key, value in settings.items():
            h5.attrs[key] = attr(value)
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["classes"] = attr(classes)
        _write_table(h5, clips, labels, int(settings["frames"]))
        _write_failed(h5, failed, failed_source)
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


def remove_unfinished(parts_dir: Path) -> int:
    """Delete shards and joins that a crash left half-written; returns how many."""
    if not parts_dir.is_dir():
        return 0
    stale = list(parts_dir.glob("*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


@dataclass
class JoinResult:
    clips: int
    failed: int
    classes: list[str] = field(default_factory=list)


def join(cache_path: Path, parts_dir: Path, attrs: dict[str, Any],
         drop: Collection[tuple[str, str]] = frozenset()) -> JoinResult:
    """Write previous cache + shards as one new cache beside `cache_path`, then rename it into place.

    Later shards win over earlier data for the same video (a retried failure becomes a success); the
    shards are removed only after the rename, and a rerun after a crash in between deduplicates.
    `drop` names stale entries as (video, source fingerprint): rows and failures matching one are left out,
    while a re-extraction of the same video (a new fingerprint) is kept. Classes left without a clip vanish
    and labels are renumbered.
    """
    import h5py

    drop = set(drop)
    sources: list[Path] = ([cache_path] if cache_path.exists() else []) + shard_paths(parts_dir)
    rows: dict[str, tuple[int, int]] = {}  # video -> (source number, row)
    labels: dict[str, str] = {}
    failed: dict[str, tuple[str, str]] = {}  # video -> (reason, source fingerprint)
    handles = [FeatureCache(p) for p in sources]
    try:
        for s, src in enumerate(handles):
            for r, video in enumerate(src.videos):
                if (video, src.source[r]) in drop:
                    continue
                rows[video] = (s, r)
                labels[video] = src.classes[src.labels[r]]
                failed.pop(video, None)
            for (video, reason), source in zip(src.failed, src.failed_source):
                if video not in rows and (video, source) not in drop:
                    failed[video] = (reason, source)
        videos = sorted(rows)
        classes = sorted({labels[v] for v in videos})
        with atomic_path(cache_path, temp_path(cache_path)) as tmp, h5py.File(tmp, "w") as h5:
            for key, value in attrs.items():
                h5.attrs[key] = attr(value)
            h5.attrs["format_version"] = FORMAT_VERSION
            h5.attrs["classes"] = attr(classes)
            shape = handles[rows[videos[0]][0]].feature_shape if videos else (0, 0, 0, 0)
            n = len(videos)
            feats = h5.create_dataset("features", shape=(n, *shape), dtype="float16", chunks=(1, *shape) if n else None)
            meta = {k: [] for k in ("frame_index", "num_frames", "fps", "height", "width", "source", "decoder",
                                    "precision")}
            for i, video in enumerate(videos):
                s, r = rows[video]
                src = handles[s]
                feats[i] = src.features[r]
                for key in meta:
                    meta[key].append(getattr(src, key)[r])
            h5.create_dataset("label", data=np.array([classes.index(labels[v]) for v in videos], dtype=np.int16))
            h5.create_dataset("video", data=videos, dtype=str_dtype())
            frames = int(attrs.get("frames", 0))
            h5.create_dataset("frame_index", data=np.array(meta["frame_index"], dtype=np.int32).reshape(n, frames))
            for key, dtype in (("num_frames", np.int32), ("fps", np.float32), ("height", np.int16), ("width", np.int16)):
                h5.create_dataset(key, data=np.array(meta[key], dtype=dtype))
            for key in ("source", "decoder", "precision"):
                h5.create_dataset(key, data=meta[key], dtype=str_dtype())
            h5.attrs["precision"] = precision_summary(meta["precision"])  # of the rows, whatever run made them
            failed_keys = sorted(failed)
            _write_failed(h5, [(v, failed[v][0]) for v in failed_keys], [failed[v][1] for v in failed_keys])
    finally:
        for handle in handles:
            handle.close()
    for shard in sources[1 if sources and sources[0] == cache_path else 0:]:
        shard.unlink(missing_ok=True)
    return JoinResult(len(videos), len(failed), classes)
