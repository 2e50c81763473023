"""The HDF5 feature cache (format_version 1) and its reader: one joined file (or a shard), read with
metadata eagerly and features on demand. How it is written without ever being modified in place:
pipeline/features/shards.py. The format: docs/DESIGN.md, "Cache format".

A cache has two forms, chosen by its path alone (`is_folder`): one self-contained file (`features.h5`), or a
folder of immutable shards plus `index.h5` (docs/DESIGN.md, "Past one machine"). `FeatureCache(path)` reads the
file (or one shard); the folder's reader, `FolderCache`, is in pipeline/features/reader.py, with the same
attributes and methods, beside `open_cache(path)`, which picks the right one for a path; this module never
imports the folder form, so the arrows point one way: reader -> cache.

Every row and every failure records a fingerprint of its source file (`source`, `failed_source`), so a rerun
over a changed dataset can drop what is gone and redo what was replaced.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.errors import UserError
from pipeline.features.provenance import SETTINGS_KEYS, jsonable, per_row_summary, resolve_root

FORMAT_VERSION = 1
FILE_SUFFIXES = (".h5", ".hdf5")
INDEX_NAME = "index.h5"
_STR = None  # h5py string dtype, created lazily so importing this module stays cheap


class CacheError(UserError):
    """A cache that cannot be used as asked; the message says what to do."""


def is_folder(path: str | Path) -> bool:
    """The form rule, the one place it is decided: an existing folder, or a path that does not exist and does
    not end in .h5/.hdf5, is a folder cache (shards + index.h5); anything else is one file. Never the size."""
    path = Path(path)
    return path.is_dir() or (not path.exists() and path.suffix.lower() not in FILE_SUFFIXES)


def main_file(path: str | Path) -> Path:
    """The file whose presence makes `path` a complete cache: the file itself, or the folder's index.h5."""
    path = Path(path)
    return path / INDEX_NAME if is_folder(path) else path


def size_on_disk(path: str | Path) -> int:
    """Bytes of the cache: the file, or every file of the folder (shards, index, leftovers)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def str_dtype():
    global _STR
    if _STR is None:
        import h5py

        _STR = h5py.string_dtype("utf-8")
    return _STR


def dataset(h5, name: str, **kwargs):
    """`h5.create_dataset` without HDF5's object times (HDF5's own default, and h5py's before 3.0, puts a
    wall-clock time in every dataset's header), so a cache is a function of its contents and two runs write
    the same bytes whatever h5py is installed."""
    return h5.create_dataset(name, track_times=False, **kwargs)


def attr(value: Any) -> Any:
    """Attribute value as stored: lists and dicts as JSON text, so any HDF5 reader can show them."""
    return json.dumps(jsonable(value)) if isinstance(value, (list, tuple, dict)) else value


def texts(values) -> list[str]:
    """An HDF5 string dataset's values as str (h5py gives bytes for some string types)."""
    return [v.decode() if isinstance(v, bytes) else v for v in values]


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


class FeatureCache:
    """Read access to a joined cache or a shard (one file): metadata eagerly, features on demand. The base of
    `FolderCache`; `open_cache(path)` (pipeline/features/reader.py) opens either form.

    >>> with FeatureCache("cache/features.h5") as cache:
    ...     x = cache.load(cache.indices(["brush_hair/a.avi"]))   # (n, T, C, h, w) float16
    """

    _TABLE = "features"  # the dataset that marks a file of this form (the folder's index: "shard")

    def __init__(self, path: str | Path):
        import h5py

        if type(self) is FeatureCache and is_folder(path):  # a caller's mistake, not a user's: say what to call
            raise TypeError(f"FeatureCache reads one file, not the folder cache {path}: use "
                            "pipeline.features.reader.open_cache(path)")
        self.path = Path(path)
        file = main_file(self.path)
        if not file.exists():
            raise CacheError(self._missing())
        try:
            h5 = h5py.File(file, "r")
        except OSError:
            raise CacheError(f"{file}: not an HDF5 file (damaged or not a feature cache)") from None
        self._h5 = h5
        try:
            self.attrs = {k: _unattr(v) for k, v in h5.attrs.items()}
            if self.attrs.get("format_version") != FORMAT_VERSION or self._TABLE not in h5:
                raise CacheError(f"{self.path}: not a feature cache of format_version {FORMAT_VERSION}")
            self.classes: list[str] = list(self.attrs["classes"])
            self.videos: list[str] = texts(h5["video"][()])
            self.labels = h5["label"][()].astype(np.int64)
            self.frame_index = h5["frame_index"][()]
            self.num_frames = h5["num_frames"][()]
            self.fps = h5["fps"][()]
            self.height = h5["height"][()]
            self.width = h5["width"][()]
            raw_failed = h5["failed"][()] if "failed" in h5 else np.empty((0, 2))
            self.failed = [tuple(texts(row)) for row in raw_failed]
            self.source = self._fingerprints("source", len(self.videos))
            self.failed_source = self._fingerprints("failed_source", len(self.failed))
            # caches from before these were recorded: decord made every frame, at the one recorded precision
            self.decoder = self._per_row("decoder", len(self.videos), "decord")
            self.precision = self._per_row("precision", len(self.videos), str(self.attrs.get("precision") or ""))
            self.trunk = self._per_row("trunk", len(self.videos), "eager")  # before extract.compile: eager
            self._read_more(h5)
        except CacheError:
            h5.close()
            raise
        except (KeyError, ValueError) as exc:
            h5.close()
            raise CacheError(f"{self.path}: incomplete feature cache ({exc})") from None
        self._position = {v: i for i, v in enumerate(self.videos)}

    def _missing(self) -> str:
        return f"{self.path}: no such cache; run `python -m pipeline extract` first"

    def _read_more(self, h5) -> None:
        """What a form reads besides the shared per-row metadata (the folder: where each row lives)."""

    def location(self, row: int) -> tuple[Path, int]:
        """(file, row in that file) holding the features of `row`."""
        return self.path, row

    def failure_location(self, i: int) -> Path:
        """The file that recorded failure `i`."""
        return self.path

    def _fingerprints(self, name: str, count: int) -> list[str]:
        """Source fingerprints per row; "" for each row of a cache written before they were recorded."""
        return self._per_row(name, count, "")

    def _per_row(self, name: str, count: int, default: str) -> list[str]:
        """A per-row text dataset; `default` for each row of a cache written before it existed."""
        if name not in self._h5:
            return [default] * count
        values = texts(self._h5[name][()])
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries for {count} rows")
        return values

    @property
    def features(self):
        """The (N, T, C, h, w) float16 rows, for streaming reads: the HDF5 dataset itself (the folder form: an
        object with the same `.shape`, `.dtype`, `[i]`, `[lo:hi]` and `[()]`)."""
        return self._h5["features"]

    @property
    def settings(self) -> dict[str, Any]:
        return {k: self.attrs.get(k) for k in SETTINGS_KEYS}

    @property
    def dataset_root(self) -> Path | None:
        """Where the videos were at extraction: recorded relative to the folder of the file that holds the
        record (the cache file, a folder cache's index), so a clone finds its own copy; an older cache's
        absolute root as it is. None when none was recorded."""
        return resolve_root(self.attrs.get("dataset_root"), main_file(self.path).parent)

    @property
    def precision_summary(self) -> str:
        """The backbone precision of the rows: "bf16", or "mixed: bf16 12, fp32 3" when runs differed."""
        return per_row_summary(self.precision)

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
