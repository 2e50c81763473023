"""Reading a feature cache of either form: `open_cache(path)`, and the folder form's reader `FolderCache`.

The form is chosen by the path alone (`cache.is_folder`): a path ending in .h5/.hdf5 (or any existing file) is
one self-contained file, read by `FeatureCache` (pipeline/features/cache.py); a folder, or a new path without
that suffix, is a folder of `shard-*.h5` files plus `index.h5`, read by `FolderCache` below. This module knows
both forms, so neither reader has to know the other: reader -> cache.

Why a second form: joining shards into one file rewrites the whole cache on every run that adds clips (1 TB
at Kinetics-700), while a folder only gains new shards and a new index (docs/DESIGN.md, "Past one machine").
The index carries the joined file's attrs and every per-row dataset except `features`, plus where each row
lives (`shard`: a number into the `shards` list of file names, `row`: the row in that shard), so
`FolderCache` reads only the index eagerly and opens a shard on its first read. Not HDF5 virtual datasets: a
missing source reads as zeros there, silently; here it is an error.

The index is written by pipeline/features/shards.py (`write_index`), last in a run; a shard the index no
longer references is deleted after the new index is in place, and named in its `retired` list until then.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from pipeline.features.cache import INDEX_NAME, CacheError, FeatureCache, is_folder, texts


def _texts(h5, name: str) -> list[str]:
    if name not in h5:
        return []
    return texts(h5[name][()])


def indexed_names(folder: Path) -> set[str]:
    """Shard file names the folder's index accounts for (referenced or retired); empty without an index."""
    import h5py

    index = Path(folder) / INDEX_NAME
    if not index.exists():
        return set()
    try:
        with h5py.File(index, "r") as h5:
            return set(_texts(h5, "shards")) | set(_texts(h5, "retired"))
    except OSError:
        raise CacheError(f"{index}: not an HDF5 file (damaged index)") from None


def retired_names(folder: Path) -> list[str]:
    """Shards the folder's index no longer references (their deletion may have been cut short by a crash)."""
    import h5py

    index = Path(folder) / INDEX_NAME
    if not index.exists():
        return []
    with h5py.File(index, "r") as h5:
        return _texts(h5, "retired")


class ShardedFeatures:
    """The (N, T, C, h, w) rows of a folder cache, read across its shards like one HDF5 dataset."""

    def __init__(self, cache: "FolderCache"):
        self._cache = cache
        self.shape = (len(cache.videos), *cache.feature_shape)
        self.dtype = np.dtype(np.float16)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        n = self.shape[0]
        if (isinstance(key, tuple) and key == ()) or key is Ellipsis:
            return self._rows(np.arange(n))
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            return self._rows(np.array([i]))[0]
        if isinstance(key, slice):
            return self._rows(np.arange(n)[key])
        return self._rows(np.asarray(key, dtype=np.int64))

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows in the given order; consecutive rows of one shard are read as one run."""
        cache = self._cache
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if len(rows) == 0:
            return out
        shard, local = cache.shard[rows], cache.row[rows]
        breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(local) != 1)) + 1
        for run in np.split(np.arange(len(rows)), breaks):
            lo = local[run[0]]
            out[run] = cache._shard_file(int(shard[run[0]]))["features"][lo:lo + len(run)]
        return out


class FolderCache(FeatureCache):
    """A folder cache: `open_cache(folder)` returns one. Same attributes and methods as the one-file form."""

    _TABLE = "shard"

    def __init__(self, path: str | Path):
        self._handles: dict[int, object] = {}
        self._open_lock = threading.Lock()
        super().__init__(path)
        self._h5.close()  # everything the index holds is read; shards open on demand
        self._h5 = None
        self._features = ShardedFeatures(self)

    def _missing(self) -> str:
        what = "is not a feature cache yet" if self.path.is_dir() else "does not exist"
        return (f"{self.path}: folder cache without {INDEX_NAME} ({what}); run `python -m pipeline extract` "
                "into it (a run cut short is finished by the next one)")

    def _read_more(self, h5) -> None:
        self.shards: list[str] = _texts(h5, "shards")
        self.retired: list[str] = _texts(h5, "retired")
        self.shard = h5["shard"][()].astype(np.int64)
        self.row = h5["row"][()].astype(np.int64)
        self.failed_shard = h5["failed_shard"][()].astype(np.int64) if "failed_shard" in h5 else \
            np.full(len(self.failed), -1, dtype=np.int64)
        shape = self.attrs.get("feature_shape") or [0, 0, 0, 0]
        self._shape = tuple(int(v) for v in shape)
        n = len(self.videos)
        if len(self.shard) != n or len(self.row) != n or len(self.failed_shard) != len(self.failed):
            raise ValueError("shard/row lists do not match the rows")
        if n and (self.shard.min() < 0 or self.shard.max() >= len(self.shards)):
            raise ValueError("a row names a shard the index does not list")

    @property
    def features(self) -> ShardedFeatures:
        return self._features

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self._shape

    def location(self, row: int) -> tuple[Path, int]:
        return self.path / self.shards[self.shard[row]], int(self.row[row])

    def failure_location(self, i: int) -> Path:
        s = int(self.failed_shard[i])
        return self.path / self.shards[s] if s >= 0 else self.path / INDEX_NAME

    def _shard_file(self, s: int):
        """The open h5py handle of shard `s` (opened on first use, kept until close())."""
        handle = self._handles.get(s)
        if handle is None:
            import h5py

            with self._open_lock:
                handle = self._handles.get(s)
                if handle is None:
                    path = self.path / self.shards[s]
                    try:
                        handle = h5py.File(path, "r")
                    except (OSError, FileNotFoundError):
                        raise CacheError(f"{path}: shard named by {self.path / INDEX_NAME} is missing or "
                                         "unreadable; rerun `python -m pipeline extract --overwrite`") from None
                    self._handles[s] = handle
        return handle

    def close(self) -> None:
        with self._open_lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()


def open_cache(path: str | Path) -> FeatureCache:
    """Open the cache at `path` for reading: a `FolderCache` for a folder, else a `FeatureCache` (a file).

    Either has the same attributes and methods and is a context manager; a path that is not a complete cache
    raises CacheError saying what to run.
    """
    return FolderCache(path) if is_folder(path) else FeatureCache(path)
