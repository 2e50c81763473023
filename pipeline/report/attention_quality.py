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
the head learnt where actors usually are, not where this one is.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class ClipAttention:
    """Per-frame figures of one clip, (T,) each."""

    mass: np.ndarray
    mass_uniform: np.ndarray
    pointing: np.ndarray
    pointing_uniform: np.ndarray
    mass_centre: np.ndarray
    pointing_centre: np.ndarray


def score_clip(attention: np.ndarray, boxes: np.ndarray, height: float, width: float) -> ClipAttention:
    """attention (T, h, w) of one clip against its actor boxes (T, 4) at the sampled frames."""
    t, h, w = attention.shape
    cover = box_cover(boxes, height, width, (h, w))  # (T, h, w)
    inside = centres_in_box(boxes, height, width, (h, w))  # (T, h, w)
    flat = attention.reshape(t, -1)
    best = flat.argmax(axis=1)  # (T,)
    prior = centre_prior(height, width, (h, w))  # (h, w)
    centre = int(prior.argmax())  # the cell nearest the centre (the first of equals on an even grid)
    return ClipAttention(
        mass=(attention * cover).sum(axis=(1, 2)),
        mass_uniform=cover.mean(axis=(1, 2)),
        pointing=inside.reshape(t, -1)[np.arange(t), best].astype(np.float64),
        pointing_uniform=inside.mean(axis=(1, 2)),
        mass_centre=(prior[None] * cover).sum(axis=(1, 2)),
        pointing_centre=inside.reshape(t, -1)[:, centre].astype(np.float64),
    )
