"""Attention measured against ground-truth boxes, not eyeballed.

The h x w attention grid covers the whole frame (frames are resized whole, never cropped), so cell (i, j)
spans x in [j W/w, (j+1) W/w) and y in [i H/h, (i+1) H/h) of the stored frame. For each sampled frame:

* mass in box: sum over cells of A_ij times the fraction of cell ij inside the box. With uniform attention
  this is exactly the box's share of the frame, the baseline it is reported beside.
* pointing: whether the centre of the argmax cell lies inside the box. Its uniform baseline is the share
  of cell centres inside the box (the chance a randomly chosen cell points right).
* entropy: -sum A log A in nats; a uniform map has log(h w), the most there can be.

Each figure is reported beside two maps that know nothing of the clip: uniform attention, and a centre
prior (a Gaussian at the frame's centre, sigma a quarter of the short side), the map a sceptic expects a
head to learn when actors tend to be near the middle. Beating uniform but not the centre prior would say
the head learnt where actors usually are, not where this one is. A third baseline, when given, is the motion
map M~_t of the cached features (pipeline/features/motion.py): what a frame difference gives for free, so a
learned map is worth showing only where it beats it.

Real boxes are sparse and plural (pipeline/video/boxes.py): a frame without a box is not scored (it is counted),
and with several boxes "in the box" means in any of them: a cell's covered fraction is that of the boxes' union
(a cell two boxes share is never counted twice), and pointing hits when the argmax cell's centre is in any box.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _interval_overlap(lo: np.ndarray, hi: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Fraction of each cell [edges[k], edges[k+1]) covered by [lo, hi]: (T, cells)."""
    left = np.maximum(lo[:, None], edges[None, :-1])
    right = np.minimum(hi[:, None], edges[None, 1:])
    return np.clip(right - left, 0.0, None) / np.diff(edges)[None, :]


