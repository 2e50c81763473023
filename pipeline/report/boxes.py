"""Where the ground-truth boxes are and how they are read, for evaluate (scores) and render (outlines).

One place so that both stages look in the same folders and agree on what an unreadable file means: a
user error where the boxes were asked for (evaluate, or render's --boxes), a note where they only decorate a
picture (render's boxes.json beside the videos). The file's format is pipeline/video/boxes.py's (1 or 2).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError
from pipeline.video.boxes import BOXES_FILE, VideoBoxes, read_boxes_file
from pipeline.video.folders import dataset_roots


def candidates(boxes: Path | None, recorded_root: str | Path | None, videos: Path | None) -> list[Path]:
    """--boxes alone when given (it must exist); else boxes.json in the cache's recorded dataset root, then
    in params.yaml's data.videos (a moved or cloned project still finds it there)."""
    if boxes is not None:
        if not Path(boxes).is_file():
            raise ConfigError(f"{boxes}: no such boxes file")
        return [Path(boxes)]
    return [root / BOXES_FILE for root in dataset_roots(None, recorded_root, videos)]


def read_truth(path: Path | None, notes: list[str] | None = None) -> dict[str, VideoBoxes]:
    """{clip key: boxes} from `path`; {} when there is none. An unreadable file is a ConfigError, or, with
    `notes`, a note there and {}."""
    if path is None or (notes is not None and not Path(path).is_file()):
        return {}
    try:
        return read_boxes_file(path)
    except (ValueError, OSError) as exc:
        if notes is None:
            raise ConfigError(str(exc).splitlines()[0]) from None
        notes.append(f"{path} ignored: {str(exc).splitlines()[0]}")
        return {}


def truth_beside(root: Path, notes: list[str], boxes: Path | None = None) -> dict[str, VideoBoxes]:
    """The boxes drawn on the overlays: `boxes` when given (it must exist and read), else boxes.json beside
    the videos in `root` ({} when there is none, a note when it does not read)."""
    if boxes is not None:
        return read_truth(candidates(boxes, None, None)[0])
    return read_truth(root / BOXES_FILE, notes)


def shown(path: Path) -> str:
    """A path as metrics show it: relative to the working directory when inside it, so checkouts compare."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
