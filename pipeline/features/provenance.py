"""What makes a feature what it is, and where it came from: the settings a cache records (and refuses to
mix), source-file fingerprints (so a rerun sees a changed dataset), precision per row, library versions.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Attributes that define what a feature *is*; two runs that differ in any of them must never be mixed.
# `quantization` is "none" for fp32 and bf16 (which may share a cache: they differ by ~1%, see README) and the
# calibration record of an int8 trunk (pipeline/features/int8.py): int8 features differ from fp32 by ~7% and
# from another calibration's, so an int8 cache holds one calibration only. Caches made before it: "none".
SETTINGS_KEYS = ("backbone", "layer", "weights", "image_size", "frames", "sampling", "mean", "std", "dtype",
                 "quantization")
DEFAULTS = {"quantization": "none"}  # what a cache written before a key existed had
_HASH_BLOCK = 1 << 20


def jsonable(value: Any) -> Any:
    """Lists and numpy scalars as plain Python values (what JSON and HDF5 attributes hold)."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def settings_mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two extraction settings, empty when they may be mixed."""
    diffs = []
    for key in SETTINGS_KEYS:
        a, b = (jsonable(d.get(key) if d.get(key) is not None else DEFAULTS.get(key)) for d in (old, new))
        if isinstance(a, list) and isinstance(b, list):
            same = len(a) == len(b) and np.allclose(a, b)
        else:
            same = a == b
        if not same:
            if key == "quantization":  # a calibration record is long JSON: say what it is
                from pipeline.features.int8 import short

                a, b = short(a), short(b)
            diffs.append(f"{key}: cache has {a!r}, asked for {b!r}")
    return diffs


# --- source fingerprints ------------------------------------------------------------------------------


def _digest(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file; the size is taken *before* reading, so a file written while it is
    hashed or decoded never looks unchanged later."""
    size = os.stat(path).st_size
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest(), size


def source_fingerprint(path: str | Path) -> str:
    """"sha256:<hex> size:<bytes>" of a source file: its content alone.

    No mtime and no path: the cache must be a function of the videos' bytes (docs/DESIGN.md, "Reproducible outputs"),
    so a clone, a copy or a `dvc pull` of the same dataset gives the same fingerprints and the same cache. The
    price is one read of every file per run (`source_changed`), cheap beside decoding it.
    """
    hexdigest, size = _digest(path)
    return f"sha256:{hexdigest} size:{size}"


def canonical_fingerprint(fingerprint: str) -> str:
    """A fingerprint as new caches record it: a cache written before 2026-12-07 also holds `mtime_ns:<ns>`,
    which the next join drops (the content hash it sits beside is what identifies the file)."""
    return " ".join(t for t in fingerprint.split() if not t.startswith("mtime_ns:"))


def _fingerprint_fields(fingerprint: str) -> dict[str, str]:
    return dict(token.split(":", 1) for token in fingerprint.split() if ":" in token)


def source_changed(fingerprint: str, path: str | Path, digests: dict[Path, str] | None = None) -> bool | None:
    """Whether `path` no longer holds the content `fingerprint` was taken of; None when nothing was recorded.

    A different size is a change without reading the file; otherwise the file is hashed (`digests` remembers the
    hashes of one run, so a file is read once however many entries name it). An old fingerprint with an mtime
    that still matches the file is trusted without reading, as it was when it was written. A file that cannot
    be read counts as changed.
    """
    if not fingerprint:
        return None
    recorded = _fingerprint_fields(fingerprint)
    try:
        stat = os.stat(path)
        if recorded.get("size") != str(stat.st_size):
            return True
        if recorded.get("mtime_ns") == str(stat.st_mtime_ns):
            return False
        key = Path(path)
        if digests is None or key not in digests:
            hexdigest = _digest(path)[0]
            if digests is not None:
                digests[key] = hexdigest
        else:
            hexdigest = digests[key]
        return hexdigest != recorded.get("sha256")
    except OSError:
        return True


def relative_root(root: str | Path, base: str | Path) -> str:
    """The dataset root as a cache records it: relative to `base`, the folder of the file holding the record
    (POSIX separators), so two clones of one project at two paths write the same bytes; absolute only where no
    relative path exists (another drive)."""
    try:
        return Path(os.path.relpath(Path(root).resolve(), Path(base).resolve())).as_posix()
    except ValueError:
        return str(Path(root).resolve())


def resolve_root(recorded: str | None, base: str | Path) -> Path | None:
    """The recorded dataset root as a path: a relative one (caches since 2026-12-07) against `base`, an absolute
    one (older caches) as it is; None when none was recorded."""
    if not recorded:
        return None
    path = Path(recorded)
    return path if path.is_absolute() else Path(os.path.normpath(Path(base) / path))


def per_row_summary(per_row: Sequence[str]) -> str:
    """One value (precision, trunk) when every row has it; else each with its count ("mixed: bf16 12, fp32 3")."""
    counts: dict[str, int] = {}
    for value in per_row:
        counts[value or "unknown"] = counts.get(value or "unknown", 0) + 1
    if len(counts) <= 1:
        return next(iter(counts), "")
    return "mixed: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def extraction_settings(provenance: dict[str, Any], frames: int, weights_label: str | None = None) -> dict[str, Any]:
    """The settings (SETTINGS_KEYS) a cache records for features made by a backbone with `provenance`.

    extract writes them and predict rebuilds them to compare with a checkpoint's, so they are made here
    only. `weights_label` replaces the provenance's own label (predict names a weights file by its path).
    """
    from pipeline.video.decode import SAMPLING

    label = weights_label if weights_label is not None else provenance["weights"]
    return {"backbone": provenance["backbone"], "layer": provenance["layer"],
            "weights": f"{label} sha256:{provenance['weights_sha256']}", "image_size": provenance["image_size"],
            "frames": frames, "sampling": SAMPLING, "mean": list(provenance["mean"]), "std": list(provenance["std"]),
            "dtype": "float16", "quantization": provenance.get("quantization", "none")}


def versions() -> dict[str, str]:
    """Versions of what made the features, each asked of the module itself (decord may be decord2 or 0.6)."""
    import importlib
    import sys

    import pipeline

    found = {"pipeline": pipeline.__version__}
    for name in ("torch", "torchvision", "decord", "av", "h5py", "torchao"):
        if name == "torchao" and name not in sys.modules:  # loaded only for int8: recorded where it made features
            continue
        try:
            found[name] = str(getattr(importlib.import_module(name), "__version__", "unknown"))
        except Exception:  # noqa: BLE001 - a broken optional install must not stop the record
            found[name] = "not importable"
    return found
