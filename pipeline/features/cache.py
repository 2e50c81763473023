"""The HDF5 feature cache (format_version 1): a crash-safe shard writer, the join, and the reader.

Nothing is modified in place. Extraction appends finished clips to small shard files in `<cache>.parts/`
(each written under a temporary name and renamed when complete); the join copies the previous cache and
all shards into `<cache>.tmp` and renames it over the cache. After `kill -9` at any moment the cache path
holds the previous complete cache (or nothing) and the shards hold the work since, so a rerun resumes.

Every row and every failure records a fingerprint of its source file (`source`, `failed_source`), so a rerun
over a changed dataset can drop what is gone and redo what was replaced (`join(..., drop=...)`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

import numpy as np
from pipeline.errors import UserError

FORMAT_VERSION = 1
# Attributes that define what a feature *is*; two runs that differ in any of them must never be mixed.
SETTINGS_KEYS = ("backbone", "layer", "weights", "image_size", "frames", "sampling", "mean", "std", "dtype")
SHARD_GLOB = "shard-*.h5"
_HASH_BLOCK = 1 << 20
_STR = None  # h5py string dtype, created lazily so importing this module stays cheap


class CacheError(UserError):
    """A cache that cannot be used as asked; the message says what to do."""


def _str_dtype():
    global _STR
    if _STR is None:
        import h5py

        _STR = h5py.string_dtype("utf-8")
    return _STR


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _attr(value: Any) -> Any:
    """Attribute value as stored: lists and dicts as JSON text, so any HDF5 reader can show them."""
    return json.dumps(_jsonable(value)) if isinstance(value, (list, tuple, dict)) else value


def _unattr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def settings_mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two extraction settings, empty when they may be mixed."""
    diffs = []
    for key in SETTINGS_KEYS:
        a, b = _jsonable(old.get(key)), _jsonable(new.get(key))
        if isinstance(a, list) and isinstance(b, list):
            same = len(a) == len(b) and np.allclose(a, b)
        else:
            same = a == b
        if not same:
            diffs.append(f"{key}: cache has {a!r}, asked for {b!r}")
    return diffs


# --- source fingerprints ------------------------------------------------------------------------------


def source_fingerprint(path: str | Path) -> str:
    """"sha256:<hex> size:<bytes> mtime_ns:<ns>" of a source file.

    The hash is what identifies the content; size and mtime only let a rerun skip hashing files whose stat
    is unchanged (as git and DVC do). The stat is taken *before* reading, so a file written while it is
    hashed or decoded never looks unchanged later.
    """
    stat = os.stat(path)
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return f"sha256:{digest.hexdigest()} size:{stat.st_size} mtime_ns:{stat.st_mtime_ns}"


def _fingerprint_fields(fingerprint: str) -> dict[str, str]:
    return dict(token.split(":", 1) for token in fingerprint.split() if ":" in token)


def source_changed(fingerprint: str, path: str | Path) -> bool | None:
    """Whether `path` no longer holds the content `fingerprint` was taken of; None when nothing was recorded.

    Unchanged size and mtime are trusted without reading the file, so an unchanged dataset costs one stat
    per clip; otherwise the file is hashed (a touched or re-copied file with the same bytes is unchanged).
    A file that cannot be read counts as changed.
    """
    if not fingerprint:
        return None
    recorded = _fingerprint_fields(fingerprint)
    try:
        stat = os.stat(path)
        if recorded.get("size") != str(stat.st_size):
            return True
        if recorded.get("mtime_ns") == str(stat.st_mtime_ns):
            return False
        return _fingerprint_fields(source_fingerprint(path)).get("sha256") != recorded.get("sha256")
    except OSError:
        return True


def precision_summary(per_row: Sequence[str]) -> str:
    """One precision when every row has it; else each with its count ("mixed: bf16 12, fp32 3")."""
    counts: dict[str, int] = {}
    for value in per_row:
        counts[value or "unknown"] = counts.get(value or "unknown", 0) + 1
    if len(counts) <= 1:
        return next(iter(counts), "")
    return "mixed: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def extraction_settings(provenance: dict[str, Any], frames: int, weights_label: str | None = None) -> dict[str, Any]:
    """The settings (SETTINGS_KEYS) a cache records for features made by a backbone with `provenance`.

    extract writes them and predict rebuilds them to compare with a checkpoint's, so they are made here
    only. `weights_label` replaces the provenance's own label (predict names a weights file by its path).
    """
    from pipeline.video.decode import SAMPLING

    label = weights_label if weights_label is not None else provenance["weights"]
    return {"backbone": provenance["backbone"], "layer": provenance["layer"],
            "weights": f"{label} sha256:{provenance['weights_sha256']}", "image_size": provenance["image_size"],
            "frames": frames, "sampling": SAMPLING, "mean": list(provenance["mean"]), "std": list(provenance["std"]),
            "dtype": "float16"}


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


