"""Batches of cached feature cubes for the head: from memory when the split fits, streamed when not.

Training reads the same clips every epoch, so a split that fits under `max_memory_gb` is read once into a
float16 tensor (as stored: half the memory of float32) and batches are gathered from it. A bigger split
is streamed: each batch is read from the HDF5 file (rows sorted, so the reader sees contiguous runs) by a
background thread that stays one batch ahead of the model.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.features.cache import CacheError, FeatureCache
from pipeline.video.splits import SplitError, read_split
from pipeline.video.workers import stop_producer


@dataclass
class Batch:
    rows: np.ndarray  # (B,) positions within the clip set
    features: "torch.Tensor"  # noqa: F821  (B, T, C, h, w) float16, on the CPU
    labels: "torch.Tensor"  # noqa: F821  (B,) int64


class ClipSet:
    """The clips `keys` of a cache with their labels; `batches()` yields them in a given order."""

    def __init__(self, cache: FeatureCache, keys: Sequence[str], max_memory_gb: float = 8.0):
        import torch

        self.cache = cache
        self.keys = list(keys)
        self.index = cache.indices(self.keys)  # (N,) rows in the cache; CacheError names an unknown key
        self.labels = torch.from_numpy(cache.labels[self.index])
        t, c, h, w = cache.feature_shape
        self.nbytes = len(self.keys) * t * c * h * w * 2
        self.in_memory = self.nbytes <= max_memory_gb * 2**30
        self._features = cache.load(self.index) if self.in_memory else None  # (N, T, C, h, w) float16 numpy

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, batch_size: int, order: Sequence[int] | np.ndarray | None = None) -> Iterator[Batch]:
        """Batches of `batch_size` clips in `order` (positions into this set; default: as listed)."""
        import torch

        order = np.arange(len(self)) if order is None else np.asarray(order, dtype=np.int64)
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if self.in_memory:
            for rows in chunks:
                yield self._batch(rows, torch.from_numpy(self._features[rows]))  # a fresh array, as streamed
        else:
            yield from self._streamed(chunks)

    def _batch(self, rows: np.ndarray, features) -> Batch:
        return Batch(rows, features, self.labels[rows])

    def _streamed(self, chunks: list[np.ndarray]) -> Iterator[Batch]:
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


def open_split(cache: FeatureCache, splits_dir: str | Path, name: str, max_memory_gb: float = 8.0) -> ClipSet:
    """The clips of split `name`; a key the cache does not hold is an error naming the split file."""
    keys = read_split(splits_dir, name)
    missing = [k for k in keys if k not in cache]
    if missing:
        raise SplitError(f"{Path(splits_dir) / (name + '.txt')}: {len(missing)} clip(s) not in {cache.path} "
                         f"(first: {missing[0]!r}); rerun `python -m pipeline split` on this cache")
    try:
        return ClipSet(cache, keys, max_memory_gb)
    except CacheError as exc:
        raise SplitError(str(exc)) from None