def box_cover(boxes: np.ndarray, height: float, width: float, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of every grid cell inside the box, per frame: boxes (T, 4) -> (T, h, w) in [0, 1]."""
    h, w = grid
    fy = _interval_overlap(boxes[:, 1], boxes[:, 3], np.linspace(0.0, height, h + 1))  # (T, h)
    fx = _interval_overlap(boxes[:, 0], boxes[:, 2], np.linspace(0.0, width, w + 1))  # (T, w)
    return fy[:, :, None] * fx[:, None, :]


def centres_in_box(boxes: np.ndarray, height: float, width: float, grid: tuple[int, int]) -> np.ndarray:
    """Whether each cell's centre lies inside the box, per frame: (T, h, w) bool."""
    h, w = grid
    cy = (np.arange(h) + 0.5) * height / h
    cx = (np.arange(w) + 0.5) * width / w
    in_y = (cy[None, :] >= boxes[:, 1:2]) & (cy[None, :] <= boxes[:, 3:4])  # (T, h)
    in_x = (cx[None, :] >= boxes[:, 0:1]) & (cx[None, :] <= boxes[:, 2:3])  # (T, w)
    return in_y[:, :, None] & in_x[:, None, :]


def boxes_at(boxes: np.ndarray, frame_index: np.ndarray) -> np.ndarray:
    """The boxes (T, 4) of the very frames whose features were cached, from a clip's per-frame boxes (N, 4).

    An index past the last box (a decoder that saw more frames than were written) takes the last box.
    """
    return boxes[np.clip(frame_index, 0, len(boxes) - 1)]


def entropy(attention: np.ndarray) -> np.ndarray:
    """Entropy in nats of each map: (..., h, w) -> (...)."""
    a = attention.reshape(*attention.shape[:-2], -1).astype(np.float64)
    return -(a * np.log(np.clip(a, 1e-12, None))).sum(axis=-1)


def centre_prior(height: float, width: float, grid: tuple[int, int]) -> np.ndarray:
    """A Gaussian at the frame's centre (sigma = a quarter of the short side) over the cells, summing to 1: (h, w)."""
    h, w = grid
    cy = (np.arange(h) + 0.5) * height / h - height / 2
    cx = (np.arange(w) + 0.5) * width / w - width / 2
    sigma = min(height, width) / 4
    prior = np.exp(-(cy[:, None] ** 2 + cx[None, :] ** 2) / (2 * sigma ** 2))
    return prior / prior.sum()


def union_cover(boxes: Sequence[np.ndarray], height: float, width: float, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of every grid cell inside the union of each frame's boxes: T frames of (K_t, 4), K_t >= 1 ->
    (T, h, w) in [0, 1]. One box a frame is box_cover; several are cut along every box and cell edge into
    pieces, each wholly inside or outside the union, whose areas are summed per cell."""
    h, w = grid
    out = np.zeros((len(boxes), h, w))
    single = [t for t, b in enumerate(boxes) if len(b) == 1]
    if single:
        out[single] = box_cover(np.concatenate([boxes[t] for t in single]).astype(np.float64), height, width, grid)
    for t, b in enumerate(boxes):
        if len(b) > 1:
            out[t] = _union_of(np.asarray(b, np.float64), height, width, grid)
    return out


def _union_of(boxes: np.ndarray, height: float, width: float, grid: tuple[int, int]) -> np.ndarray:
    """(K, 4) boxes of one frame -> (h, w) fraction of each cell inside any of them."""
    h, w = grid
    ys = np.unique(np.clip(np.concatenate([np.linspace(0.0, height, h + 1), boxes[:, 1], boxes[:, 3]]), 0, height))
    xs = np.unique(np.clip(np.concatenate([np.linspace(0.0, width, w + 1), boxes[:, 0], boxes[:, 2]]), 0, width))
    my, mx = (ys[:-1] + ys[1:]) / 2, (xs[:-1] + xs[1:]) / 2  # piece centres: (Y,), (X,)
    inside = ((boxes[:, None, None, 1] <= my[None, :, None]) & (my[None, :, None] <= boxes[:, None, None, 3])
              & (boxes[:, None, None, 0] <= mx[None, None, :]) & (mx[None, None, :] <= boxes[:, None, None, 2]))
    area = np.diff(ys)[:, None] * np.diff(xs)[None, :] * inside.any(axis=0)  # (Y, X) covered area of each piece
    iy = np.minimum((my * h / height).astype(int), h - 1)  # the cell row of each piece
    ix = np.minimum((mx * w / width).astype(int), w - 1)
    cell = np.zeros((h, w))
    np.add.at(cell, (iy[:, None].repeat(len(ix), 1), ix[None, :].repeat(len(iy), 0)), area)
    return cell / ((height / h) * (width / w))


def centres_in_any(boxes: Sequence[np.ndarray], height: float, width: float, grid: tuple[int, int]) -> np.ndarray:
    """Whether each cell's centre lies inside any of the frame's boxes: T frames of (K_t, 4) -> (T, h, w) bool."""
    h, w = grid
    out = np.zeros((len(boxes), h, w), bool)
    counts = [len(b) for b in boxes]
    if sum(counts):
        frame = np.repeat(np.arange(len(boxes)), counts)  # (sum K,) the frame of every box
        np.logical_or.at(out, frame, centres_in_box(np.concatenate(boxes), height, width, grid))
    return out


def per_frame(boxes: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """The boxes of each frame as (K_t, 4): from one box a frame (T, 4), or from T arrays of any number."""
    if isinstance(boxes, np.ndarray) and boxes.ndim == 2:
        return [boxes[t:t + 1] for t in range(len(boxes))]
    return [np.asarray(b, np.float64).reshape(-1, 4) for b in boxes]


@dataclass
class ClipAttention:
    """Per-frame figures of one clip over its frames with a box, (T',) each; the motion map's when given."""

    mass: np.ndarray
    mass_uniform: np.ndarray
    pointing: np.ndarray
    pointing_uniform: np.ndarray
    mass_centre: np.ndarray
    pointing_centre: np.ndarray
    mass_motion: np.ndarray | None = None
    pointing_motion: np.ndarray | None = None
    frames_without_box: int = 0  # sampled frames not scored: no box there

    @property
    def frames_scored(self) -> int:
        return len(self.mass)


def score_clip(attention: np.ndarray, boxes: np.ndarray | Sequence[np.ndarray], height: float, width: float,
               motion: np.ndarray | None = None) -> ClipAttention:
    """attention (T, h, w) of one clip against its boxes at the sampled frames: (T, 4), one a frame, or T
    arrays (K_t, 4) of any number (0: the frame is skipped and counted); motion (T, h, w), the motion map."""
    boxes = per_frame(boxes)
    keep = np.array([len(b) > 0 for b in boxes], bool)  # (T,)
    boxes = [b for b in boxes if len(b)]
    attention = attention[keep]
    t, h, w = attention.shape
    cover = union_cover(boxes, height, width, (h, w))  # (T', h, w)
    inside = centres_in_any(boxes, height, width, (h, w))  # (T', h, w)
    flat_inside = inside.reshape(t, h * w)
    prior = centre_prior(height, width, (h, w))  # (h, w)
    centre = int(prior.argmax())  # the cell nearest the centre (the first of equals on an even grid)

    def pointing(maps: np.ndarray) -> np.ndarray:  # (T', h, w) -> (T',): argmax cell's centre in a box
        return flat_inside[np.arange(t), maps.reshape(t, h * w).argmax(axis=1)].astype(np.float64)

    score = ClipAttention(
        mass=(attention * cover).sum(axis=(1, 2)),
        mass_uniform=cover.mean(axis=(1, 2)),
        pointing=pointing(attention),
        pointing_uniform=inside.mean(axis=(1, 2)),
        mass_centre=(prior[None] * cover).sum(axis=(1, 2)),
        pointing_centre=flat_inside[:, centre].astype(np.float64),
        frames_without_box=int((~keep).sum()),
    )
    if motion is not None:
        motion = motion[keep]
        score.mass_motion, score.pointing_motion = (motion * cover).sum(axis=(1, 2)), pointing(motion)
    return score
