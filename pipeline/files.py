"""Atomic file writes: readers (and DVC) see the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A file handle on a temporary name beside `path`; on success it is fsynced and renamed into place,
    on an exception removed (the old file, if any, stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
