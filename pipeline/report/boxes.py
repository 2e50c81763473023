"""Where the ground-truth boxes are and how they are read, for evaluate (scores) and render (outlines).

One place so that both stages look in the same folders and agree on what an unreadable file means: a
user error where the boxes were asked for (evaluate), a note where they only decorate a picture (render).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import ConfigError
from pipeline.video.folders import dataset_roots
from pipeline.video.synthetic import BOXES_FILE, read_boxes_file


def candidates(boxes: Path | None, recorded_root: str | None, videos: Path | None) -> list[Path]:
    """--boxes alone when given (it must exist); else boxes.json in the cache's recorded dataset root, then
    in params.yaml's data.videos (a moved or cloned project still finds it there)."""
    if boxes is not None:
        if not Path(boxes).is_file():
            raise ConfigError(f"{boxes}: no such boxes file")
        return [Path(boxes)]
    return [root / BOXES_FILE for root in dataset_roots(None, recorded_root, videos)]


def read_truth(path: Path | None, notes: list[str] | None = None) -> dict[str, np.ndarray]:
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


def truth_beside(root: Path, notes: list[str]) -> dict[str, np.ndarray]:
    """The boxes beside the videos (boxes.json in `root`), drawn on the overlays; {} when there are none."""
    return read_truth(root / BOXES_FILE, notes)


def shown(path: Path) -> str:
    """A path as metrics show it: relative to the working directory when inside it, so checkouts compare."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
