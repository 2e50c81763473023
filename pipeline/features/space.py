"""Disk space for the cache: the room a join needs, checked before it starts, and the one line a full disk ends
a run with.

A full disk is the user's to fix and nothing it interrupts is lost (finished clips sit in shards, a join writes
beside the old cache and renames), so it is an ExtractError that says how many clips are safe and how much room
the rest will take, never a traceback. The join writes a second copy of the cache beside the first (the rename
is what keeps readers safe), so it needs as much free space as the old cache plus the new shards; it is checked
up front rather than found out halfway through a 10 GB file.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

from pipeline.features.cache import FeatureCache, is_folder, main_file
from pipeline.features.extractor import ExtractError
from pipeline.features.shards import parts_dir_for, pending_shards

FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException | None) -> OSError | None:
    """The full disk or exhausted quota behind `exc` (itself or what it was raised from), or None."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def is_disk_full(exc: BaseException | None) -> bool:
    return disk_full(exc) is not None


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem that holds `path` (or its nearest existing folder)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def join_needs(cache: Path) -> int:
    """Bytes the join writes: a new one-file cache as large as the old one plus the pending shards (an upper
    bound: dropped rows only shrink it); a folder cache writes an index only, which this leaves out."""
    if is_folder(cache):
        return 0
    old = main_file(cache).stat().st_size if main_file(cache).exists() else 0
    return old + sum(p.stat().st_size for p in pending_shards(cache))


def safe_clips(cache: Path) -> int:
    """Clips whose features are on disk: the cache's rows and the pending shards' (each once)."""
    videos: set[str] = set()
    for source in ([cache] if main_file(cache).exists() else []) + pending_shards(cache):
        try:
            with (_open(source)) as part:
                videos.update(part.videos)
        except Exception:  # noqa: BLE001 - a damaged part is the next run's to report; this only counts
            continue
    return len(videos)


def _open(path: Path):
    from pipeline.features.reader import open_cache

    return open_cache(path) if path.is_dir() else FeatureCache(path)


def mb(n: float) -> str:
    """Bytes as people read them: 512 B, 38 KB, 1.3 MB, 9.6 GB."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


def require_room_for_join(cache: Path) -> None:
    """Refuse, before writing a byte, a join the disk cannot hold; the shards it would have joined are kept."""
    needs = join_needs(cache)
    free = free_bytes(cache.parent)
    if needs > free:
        raise ExtractError(f"not enough space to join the cache: the join writes a second copy of it "
                           f"({mb(needs)}) beside {cache}, and {mb(free)} is free there; {safe_clips(cache)} clips "
                           f"are safe in {parts_dir_for(cache)}: free {mb(needs - free)} and rerun to finish")


def disk_full_message(cache: Path, clips: int, clip_bytes: int, why: str = "No space left on device") -> str:
    """The one line a full disk ends a run with: how many of the dataset's `clips` are safe, and how much free
    space the rest (about `clip_bytes` each) and the join will take; `why` is the system's words for it."""
    safe = safe_clips(cache)
    rest = max(clips - safe, 0) * clip_bytes
    on_disk = join_needs(cache)
    joined = on_disk + rest if not is_folder(cache) else 0
    free = free_bytes(cache.parent)
    where = parts_dir_for(cache)
    need = rest + joined
    then = f"free about {mb(need - free)} and rerun to resume" if need > free else "rerun to resume"
    return (f"disk full while writing {cache} ({why}): {safe} of {clips} clips are safe ({where}); the other "
            f"{clips - safe} need about {mb(rest)}" + (f" and the join about {mb(joined)} more (a second copy of "
                                                       "the cache)" if joined else "")
            + f", {mb(free)} is free: {then}")
