"""Real ground-truth boxes from the annotation files datasets ship, as boxes files' VideoBoxes
(pipeline/video/boxes.py).

Localisation on real video needs real boxes, and the datasets that have them each spell them their own way:

* UCF101-24 `pyannot.pkl` (gurkirt/corrected-UCF101-Annots): {video: {"numf", "label", "annotations":
  [{"sf", "ef", "label", "boxes"}, ...]}}, one annotation per actor (a tube); `boxes` an (ef - sf) x 4 int
  array of x, y, w, h in 320 x 240 pixels for frames sf..ef-1, 0-based. Written by Python 2, so read with
  encoding latin1 and, being a pickle, through an allow-list that builds numpy arrays and plain containers
  only and never runs code (pipeline/numpy_pickle.py, the one the weights use).
* UCF101-24 `finalAnnots.mat`: the same tubes as MATLAB saved them, a 1 x N struct array `annot` with fields
  num_imgs, name, tubes; each tube (1 x K struct) with ef, sf, class (or label) and boxes (one row x, y, w, h
  a frame). MATLAB counts from 1: row k is frame sf - 1 + k, 0-based (ef, its last frame, is not needed).
* JHMDB `joint_positions/<class>/<clip>/joint_positions.mat`: `pos_img`, 2 x 15 x T joint positions (x, y)
  per frame in the 320 x 240 frame's pixels. A person box is their extent widened by `margin` (10% of its
  width and height on each side by default: joints are centres, the head and hands reach past them),
  clipped to the frame.

Coordinates are kept as given (MATLAB's 1-based pixels are at most one pixel off ours, well inside a cell);
each video records the frame size they are in, and readers scale to the clip's own frames. A video's name
("Basketball/v_Basketball_g01_c01", "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0") is matched to the
cache's keys by `match_keys`. Anything unreadable is a BoxesError naming the file and what is wrong.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.errors import describe
from pipeline.numpy_pickle import unpickle_numpy
from pipeline.video.boxes import BoxesError, VideoBoxes

UCF24_SIZE = (320.0, 240.0)  # (width, height) UCF101-24's boxes are given in
JHMDB_SIZE = (320.0, 240.0)
MARGIN = 0.1  # JHMDB: a person box is the joints' extent widened by this share of it on each side
KINDS = ("ucf24-pkl", "ucf24-mat", "jhmdb")


def read_annotations(kind: str, source: str | Path, size: tuple[float, float] | None = None,
                     margin: float = MARGIN) -> dict[str, VideoBoxes]:
    """{video name: VideoBoxes} from `source` read as `kind` (one of KINDS); `size` (width, height) overrides
    the frame size the annotations are given in."""
    if kind == "ucf24-pkl":
        return read_ucf24_pkl(source, size or UCF24_SIZE)
    if kind == "ucf24-mat":
        return read_ucf24_mat(source, size or UCF24_SIZE)
    if kind == "jhmdb":
        return read_jhmdb(source, size or JHMDB_SIZE, margin)
    raise BoxesError(f"unknown annotation kind {kind!r}: choose {', '.join(KINDS)}")


def from_tubes(tubes: Iterable[tuple[int, Any]], size: tuple[float, float], where: str) -> VideoBoxes:
    """VideoBoxes from tubes (first frame 0-based, boxes (n, 4) x, y, w, h one row a frame from there); a frame
    two tubes cover holds both boxes."""
    frames: dict[int, list[np.ndarray]] = {}
    for start, boxes in tubes:
        try:
            xywh = np.asarray(boxes, np.float64)
        except (TypeError, ValueError):
            raise BoxesError(f"{where}: boxes are not rows of x, y, w, h") from None
        if xywh.size == 0:
            continue
        xywh = xywh.reshape(-1, 4) if xywh.ndim == 1 and xywh.size == 4 else xywh  # one row, squeezed by MATLAB
        if xywh.ndim != 2 or xywh.shape[1] != 4 or not np.isfinite(xywh).all():
            raise BoxesError(f"{where}: boxes are not rows of x, y, w, h (shape {xywh.shape})")
        if (xywh[:, 2:] < 0).any():
            raise BoxesError(f"{where}: a box of negative width or height")
        if start < 0:
            raise BoxesError(f"{where}: a tube starting at frame {start}")
        for k, (x, y, w, h) in enumerate(xywh):
            frames.setdefault(start + k, []).append(np.array([x, y, x + w, y + h], np.float32))
    return VideoBoxes({f: np.stack(b) for f, b in sorted(frames.items())}, size)


# --- UCF101-24 ---------------------------------------------------------------------------------------------


def read_ucf24_pkl(path: str | Path, size: tuple[float, float] = UCF24_SIZE) -> dict[str, VideoBoxes]:
    data = _unpickle(path)
    if not isinstance(data, dict):
        raise BoxesError(f"{path}: expected a mapping of videos to their annotations, got {type(data).__name__}")
    out = {}
    for name, video in data.items():
        where = f"{path}: video '{name}'"
        annotations = video.get("annotations") if isinstance(video, dict) else None
        if not isinstance(annotations, (list, tuple)):
            raise BoxesError(f"{where}: no 'annotations' list")
        if not all(isinstance(a, dict) and "sf" in a and "boxes" in a for a in annotations):
            raise BoxesError(f"{where}: an annotation without 'sf' and 'boxes'")
        out[str(name)] = from_tubes(((_int(a["sf"], where), a["boxes"]) for a in annotations), size, where)
    return out


def _unpickle(path: str | Path) -> Any:
    """The pickle's content, built through the project's one allow-list (numpy arrays, dtypes, containers:
    pipeline/numpy_pickle.py); UCF101-24's file was written by Python 2, so its str instances read as latin1."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BoxesError(f"{path}: cannot read it ({describe(exc)})") from None
    return unpickle_numpy(data, BoxesError, f"{path}: the pickle", encoding="latin1")


