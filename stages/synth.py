"""Stage `synth`: write the embedded default dataset into one folder, or find it already there.

The folder is built beside its destination (`<out>.tmp-<pid>`) and renamed into place only when complete,
with `synth.json` (the settings that made it) inside; so a crash never leaves a half dataset that looks
finished, and a rerun with the same settings is a no-op.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from pipeline.config import SynthConfig, as_dict, check
from pipeline.errors import UserError
from pipeline.progress import progress_bar
from pipeline.video.synthetic import (
    BOXES_FILE,
    GENERATOR_VERSION,
    SYNTH_ENCODINGS,
    SynthSummary,
    check_config,
    generate_dataset,
    read_boxes,
)

MANIFEST = "synth.json"
MANIFEST_FORMAT = 1


class SynthError(UserError, ValueError):
    """The output folder or the settings cannot be used as asked."""


def settings(cfg: SynthConfig, classes: Sequence[str]) -> dict[str, Any]:
    """Everything that decides the dataset's content; equal settings mean an identical dataset."""
    return {"generator": GENERATOR_VERSION, "config": as_dict(cfg), "classes": list(classes),
            "encodings": [enc.label for enc in SYNTH_ENCODINGS]}


def read_manifest(root: Path) -> dict[str, Any] | None:
    """`root/synth.json`, or None when it is absent or unreadable (then the folder is not ours)."""
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(root: Path, manifest: dict[str, Any]) -> bool:
    """Every clip the manifest counts is on disk (a user may have deleted some since)."""
    try:
        keys = read_boxes(root)
    except ValueError:
        return False
    expected = sum(manifest.get("counts", {}).values())
    return len(keys) == expected and all((root / key).is_file() for key in keys)


def existing_dataset(out_dir: Path, wanted: dict[str, Any]) -> SynthSummary | None:
    """The summary of an identical complete dataset in `out_dir`, or None when there is nothing there.

    Anything else in a non-empty `out_dir` is a SynthError: we never write over data we did not make as asked.
    """
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise SynthError(f"{out_dir} exists and is not a folder; pass --overwrite to replace it")
    if not any(out_dir.iterdir()):
        return None
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise SynthError(f"{out_dir} holds files that are not a synthetic dataset; pass --overwrite to replace them")
    if manifest.get("settings") != wanted:
        raise SynthError(f"{out_dir} holds a synthetic dataset with other settings; pass --overwrite to replace it")
    if not _is_complete(out_dir, manifest):
        raise SynthError(f"{out_dir} holds an incomplete synthetic dataset; pass --overwrite to rebuild it")
    return SynthSummary(root=out_dir, counts=manifest["counts"], codecs=manifest["codecs"],
                        files=sum(manifest["counts"].values()), seconds=0.0, reused=True)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete `<out>.tmp-<pid>` folders left by runs that died (their process no longer exists)."""
    for path in out_dir.parent.glob(f"{out_dir.name}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(built: Path, out_dir: Path) -> None:
    """Rename the finished folder to `out_dir`, moving an old one aside first and deleting it after."""
    old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
    if out_dir.is_dir() and not out_dir.is_symlink():
        out_dir.rename(old)
    elif out_dir.exists() or out_dir.is_symlink():
        out_dir.unlink()
    built.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _build(out_dir: Path, cfg: SynthConfig, classes: Sequence[str], wanted: dict[str, Any],
           progress: bool) -> SynthSummary:
    """Generate into `<out>.tmp-<pid>` with a progress bar, write the manifest last, rename into place."""
    built = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(built, ignore_errors=True)
    try:
        with progress_bar("synth", len(classes) * cfg.clips_per_class, "clips", enabled=progress) as bar:

            def advance(_key: str) -> None:
                bar.advance()
                bar.note(f"{bar.speed:.1f} clips/s" if bar.speed else "")

            summary = generate_dataset(built, cfg, classes, progress=advance)
        manifest = {"format": MANIFEST_FORMAT, "settings": wanted, "counts": summary.counts, "codecs": summary.codecs,
                    "boxes": BOXES_FILE}
        (built / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")  # same bytes every run
        _move_into_place(built, out_dir)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    summary.root = out_dir
    return summary


def print_summary(summary: SynthSummary, console) -> None:
    """One row per class: its clips, and how many were written with each codec/container pair."""
    from rich.markup import escape
    from rich.table import Table

    verb = "already there" if summary.reused else f"written in {summary.seconds:.1f} s"
    labels = [enc.label for enc in SYNTH_ENCODINGS]
    table = Table(title=f"synthetic dataset {escape(str(summary.root))}: {summary.files} clips, {verb}")
    table.add_column("class")
    table.add_column("clips", justify="right")
    for label in labels:
        table.add_column(label.replace("-", " "), justify="right")  # spaces let narrow terminals wrap it
    for name, count in summary.counts.items():
        per_codec = summary.codecs.get(name, {})
        table.add_row(escape(name), str(count), *(str(per_codec.get(label, 0)) for label in labels))
    console.print(table)


def run(out_dir: Path, cfg: SynthConfig, overwrite: bool = False, classes: Sequence[str] | None = None,
        console=None, progress: bool = True) -> SynthSummary:
    """Write the dataset `cfg` describes to `out_dir`; a no-op when exactly that dataset is already there."""
    from rich.console import Console

    console = console or Console(stderr=True)
    out_dir = Path(os.path.abspath(out_dir))  # "." and "a/.." have no name to build a sibling from
    cfg = check(cfg)
    try:
        chosen = check_config(cfg, classes)
    except ValueError as exc:
        raise SynthError(str(exc)) from None
    wanted = settings(cfg, chosen)
    summary = None if overwrite else existing_dataset(out_dir, wanted)
    if summary is None:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out_dir)
        summary = _build(out_dir, cfg, chosen, wanted, progress)
    print_summary(summary, console)
    return summary