# --- shards -------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_table(h5, clips: Sequence[ClipFeatures], labels: np.ndarray, frames: int) -> None:
    """The per-clip datasets shared by shards and the joined cache."""
    n = len(clips)
    shape = clips[0].features.shape if n else (0, 0, 0, 0)
    h5.create_dataset("features", shape=(n, *shape), dtype="float16",
                      chunks=(1, *shape) if n else None)
    for i, clip in enumerate(clips):
        h5["features"][i] = clip.features
    h5.create_dataset("label", data=labels.astype(np.int16))
    h5.create_dataset("video", data=[c.video for c in clips], dtype=_str_dtype())
    h5.create_dataset("frame_index", data=np.array([c.frame_index for c in clips], dtype=np.int32).reshape(n, frames))
    h5.create_dataset("num_frames", data=np.array([c.num_frames for c in clips], dtype=np.int32))
    h5.create_dataset("fps", data=np.array([c.fps for c in clips], dtype=np.float32))
    h5.create_dataset("height", data=np.array([c.height for c in clips], dtype=np.int16))
    h5.create_dataset("width", data=np.array([c.width for c in clips], dtype=np.int16))
    h5.create_dataset("source", data=[c.source for c in clips], dtype=_str_dtype())
    h5.create_dataset("decoder", data=[c.decoder for c in clips], dtype=_str_dtype())
    h5.create_dataset("precision", data=[c.precision for c in clips], dtype=_str_dtype())


def _write_failed(h5, failed: Sequence[tuple[str, str]], sources: Sequence[str] | None = None) -> None:
    h5.create_dataset("failed", data=np.array(failed, dtype=object).reshape(-1, 2), dtype=_str_dtype())
    sources = [""] * len(failed) if sources is None else list(sources)
    h5.create_dataset("failed_source", data=sources, dtype=_str_dtype())


def write_shard(parts_dir: Path, clips: Sequence[ClipFeatures], failed: Sequence[tuple[str, str]],
                settings: dict[str, Any], failed_source: Sequence[str] | None = None) -> Path:
    """Write one complete shard: temporary name, fsync, rename. Returns its final path.

    `failed_source[i]` is the fingerprint of failed[i]'s file ("" or None: not recorded).
    """
    import h5py

    parts_dir.mkdir(parents=True, exist_ok=True)
    name = f"shard-{time.time_ns():020d}-{os.getpid()}"
    tmp, final = parts_dir / f"{name}.tmp", parts_dir / f"{name}.h5"
    classes = sorted({c.label for c in clips})
    labels = np.array([classes.index(c.label) for c in clips], dtype=np.int16)
    with h5py.File(tmp, "w") as h5:
        for key, value in settings.items():
            h5.attrs[key] = _attr(value)
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["classes"] = _attr(classes)
        _write_table(h5, clips, labels, int(settings["frames"]))
        _write_failed(h5, failed, failed_source)
    _fsync_file(tmp)
    os.replace(tmp, final)
    _fsync_dir(parts_dir)
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


# --- reader -------------------------------------------------------------------------------------------


