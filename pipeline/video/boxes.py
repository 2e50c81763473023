"""The ground-truth boxes file: where the actors are, frame by frame, for evaluate's scores and render's outlines.

Real boxes are sparse and plural: frames before and after an action have none, and a frame may hold several
actors. So a boxes file says, per video and per decoded frame (0-based, the numbering of the cache's
`frame_index`), zero, one or several boxes `[x0, y0, x1, y1]` (pixel i spans [i, i+1)); a frame that is not
listed has no box, and the measures skip it rather than invent one.

Format 2 (`python -m pipeline boxes import`, any tool that writes JSON):

    {"format": 2,
     "videos": {"Basketball/v_Basketball_g01_c01.avi": {"size": [320, 240],
                                                        "frames": {"12": [[x0, y0, x1, y1]],
                                                                   "13": [[x0, y0, x1, y1], [x0, y0, x1, y1]]}}}}

* keys of "videos": the cache's video keys (paths relative to the dataset root);
* "size" [width, height] (optional): the frame size the boxes are given in, when the annotation was made at
  another resolution than the stored video (UCF101-24's and JHMDB's are 320 x 240); boxes are scaled from it
  to the clip's own height and width (the cache records them per clip) when read with `VideoBoxes.at`.
  Without it the boxes are in the pixels of the video's own frames;
* "frames": decoded frame number (a string, as JSON keys are) -> a list of boxes; frames absent have none.

Format 1 (synth's `boxes.json`, still read): {"format": 1, "videos": {key: [[x0, y0, x1, y1], ...]}}, one box a
decoded frame, every frame, in the video's own pixels; a frame past the last box takes the last box (a decoder
that saw one frame more than was written).

A file that is not one of these is a BoxesError (a ValueError, and a UserError the CLI shows as one line) naming
the file and what is wrong.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.errors import UserError

BOXES_FILE = "boxes.json"
DENSE_FORMAT = 1  # one box every frame (synth)
FORMAT = 2  # zero, one or several boxes a frame
_NO_BOXES = np.zeros((0, 4), np.float32)


class BoxesError(UserError, ValueError):
    """A boxes file (or an annotation file being imported) that cannot be read; one line naming it."""


@dataclass(frozen=True)
class VideoBoxes:
    """The boxes of one video: decoded frame -> (K, 4) float32 [x0, y0, x1, y1], K >= 1; no entry, no box."""

    frames: dict[int, np.ndarray] = field(default_factory=dict)
    size: tuple[float, float] | None = None  # (width, height) the boxes are in; None: the video's own frames
    hold_last: bool = False  # format 1: a frame past the last box takes the last box

    @classmethod
    def dense(cls, boxes: np.ndarray) -> "VideoBoxes":
        """Format 1's one box a frame: (N, 4) -> frames 0..N-1, a frame past the end taking the last box."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        return cls({i: boxes[i:i + 1] for i in range(len(boxes))}, None, True)

    @classmethod
    def of(cls, value: "VideoBoxes | np.ndarray") -> "VideoBoxes":
        """`value` itself, or a plain (N, 4) array of one box a frame read as format 1."""
        return value if isinstance(value, VideoBoxes) else cls.dense(value)

    def __len__(self) -> int:
        """Frames with at least one box."""
        return len(self.frames)

    def at(self, frame_index: np.ndarray, height: float | None = None, width: float | None = None) -> list[np.ndarray]:
        """The boxes of each frame in `frame_index` (T,), each (K_t, 4) float32, K_t = 0 where there is none,
        scaled from `size` to a `height` x `width` frame when both are known."""
        last = max(self.frames) if self.frames else -1
        scale = None
        if self.size is not None and height is not None and width is not None:
            scale = np.array([width / self.size[0], height / self.size[1]] * 2, np.float32)
        out = []
        for f in np.asarray(frame_index).reshape(-1):
            f = int(f)
            boxes = self.frames.get(min(f, last) if self.hold_last else f, _NO_BOXES)
            out.append(boxes * scale if scale is not None and len(boxes) else boxes)
        return out


# --- reading -------------------------------------------------------------------------------------------------


def read_boxes_file(path: str | Path) -> dict[str, VideoBoxes]:
    """{video key: VideoBoxes} from a boxes file of format 1 or 2; BoxesError in one line when it is not one."""
    data = _load(path)
    if data.get("format") == DENSE_FORMAT:
        return {key: VideoBoxes.dense(value) for key, value in _dense(path, data).items()}
    if data.get("format") != FORMAT:
        raise BoxesError(f"{path}: not a valid boxes file (format {data.get('format')!r}, expected {DENSE_FORMAT} "
                         f"or {FORMAT})")
    videos = data.get("videos")
    if not isinstance(videos, dict):
        raise BoxesError(f"{path}: not a valid boxes file (\"videos\" is not a mapping of video keys)")
    return {str(key): _video(path, str(key), entry) for key, entry in videos.items()}


