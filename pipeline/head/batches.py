"""Batches of cached feature cubes for the head: from memory when the split fits, streamed when not.

Training reads the same clips every epoch, so a split that fits under `max_memory_gb` is read once into a
float16 tensor (as stored: half the memory of float32) and batches are gathered from it. A bigger split
is streamed: each batch is read from the cache (rows sorted, so the reader sees contiguous runs) ahead of
the model, by `loader_workers` data-loader processes (torch's DataLoader, spawned once per set and kept
across epochs), each with its own handle on the cache: HDF5 serialises every read of one handle behind a
global lock, so only separate processes read in parallel, and a handle is never shared across a fork. With
0 workers a background thread of this process stays one batch ahead. Under torchrun each rank is a process
of its own and opens its own handle (and workers).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.features.cache import CacheError, FeatureCache
from pipeline.features.reader import open_cache
from pipeline.video.splits import SplitError, read_split
from pipeline.workers import stop_producer


@dataclass
class Batch:
    rows: np.ndarray  # (B,) positions within the clip set
    features: "torch.Tensor"  # noqa: F821  (B, T, C, h, w) float16, on the CPU
    labels: "torch.Tensor"  # noqa: F821  (B,) int64


class ClipSet:
    """The clips `keys` of a cache with their labels; `batches()` yields them in a given order."""

    def __init__(self, cache: FeatureCache, keys: Sequence[str], max_memory_gb: float = 8.0, loader_workers: int = 0):
        import torch

        self.cache = cache
        self.loader_workers = loader_workers
        self._loader = None  # the streaming DataLoader and its sampler, made on the first streamed pass
        self.keys = list(keys)
        self.index = cache.indices(self.keys)  # (N,) rows in the cache; CacheError names an unknown key
        self.labels = torch.from_numpy(cache.labels[self.index])
        t, c, h, w = cache.feature_shape
        self.nbytes = len(self.keys) * t * c * h * w * 2
        self.in_memory = self.nbytes <= max_memory_gb * 2**30
        self._features = cache.load(self.index) if self.in_memory else None  # (N, T, C, h, w) float16 numpy

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def clips_a_class(self) -> float:
        """The mean number of clips over the classes this set holds (what `head.appearance: auto` is decided on)."""
        return len(self) / max(len(np.unique(self.labels.numpy())), 1)

    def batches(self, batch_size: int, order: Sequence[int] | np.ndarray | None = None) -> Iterator[Batch]:
        """Batches of `batch_size` clips in `order` (positions into this set; default: as listed)."""
        order = np.arange(len(self)) if order is None else np.asarray(order, dtype=np.int64)
        yield from self.batches_of([order[i:i + batch_size] for i in range(0, len(order), batch_size)])

    def batches_of(self, chunks: Sequence[np.ndarray]) -> Iterator[Batch]:
        """One batch per entry of `chunks` (positions into this set), in that order (a rank's shares)."""
        import torch

        chunks = [np.asarray(rows, dtype=np.int64) for rows in chunks]
        if self.in_memory:
            for rows in chunks:
                yield self._batch(rows, torch.from_numpy(self._features[rows]))  # a fresh array, as streamed
        else:
            yield from self._streamed(chunks)

    def _batch(self, rows: np.ndarray, features) -> Batch:
        return Batch(rows, features, self.labels[rows])

    def _streamed(self, chunks: list[np.ndarray]) -> Iterator[Batch]:
        if self.loader_workers > 0:
            yield from self._loaded(chunks)
        else:
            yield from self._threaded(chunks)

    def _loaded(self, chunks: list[np.ndarray]) -> Iterator[Batch]:
        """Batches read by the data-loader processes, in order, two per worker in flight."""
        import torch
        from torch.utils.data import DataLoader

        if self._loader is None:
            passes = _Chunks()
            loader = DataLoader(_ChunkReader(self.cache.path, self.index), batch_size=None, sampler=passes,
                                num_workers=self.loader_workers, persistent_workers=True, prefetch_factor=2,
                                multiprocessing_context="spawn")  # never fork a process holding HDF5 and torch
            self._loader = (loader, passes)
        loader, passes = self._loader
        passes.chunks = chunks
        for rows, features in zip(chunks, loader):
            if isinstance(features, BaseException):
                raise features
            yield self._batch(rows, torch.as_tensor(features))

    def _threaded(self, chunks: list[np.ndarray]) -> Iterator[Batch]:
        """Read batch k+1 from the file while the caller computes on batch k."""
        import torch

        ahead: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def read() -> None:
            try:
                for rows in chunks:
                    if stop.is_set():
                        return
                    ahead.put(self._batch(rows, torch.from_numpy(self.cache.load(self.index[rows]))))
                ahead.put(None)
            except BaseException as exc:  # handed to the consumer, raised there
                ahead.put(exc)

        thread = threading.Thread(target=read, name="feature-reader", daemon=True)
        thread.start()
        try:
            while (item := ahead.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop_producer(stop, thread, ahead)


class _Chunks:
    """The data loader's sampler: the row arrays of the current pass (set before each pass)."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class _ChunkReader:
    """A data-loader worker's view of the cache: its own handle, opened on its first read."""

    def __init__(self, path: Path, index: np.ndarray):
        self.path, self.index, self._cache = path, index, None

    def __getitem__(self, rows: np.ndarray):  # (B,) positions -> (B, T, C, h, w) float16
        try:
            if self._cache is None:
                self._cache = open_cache(self.path)
            return self._cache.load(self.index[rows])
        except CacheError as exc:  # handed over as a value: the trainer raises it as the one-line error it is
            return exc


def open_split(cache: FeatureCache, splits_dir: str | Path, name: str, max_memory_gb: float = 8.0,
               loader_workers: int = 0) -> ClipSet:
    """The clips of split `name`; a key the cache does not hold is an error naming the split file."""
    keys = read_split(splits_dir, name)
    missing = [k for k in keys if k not in cache]
    if missing:
        raise SplitError(f"{Path(splits_dir) / (name + '.txt')}: {len(missing)} clip(s) not in {cache.path} "
                         f"(first: {missing[0]!r}); rerun `python -m pipeline split` on this cache")
    try:
        return ClipSet(cache, keys, max_memory_gb, loader_workers)
    except CacheError as exc:
        raise SplitError(str(exc)) from None
