"""The one atomic writer: readers (and DVC) see the old file or the new one, never half of one.

Every output of the project goes through `atomic_path` (a temporary name beside the target, fsync, rename,
fsync of the folder so the rename itself survives a power cut); `atomic_file` is the same with an open
handle, for writers that take a file object.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path, temp: str | Path | None = None) -> Iterator[Path]:
    """A temporary path beside `path` to write (by any library: h5py, torch.save, PIL); on success it is
    fsynced and renamed into place, on an exception removed (the old file, if any, stays).

    `temp` names the temporary file where a later run must find and delete what a crash left (the cache's
    `<cache>.tmp`); by default it is `.<name>.<pid>.tmp` in the same folder (same filesystem: the rename is
    atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp) if temp is not None else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """`atomic_path` with the temporary file open in `mode` (text modes write UTF-8)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle


def _fsync(path: Path) -> None:
    """fsync a file or a folder; a filesystem that cannot fsync a folder (some network mounts) is let be."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `path` under a temporary name, fsync, then rename it into place."""
    with atomic_file(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, data: object) -> Path:
    import json

    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_tsv_atomic(path: str | Path, header: list[str], rows: list[list[object]]) -> Path:
    """A tab-separated table with a header line (what DVC's plots read)."""
    lines = ["\t".join(header)] + ["\t".join(_cell(v) for v in row) for row in rows]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def _cell(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
