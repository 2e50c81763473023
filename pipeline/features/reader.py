"""`open_cache(path)`: the reader for a feature cache of either form, picked by its path alone.

A path ending in .h5/.hdf5 (or any existing file) is one self-contained file, read by `FeatureCache`
(pipeline/features/cache.py); a folder, or a new path without that suffix, is a folder cache of shards plus
`index.h5`, read by `FolderCache` (pipeline/features/folder.py). The rule itself is `cache.is_folder`.

The one module that knows both forms, so neither has to know the other: reader -> folder -> cache.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.features.cache import FeatureCache, is_folder
from pipeline.features.folder import FolderCache


def open_cache(path: str | Path) -> FeatureCache:
    """Open the cache at `path` for reading: a `FolderCache` for a folder, else a `FeatureCache` (a file).

    Either has the same attributes and methods and is a context manager; a path that is not a complete cache
    raises CacheError saying what to run.
    """
    return FolderCache(path) if is_folder(path) else FeatureCache(path)