def read_dense(path: str | Path) -> dict[str, np.ndarray]:
    """Format 1 as written: {key: (N, 4) float32}, one box a frame (synth's own file; tools that want arrays)."""
    data = _load(path)
    if data.get("format") != DENSE_FORMAT:
        raise BoxesError(f"{path}: not a valid boxes file (format {data.get('format')!r}, expected {DENSE_FORMAT}: "
                         "one box a frame)")
    return _dense(path, data)


def _load(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise BoxesError(f"{path}: cannot read the boxes file ({exc.__class__.__name__})") from None
    except ValueError as exc:
        raise BoxesError(f"{path}: not a valid boxes file (not JSON: {str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise BoxesError(f"{path}: not a valid boxes file (expected a JSON object with \"format\" and \"videos\")")
    return data


def _dense(path: str | Path, data: dict[str, Any]) -> dict[str, np.ndarray]:
    try:
        out = {str(key): np.asarray(value, dtype=np.float32) for key, value in data["videos"].items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BoxesError(f"{path}: not a valid boxes file ({exc.__class__.__name__}: {exc})") from None
    bad = [key for key, value in out.items() if value.ndim != 2 or value.shape[1] != 4]
    if bad:
        raise BoxesError(f"{path}: boxes of '{bad[0]}' are not a list of [x0, y0, x1, y1]")
    return out


def _video(path: str | Path, key: str, entry: Any) -> VideoBoxes:
    where = f"{path}: video '{key}'"
    if not isinstance(entry, dict) or not isinstance(entry.get("frames", {}), dict):
        raise BoxesError(f"{where}: expected {{\"frames\": {{frame: [[x0, y0, x1, y1], ...]}}}}")
    size = entry.get("size")
    if size is not None:
        if not (isinstance(size, list) and len(size) == 2 and all(_number(v) and v > 0 for v in size)):
            raise BoxesError(f"{where}: \"size\" must be [width, height] in pixels, got {size!r}")
        size = (float(size[0]), float(size[1]))
    frames: dict[int, np.ndarray] = {}
    for name, boxes in entry.get("frames", {}).items():
        if not (isinstance(name, str) and name.isdigit()):
            raise BoxesError(f"{where}: frame {name!r} is not a frame number (0, 1, ...)")
        if not (isinstance(boxes, list) and all(isinstance(b, list) and len(b) == 4 and all(map(_number, b))
                                                for b in boxes)):
            raise BoxesError(f"{where} frame {name}: boxes must be a list of [x0, y0, x1, y1]")
        array = np.asarray(boxes, np.float32).reshape(-1, 4)
        if ((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1])).any():
            raise BoxesError(f"{where} frame {name}: a box with x1 < x0 or y1 < y0")
        if len(array):
            frames[int(name)] = array
    return VideoBoxes(dict(sorted(frames.items())), size)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- writing -------------------------------------------------------------------------------------------------


def boxes_json(videos: Mapping[str, VideoBoxes]) -> str:
    """Format 2 as compact JSON text, keys sorted, coordinates in 0.01 px steps."""
    out = {}
    for key in sorted(videos):
        vb = videos[key]
        entry: dict[str, Any] = {}
        if vb.size is not None:
            entry["size"] = [_round(v) for v in vb.size]
        entry["frames"] = {str(f): np.round(np.asarray(b, np.float64), 2).tolist()
                           for f, b in sorted(vb.frames.items()) if len(b)}
        out[key] = entry
    return json.dumps({"format": FORMAT, "videos": out}, separators=(",", ":"))


def write_boxes_file(path: str | Path, videos: Mapping[str, VideoBoxes]) -> Path:
    """Write `videos` to `path` as format 2 (atomically: a reader never sees half a file)."""
    from pipeline.files import write_text_atomic

    return write_text_atomic(path, boxes_json(videos))


def write_dense(path: str | Path, boxes: Mapping[str, np.ndarray]) -> Path:
    """Format 1: {key: (N, 4)} one box a frame, 0.01 px steps (synth's boxes.json)."""
    videos = {key: np.round(np.asarray(value, dtype=np.float64), 2).tolist() for key, value in sorted(boxes.items())}
    Path(path).write_text(json.dumps({"format": DENSE_FORMAT, "videos": videos}, separators=(",", ":")))
    return Path(path)


def _round(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(float(value), 2)
