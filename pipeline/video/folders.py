"""Datasets on disk: class folders of videos (the HMDB-51 / UCF-101 layout) and video keys."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.video.decode import is_video_file


@dataclass(frozen=True)
class Clip:
    video: str  # key: path relative to the dataset root, POSIX separators, e.g. "brush_hair/a.avi"
    label: str  # class name (the folder)
    path: Path


@dataclass
class Discovery:
    clips: list[Clip] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)  # class folders with no video in them
    classes: list[str] = field(default_factory=list)


class DatasetError(UserError):
    """A dataset root that cannot be read as class folders; the message says why."""


def discover(root: str | Path) -> Discovery:
    """Every video under `root/<class>/` (nested folders inside a class are searched too), sorted by key."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (expected <root>/<class>/<clip>.avi ...)")
    found = Discovery()
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        videos = sorted(p for p in folder.rglob("*") if is_video_file(p))
        if not videos:
            found.empty_classes.append(folder.name)
            continue
        found.classes.append(folder.name)
        found.clips.extend(Clip(p.relative_to(root).as_posix(), folder.name, p) for p in videos)
    if not found.clips and not found.empty_classes:
        raise DatasetError(f"{root}: no class folders with videos in it")
    return found


def dataset_roots(flag: str | Path | None, recorded: str | Path | None, configured: str | Path | None) -> list[Path]:
    """Where to look for a cache's videos (and boxes.json), in order: the flag alone when given; else the
    root the cache recorded at extraction while it exists; else that and params.yaml's `data.videos` (the
    graph's relative path, which still holds when the project folder was moved or cloned elsewhere).

    An existing recorded root is never passed over: a dataset without boxes.json must not borrow another
    dataset's from data.videos."""
    if flag is not None:
        return [Path(flag)]
    if recorded and Path(recorded).is_dir():
        return [Path(recorded)]
    found: list[Path] = []
    for root in (recorded, configured):
        if root and Path(root) not in found:
            found.append(Path(root))
    return found


def first_existing(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def video_files(paths: list[Path]) -> list[Path]:
    """Files as given; a folder stands for the video files under it (sorted), so a whole set is one call."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_video_file(p))
            out.extend(found or [path])  # an empty folder stays, to be reported as a failure
        else:
            out.append(path)
    return list(dict.fromkeys(out))