class FeatureCache:
    """Read access to a joined cache (or a shard): metadata eagerly, features on demand.

    >>> with FeatureCache("cache/features.h5") as cache:
    ...     x = cache.load(cache.indices(["brush_hair/a.avi"]))   # (n, T, C, h, w) float16
    """

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"{self.path}: no such cache; run `python -m pipeline extract` first")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError:
            raise CacheError(f"{self.path}: not an HDF5 file (damaged or not a feature cache)") from None
        try:
            self.attrs = {k: _unattr(v) for k, v in self._h5.attrs.items()}
            if self.attrs.get("format_version") != FORMAT_VERSION or "features" not in self._h5:
                raise CacheError(f"{self.path}: not a feature cache of format_version {FORMAT_VERSION}")
            self.classes: list[str] = list(self.attrs["classes"])
            self.videos: list[str] = [v.decode() if isinstance(v, bytes) else v for v in self._h5["video"][()]]
            self.labels = self._h5["label"][()].astype(np.int64)
            self.frame_index = self._h5["frame_index"][()]
            self.num_frames = self._h5["num_frames"][()]
            self.fps = self._h5["fps"][()]
            self.height = self._h5["height"][()]
            self.width = self._h5["width"][()]
            raw_failed = self._h5["failed"][()] if "failed" in self._h5 else np.empty((0, 2))
            self.failed = [tuple(x.decode() if isinstance(x, bytes) else x for x in row) for row in raw_failed]
            self.source = self._fingerprints("source", len(self.videos))
            self.failed_source = self._fingerprints("failed_source", len(self.failed))
            # caches from before these were recorded: decord made every frame, at the one recorded precision
            self.decoder = self._per_row("decoder", len(self.videos), "decord")
            self.precision = self._per_row("precision", len(self.videos), str(self.attrs.get("precision") or ""))
        except CacheError:
            self._h5.close()
            raise
        except (KeyError, ValueError) as exc:
            self._h5.close()
            raise CacheError(f"{self.path}: incomplete feature cache ({exc})") from None
        self._position = {v: i for i, v in enumerate(self.videos)}

    def _fingerprints(self, name: str, count: int) -> list[str]:
        """Source fingerprints per row; "" for each row of a cache written before they were recorded."""
        return self._per_row(name, count, "")

    def _per_row(self, name: str, count: int, default: str) -> list[str]:
        """A per-row text dataset; `default` for each row of a cache written before it existed."""
        if name not in self._h5:
            return [default] * count
        values = [v.decode() if isinstance(v, bytes) else v for v in self._h5[name][()]]
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries for {count} rows")
        return values

    @property
    def features(self):
        """The (N, T, C, h, w) float16 HDF5 dataset itself, for streaming reads."""
        return self._h5["features"]

    @property
    def settings(self) -> dict[str, Any]:
        return {k: self.attrs.get(k) for k in SETTINGS_KEYS}

    @property
    def precision_summary(self) -> str:
        """The backbone precision of the rows: "bf16", or "mixed: bf16 12, fp32 3" when runs differed."""
        return precision_summary(self.precision)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    def __len__(self) -> int:
        return len(self.videos)

    def __contains__(self, video: str) -> bool:
        return video in self._position

    def indices(self, videos: Iterable[str]) -> np.ndarray:
        """Row numbers of `videos`; a key that is not in the cache raises CacheError naming it."""
        try:
            return np.array([self._position[v] for v in videos], dtype=np.int64)
        except KeyError as exc:
            raise CacheError(f"{self.path}: no clip {exc.args[0]!r} in this cache") from None

    def load(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Features of the given rows (all when None), in the given order: (n, T, C, h, w) float16.

        Rows are read as contiguous runs, which is what makes a warm read run at memory speed.
        """
        feats = self.features
        if indices is None:
            return feats[()]
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), *feats.shape[1:]), dtype=feats.dtype)
        if len(idx) == 0:
            return out
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
        start = 0
        for run in np.split(np.arange(len(idx)), breaks):
            lo, hi = sorted_idx[run[0]], sorted_idx[run[-1]] + 1
            block = feats[lo:hi]
            out[order[start:start + len(run)]] = block
            start += len(run)
        return out

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- join ---------------------------------------------------------------------------------------------


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
        tmp = cache_path.with_name(cache_path.name + ".tmp")
        with h5py.File(tmp, "w") as h5:
            for key, value in attrs.items():
                h5.attrs[key] = _attr(value)
            h5.attrs["format_version"] = FORMAT_VERSION
            h5.attrs["classes"] = _attr(classes)
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
            h5.create_dataset("video", data=videos, dtype=_str_dtype())
            frames = int(attrs.get("frames", 0))
            h5.create_dataset("frame_index", data=np.array(meta["frame_index"], dtype=np.int32).reshape(n, frames))
            for key, dtype in (("num_frames", np.int32), ("fps", np.float32), ("height", np.int16), ("width", np.int16)):
                h5.create_dataset(key, data=np.array(meta[key], dtype=dtype))
            for key in ("source", "decoder", "precision"):
                h5.create_dataset(key, data=meta[key], dtype=_str_dtype())
            h5.attrs["precision"] = precision_summary(meta["precision"])  # of the rows, whatever run made them
            failed_keys = sorted(failed)
            _write_failed(h5, [(v, failed[v][0]) for v in failed_keys], [failed[v][1] for v in failed_keys])
    finally:
        for handle in handles:
            handle.close()
    _fsync_file(tmp)
    os.replace(tmp, cache_path)
    _fsync_dir(cache_path.parent)
    for shard in sources[1 if sources and sources[0] == cache_path else 0:]:
        shard.unlink(missing_ok=True)
    return JoinResult(len(videos), len(failed), classes)