def read_ucf24_mat(path: str | Path, size: tuple[float, float] = UCF24_SIZE) -> dict[str, VideoBoxes]:
    annot = _loadmat(path, simplify_cells=True).get("annot")
    if annot is None:
        raise BoxesError(f"{path}: no 'annot' struct array (UCF101-24's finalAnnots.mat has one)")
    out = {}
    for i, video in enumerate(_items(annot)):
        if not isinstance(video, dict) or "name" not in video:
            raise BoxesError(f"{path}: annot({i + 1}) has no 'name'")
        name = str(video["name"]).strip()
        where = f"{path}: video '{name}'"
        tubes = [t for t in _items(video.get("tubes")) if not (isinstance(t, dict) and not t)]  # [] = no tube
        if not all(isinstance(t, dict) and "sf" in t and "boxes" in t for t in tubes):
            raise BoxesError(f"{where}: a tube without 'sf' and 'boxes'")
        out[name] = from_tubes(((_int(t["sf"], where) - 1, t["boxes"]) for t in tubes), size, where)
    return out


# --- JHMDB -------------------------------------------------------------------------------------------------


def read_jhmdb(root: str | Path, size: tuple[float, float] = JHMDB_SIZE,
               margin: float = MARGIN) -> dict[str, VideoBoxes]:
    """Every <class>/<clip>/joint_positions.mat under `root` (JHMDB's joint_positions folder)."""
    root = Path(root)
    if not root.is_dir():
        raise BoxesError(f"{root}: not a folder (JHMDB's joint_positions/<class>/<clip>/joint_positions.mat)")
    files = sorted(root.rglob("joint_positions.mat"))
    if not files:
        raise BoxesError(f"{root}: no <class>/<clip>/joint_positions.mat under it")
    out = {}
    for path in files:
        pos = _loadmat(path).get("pos_img")
        pos = np.asarray(pos, np.float64) if isinstance(pos, np.ndarray) and pos.dtype.kind in "iuf" else None
        if pos is None or pos.ndim != 3 or pos.shape[0] != 2:
            raise BoxesError(f"{path}: no 'pos_img' array of 2 x joints x frames")
        out[f"{path.parent.parent.name}/{path.parent.name}"] = joint_boxes(pos, size, margin)
    return out


