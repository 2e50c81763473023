"""Which clips a run must extract: the rerun plan over the cache and its shards, and the one-writer lock.

A rerun follows the dataset: entries whose file is gone are dropped, entries whose file changed (by content
fingerprint: size and sha256, no mtime, so the cache depends on the videos' bytes alone) are dropped and
extracted again, and an unchanged dataset costs one read of each file (hashing, far cheaper than decoding it)
and leaves the cache file (or a folder cache's index) untouched.

The lock is `flock(2)` on `<cache>.lock`, beside the cache in both forms (never inside a folder cache, which
is a DVC output): it holds between processes of one machine and on local filesystems; on NFS it depends on
the server's lock manager (NLM / NFSv4 locks), and on Lustre on the `flock` mount option, so two machines
sharing a cache (a file or a folder) must not both extract into it.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipeline.features.cache import INDEX_NAME, CacheError, FeatureCache, is_folder, main_file
from pipeline.features.extractor import ExtractError
from pipeline.features.provenance import settings_mismatch, source_changed
from pipeline.features.reader import open_cache
from pipeline.features.shards import parts_dir_for, pending_shards, shard_paths
from pipeline.video.folders import Discovery


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


class Incompatible(ExtractError):
    """The cache or a shard was made with other settings, or cannot be read: --overwrite starts over."""


def start_over(cache: Path) -> None:
    """--overwrite on an incompatible cache: the cache and its unjoined shards go (a folder cache: its index,
    shards and leftovers; the folder itself stays)."""
    if is_folder(cache):
        for path in [cache / INDEX_NAME, *shard_paths(cache), *cache.glob("*.tmp")]:
            path.unlink(missing_ok=True)
        return
    cache.unlink(missing_ok=True)
    shutil.rmtree(parts_dir_for(cache), ignore_errors=True)


def _require_compatible(existing: FeatureCache, cache: Path, settings: dict) -> None:
    """Refuse to mix features made with other settings into `cache`."""
    diffs = settings_mismatch(existing.settings, settings)
    if diffs:
        raise Incompatible(f"{cache} was made with other settings ({'; '.join(diffs)}); "
                            "pass --overwrite to start over, or write to another path")


@dataclass
class Plan:
    """What a rerun keeps, drops and redoes of the entries that the cache and its shards hold."""

    done: set[str] = field(default_factory=set)  # keys with a current row (or failure, unless retrying)
    drop: set[tuple[str, str]] = field(default_factory=set)  # stale (key, fingerprint) entries, for join
    removed: set[str] = field(default_factory=set)  # keys whose file is gone
    changed: set[str] = field(default_factory=set)  # keys whose file changed since it was extracted
    repinned: set[str] = field(default_factory=set)  # keys whose row was made at another than the pinned precision


def rerun_plan(cache: Path, found: Discovery, settings: dict, retry_failed: bool, precision: str | None = None) -> Plan:
    """Check every row and failure of the cache (a folder: its index) and of the shards it does not hold yet
    against the dataset as it is now.

    Each file is opened once: its settings must match `settings` (else ExtractError), then its entries
    are read.

    A key no longer discovered is gone; a fingerprint that no longer matches its file is changed; both are
    dropped (changed ones are then extracted again). An entry without a fingerprint (a cache from before
    they were recorded) cannot be checked for changes: it is kept while its file exists and is not
    rewritten just to add one (delete the cache to extract everything again). A class-folder failure ("name/")
    is gone once the folder holds videos or no longer exists.

    `precision` (fp32 | bf16), when the run pins one: a row made at another precision is extracted again, so
    that `extract.precision: fp32` in params.yaml takes effect on a cache a bf16 machine began (precision is no
    setting that refuses a mix: under `auto` such rows stay). The new row wins at the join; nothing is dropped
    before it exists.
    """
    paths: dict[str, Path | None] = {c.video: c.path for c in found.clips}
    paths.update((f"{name}/", None) for name in found.empty_classes)
    verdicts: dict[tuple[str, str], str] = {}  # the same entry in the cache and a shard is checked once
    digests: dict[Path, str] = {}  # and each file is read once, whatever its entries' fingerprints
    plan = Plan()
    for source in _sources(cache):
        entries = _entries(source, cache, settings)
        for video, fingerprint, is_failure, made_at in entries:
            entry = (video, fingerprint)
            if entry not in verdicts:
                verdicts[entry] = _verdict(video, fingerprint, paths, digests)
            if verdicts[entry] == "current":
                if precision and not is_failure and made_at and made_at != precision:
                    plan.repinned.add(video)  # extracted again at the pinned precision
                elif not (is_failure and retry_failed):
                    plan.done.add(video)
                continue
            plan.drop.add(entry)
            (plan.removed if verdicts[entry] == "gone" else plan.changed).add(video)
    plan.repinned -= plan.done  # a shard at the pinned precision already holds it: the join keeps that row
    return plan


def _sources(cache: Path) -> list[Path]:
    """The complete cache (when there is one), then the shards written for it that it does not hold yet."""
    try:
        pending = pending_shards(cache)
    except CacheError as exc:
        raise Incompatible(f"{exc}; pass --overwrite to start a new cache") from None
    return ([cache] if main_file(cache).exists() else []) + pending


def _entries(source: Path, cache: Path, settings: dict) -> list[tuple[str, str, bool, str]]:
    """(key, fingerprint, is_failure, precision) of every row and failure of `source`, a part of `cache`."""
    try:
        with open_cache(source) as existing:
            _require_compatible(existing, cache, settings)
            entries = [(v, s, False, p) for v, s, p in zip(existing.videos, existing.source, existing.precision)]
            return entries + [(v, s, True, "") for (v, _), s in zip(existing.failed, existing.failed_source)]
    except CacheError as exc:
        raise Incompatible(f"{exc}; pass --overwrite to start a new cache") from None


def _verdict(video: str, fingerprint: str, paths: dict[str, Path | None], digests: dict[Path, str]) -> str:
    """"gone", "changed" or "current" (also a class-folder entry, or one without a fingerprint)."""
    if video not in paths:
        return "gone"
    path = paths[video]
    if path is None or not source_changed(fingerprint, path, digests):
        return "current"
    return "changed"
