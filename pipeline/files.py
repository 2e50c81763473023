"""Atomic file writes: readers (and DVC) see the old file or the new one, never half of one."""
from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `path` under a temporary name, fsync, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, data: object) -> Path:
    import json

    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_tsv_atomic(path: str | Path, header: list[str], rows: list[list[object]]) -> Path:
    """A tab-separated table with a header line (what DVC's plots read)."""
    lines = ["\t".join(header)] + ["\t".join(_cell(v) for v in row) for row in rows]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def _cell(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