def joint_boxes(pos: np.ndarray, size: tuple[float, float], margin: float = MARGIN) -> VideoBoxes:
    """The person box of every frame from its joints, pos (2, J, T) x and y in pixels: their extent, widened by
    `margin` of it on each side and clipped to the `size` (width, height) frame; a frame without joints has none."""
    x, y = pos[0], pos[1]  # (J, T) each
    ok = np.isfinite(x).all(axis=0) & np.isfinite(y).all(axis=0)  # (T,)
    x0, x1, y0, y1 = x.min(axis=0), x.max(axis=0), y.min(axis=0), y.max(axis=0)  # (T,) each
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    boxes = np.stack([np.clip(x0 - mx, 0, size[0]), np.clip(y0 - my, 0, size[1]),
                      np.clip(x1 + mx, 0, size[0]), np.clip(y1 + my, 0, size[1])], axis=1)  # (T, 4)
    return VideoBoxes({t: boxes[t:t + 1].astype(np.float32) for t in range(len(boxes)) if ok[t]}, size)


# --- names -> the cache's keys -----------------------------------------------------------------------------


def match_keys(named: dict[str, VideoBoxes], keys: Sequence[str] | None, ext: str | None
               ) -> tuple[dict[str, VideoBoxes], list[str]]:
    """({cache key: boxes}, names matched to no key). With `keys` (the videos found under the dataset root),
    a name "<class>/<clip>" is the key of the same path without its extension ("<class>/<clip>.avi"; name +
    `ext` first when several), else the one key whose file stem is <clip>. Without keys, the key is name + ext."""
    if keys is None:
        return {name + (ext or ""): boxes for name, boxes in named.items()}, []
    known = set(keys)
    by_path: dict[str, list[str]] = {}
    by_stem: dict[str, list[str]] = {}
    for key in keys:
        bare = PurePosixPath(key).with_suffix("").as_posix()
        by_path.setdefault(bare, []).append(key)
        by_stem.setdefault(PurePosixPath(bare).name, []).append(key)
    matched, unmatched = {}, []
    for name, boxes in named.items():
        candidates = by_path.get(name) or by_stem.get(PurePosixPath(name).name) or []
        if ext and name + ext in known:
            matched[name + ext] = boxes
        elif len(candidates) == 1:
            matched[candidates[0]] = boxes
        else:
            unmatched.append(name)
    return matched, unmatched


# --- helpers -----------------------------------------------------------------------------------------------


def _loadmat(path: Path | str, **options: Any) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise BoxesError("reading .mat annotations needs scipy (pip install scipy)") from None
    if not Path(path).is_file():
        raise BoxesError(f"{path}: no such file")
    try:
        return loadmat(str(path), **options)
    except Exception as exc:  # scipy raises ValueError, MatReadError, NotImplementedError (v7.3 files), ...
        raise BoxesError(f"{path}: not a MATLAB file scipy can read ({describe(exc)})") from None


def _items(value: Any) -> list[Any]:
    """A MATLAB array of structs as a list: loadmat(simplify_cells) gives a dict for one, a list or an object
    array for several, nothing for none."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    if isinstance(value, np.ndarray):
        return list(value.reshape(-1))
    return list(value)


def _int(value: Any, where: str) -> int:
    try:
        number = float(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        raise BoxesError(f"{where}: frame number {value!r} is not a number") from None
    if not number.is_integer():
        raise BoxesError(f"{where}: frame number {value!r} is not a whole number")
    return int(number)
