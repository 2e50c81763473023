"""The embedded default dataset: real encoded videos whose class is the MOTION of one actor.

Every clip shows the same actor (a disc split into an orange and a magenta half, with rings and a dark
rim) over a random textured background, with 2-3 distractors (squares, triangles in other colours) that
drift and bounce at random. The actor travels in a straight line at a steady speed; the class is its
heading, one of eight compass directions (y points down: `up` is towards the top of the picture). Its
size, orientation, spin, start and travel are drawn the same way for every class, so each frame on its own
looks alike whatever the class: a model that pools frames over space and time without memory (the `mean`
baseline) sits near chance, while the way the actor moves from frame to frame tells the class.

Per-frame boxes of the actor, `[x0, y0, x1, y1]` in pixels of the stored frame (pixel i spans [i, i+1)),
are written to `root/boxes.json` (format 1 of pipeline/video/boxes.py: one box every frame) so attention
can be scored against a right answer.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.config import SynthConfig
from pipeline.video.boxes import BOXES_FILE, read_dense, write_dense
from pipeline.video.encode import Encoding, write_video

GENERATOR_VERSION = 3  # bump when a change here or in the encoding changes the files or boxes of a given seed


@dataclass(frozen=True)
class Motion:
    """One class: the actor's heading, a unit step (dx, dy) in picture coordinates (y points down)."""

    dx: float
    dy: float


_DIAGONAL = math.sqrt(0.5)
# The classes, as data: each is one heading of the same actor.
MOTIONS: dict[str, Motion] = {
    "move_right": Motion(1.0, 0.0),
    "move_down_right": Motion(_DIAGONAL, _DIAGONAL),
    "move_down": Motion(0.0, 1.0),
    "move_down_left": Motion(-_DIAGONAL, _DIAGONAL),
    "move_left": Motion(-1.0, 0.0),
    "move_up_left": Motion(-_DIAGONAL, -_DIAGONAL),
    "move_up": Motion(0.0, -1.0),
    "move_up_right": Motion(_DIAGONAL, -_DIAGONAL),
}
CLASSES: tuple[str, ...] = tuple(MOTIONS)

# Clips rotate through these so the default run exercises the decoding cases users meet; clip i of every
# class gets the same one, so the codec never hints at the class.
SYNTH_ENCODINGS: tuple[Encoding, ...] = (
    Encoding("mpeg4", "avi", bframes=2),  # like HMDB-51
    Encoding("libx264", "mp4", bframes=2),
    Encoding("libx264", "avi", bframes=0),
    Encoding("mpeg4", "mkv", bframes=2),
)

ACTOR_COLOURS = np.array([(255, 140, 0), (225, 20, 130)], dtype=np.float32)  # orange, magenta: red-dominant
DISTRACTOR_COLOURS = np.array([(60, 200, 90), (70, 120, 235), (60, 200, 210), (235, 235, 235)], dtype=np.float32)
NOISE_LEVEL = 4  # uniform luma grain in [-4, 4] grey levels (drawn as int8: fast)
MARGIN = 1.0  # pixels between the actor's box and the frame edge


@dataclass
class SynthSummary:
    """What `generate_dataset` wrote: clips and codec labels per class, file count, wall time."""

    root: Path
    counts: dict[str, int] = field(default_factory=dict)
    codecs: dict[str, dict[str, int]] = field(default_factory=dict)
    files: int = 0
    seconds: float = 0.0
    reused: bool = False  # set by the stage when an identical dataset was already there


# --- the actor's path -------------------------------------------------------------------------------------

def actor_path(motion: Motion, rng: np.random.Generator, frames: int, height: int, width: int) -> np.ndarray:
    """Per-frame (cx, cy, radius, angle) of the actor, (T, 4); it stays inside the frame throughout.

    The travel (55-75% of the short side, less only where a tiny frame has no room for it) and the radius
    are drawn alike for every heading; the start is uniform over the places from which that travel stays
    inside the frame. The actor also spins on itself by a random amount either way, unrelated to the class.
    """
    short = min(height, width)
    radius = rng.uniform(0.16, 0.22) * short / 2
    lo, hi_x, hi_y = radius + MARGIN, width - radius - MARGIN, height - radius - MARGIN
    room = min((hi_x - lo) / abs(motion.dx) if motion.dx else math.inf,
               (hi_y - lo) / abs(motion.dy) if motion.dy else math.inf)
    travel = min(rng.uniform(0.55, 0.75) * short, room * (1 - 1e-9))  # the slack absorbs rounding
    ex, ey = travel * motion.dx, travel * motion.dy  # the whole displacement
    x0 = rng.uniform(lo - min(ex, 0.0), hi_x - max(ex, 0.0))
    y0 = rng.uniform(lo - min(ey, 0.0), hi_y - max(ey, 0.0))
    u = np.linspace(0.0, 1.0, frames, dtype=np.float64)  # (T,) progress through the clip
    spin = rng.choice((-1.0, 1.0)) * rng.uniform(0.25 * math.pi, math.pi)
    angle = rng.uniform(0, 2 * math.pi) + spin * u
    return np.stack([x0 + ex * u, y0 + ey * u, np.full_like(u, radius), angle], axis=1)


def path_boxes(path: np.ndarray) -> np.ndarray:
    """Actor boxes (T, 4) [x0, y0, x1, y1] from its path (T, 4)."""
    cx, cy, r = path[:, 0], path[:, 1], path[:, 2]
    return np.stack([cx - r, cy - r, cx + r, cy + r], axis=1).astype(np.float32)


# --- sprites, painted into all frames at once ---------------------------------------------------------------
# A shade maps shape-frame coordinates u, v (T, h, w) to coverage alpha (T, h, w) and colour (.., 3).

def _starts(centre: np.ndarray, size: int, extent: int) -> np.ndarray:
    """First pixel (T,) of a window of `size` around each centre (T,), kept inside [0, extent)."""
    return np.clip(np.floor(centre - size / 2).astype(np.intp), 0, extent - size)


def paint(video: np.ndarray, cx: np.ndarray, cy: np.ndarray, angle: np.ndarray, reach: float,
          shade: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    """Blend a shape centred at (cx, cy) (T,), turned by `angle` (T,), into `video` (T, H, W, 3) float32.

    `reach` bounds the shape's distance from its centre, in pixels; parts outside the frame are cut off.
    The shape is computed for all frames at once; only the window copies loop (slices beat fancy indexing).
    """
    _, height, width, _ = video.shape
    h, w = min(int(2 * reach) + 3, height), min(int(2 * reach) + 3, width)
    y0, x0 = _starts(cy, h, height), _starts(cx, w, width)  # (T,)
    dy = (y0[:, None] + np.arange(h) + 0.5 - cy[:, None]).astype(np.float32)[:, :, None]  # (T, h, 1)
    dx = (x0[:, None] + np.arange(w) + 0.5 - cx[:, None]).astype(np.float32)[:, None, :]  # (T, 1, w)
    cos = np.cos(angle).astype(np.float32)[:, None, None]  # (T, 1, 1)
    sin = np.sin(angle).astype(np.float32)[:, None, None]
    alpha, rgb = shade(dx * cos + dy * sin, dy * cos - dx * sin)  # (T, h, w), (T, h, w, 3) or (3,)
    windows = [(slice(y, y + h), slice(x, x + w)) for y, x in zip(y0, x0)]
    region = np.stack([frame[ys, xs] for frame, (ys, xs) in zip(video, windows)])  # (T, h, w, 3)
    for c in range(3):  # per channel: broadcasting over a trailing axis of 3 is ten times slower
        channel = region[..., c]
        channel += ((rgb[..., c] if rgb.ndim > 1 else rgb[c]) - channel) * alpha
    for frame, (ys, xs), patch in zip(video, windows, region):
        frame[ys, xs] = patch


def actor_shade(radius: np.ndarray) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The actor: orange/magenta halves (the split shows rotation), concentric rings, a dark rim."""
    r = radius[:, None, None].astype(np.float32)  # (T, 1, 1)

    def shade(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dist = np.sqrt(u * u + v * v)  # (T, h, w)
        alpha = np.clip(r - dist + 0.5, 0.0, 1.0)
        rings = 0.85 + 0.15 * np.cos(dist * (4 * math.pi) / np.maximum(r, 1.0))
        light = np.where(dist > 0.85 * r, 0.7 * rings, rings)
        rgb = np.empty(light.shape + (3,), dtype=np.float32)  # (T, h, w, 3)
        orange, magenta = ACTOR_COLOURS
        for c in range(3):
            np.multiply(light, np.where(v < 0, magenta[c], orange[c]), out=rgb[..., c])
        return alpha, rgb

    return shade


def square_shade(half: float, colour: np.ndarray) -> Callable:
    """A flat square of half-side `half`."""
    def shade(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.clip(half - np.maximum(np.abs(u), np.abs(v)) + 0.5, 0.0, 1.0), colour
    return shade


def triangle_shade(half: float, colour: np.ndarray) -> Callable:
    """A flat equilateral triangle with corners at `half`: the min of three half-planes at half/2."""
    normals = [(math.cos(a), math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]

    def shade(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inside = np.minimum.reduce([half / 2 - (u * c + v * s) for c, s in normals])  # (T, h, w)
        return np.clip(inside + 0.5, 0.0, 1.0), colour

    return shade


# --- backgrounds: muted (low saturation) so the coloured objects stand out ---------------------------------

def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    return (rng.uniform(70, 190) + rng.uniform(-18, 18, size=3)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-resolution random colours, bilinearly upsampled: (H, W, 3)."""
    gh, gw = rng.integers(3, 7, size=2)
    grid = np.stack([_muted_colour(rng) for _ in range(gh * gw)]).reshape(gh, gw, 3)
    wy = _linear_weights(height, gh)  # (H, gh)
    wx = _linear_weights(width, gw)  # (W, gw)
    rows = np.tensordot(wy, grid, axes=(1, 0))  # (H, gw, 3)
    return np.tensordot(rows, wx, axes=(1, 1)).transpose(0, 2, 1)  # (H, W, 3)


def _linear_weights(size: int, cells: int) -> np.ndarray:
    """(size, cells) matrix of linear-interpolation weights from `cells` knots to `size` pixels."""
    pos = np.linspace(0, cells - 1, size)
    return np.clip(1.0 - np.abs(pos[:, None] - np.arange(cells)[None, :]), 0.0, 1.0).astype(np.float32)


def _stripes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Soft sinusoidal stripes of two muted colours at a random angle and period: (H, W, 3)."""
    a, b = _muted_colour(rng), _muted_colour(rng)
    theta, period = rng.uniform(0, math.pi), rng.uniform(8, 30)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = 0.5 + 0.5 * np.sin((x * math.cos(theta) + y * math.sin(theta)) * (2 * math.pi / period) + rng.uniform(0, 6.3))
    return a + (b - a) * t[..., None]


def _gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Linear blend of two muted colours along a random direction: (H, W, 3)."""
    a, b = _muted_colour(rng), _muted_colour(rng)
    theta = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = x / width * math.cos(theta) + y / height * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return a + (b - a) * t[..., None]


BACKGROUNDS = (_smooth_noise, _stripes, _gradient)


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One random textured background (H, W, 3) float32."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return kind(rng, height, width).astype(np.float32)


# --- distractors -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Distractor:
    """A square or triangle that drifts in a random direction, bouncing off the frame edges, and spins."""

    shape: str  # square | triangle
    colour: np.ndarray  # (3,)
    half: float
    path: np.ndarray  # (T, 3): cx, cy, angle


def _bounce(start: float, velocity: float, lo: float, hi: float, steps: np.ndarray) -> np.ndarray:
    """Positions (T,) of a point moving at `velocity` per frame, reflected at `lo` and `hi`."""
    span = hi - lo
    m = np.mod(start - lo + velocity * steps, 2 * span)
    return lo + span - np.abs(m - span)


def random_distractor(rng: np.random.Generator, frames: int, height: int, width: int) -> Distractor:
    """One distractor whose travel over the clip (0.4-1.0 of the short side) matches the actor's."""
    short = min(height, width)
    half = rng.uniform(0.07, 0.12) * short
    shape = ("square", "triangle")[int(rng.integers(2))]
    colour = DISTRACTOR_COLOURS[int(rng.integers(len(DISTRACTOR_COLOURS)))]
    heading = rng.uniform(0, 2 * math.pi)
    speed = rng.uniform(0.4, 1.0) * short / max(frames - 1, 1)
    steps = np.arange(frames, dtype=np.float64)
    x0, y0 = rng.uniform(half, width - half), rng.uniform(half, height - half)
    cx = _bounce(x0, speed * math.cos(heading), half, width - half, steps)
    cy = _bounce(y0, speed * math.sin(heading), half, height - half, steps)
    angle = rng.uniform(0, 2 * math.pi) + rng.uniform(-math.pi, math.pi) * steps / max(frames - 1, 1)
    return Distractor(shape, colour, half, np.stack([cx, cy, angle], axis=1))


def paint_distractor(video: np.ndarray, d: Distractor) -> None:
    shade = square_shade(d.half, d.colour) if d.shape == "square" else triangle_shade(d.half * 1.3, d.colour)
    paint(video, d.path[:, 0], d.path[:, 1], d.path[:, 2], d.half * 1.5, shade)


def paint_actor(video: np.ndarray, path: np.ndarray) -> None:
    cx, cy, radius, angle = path.T
    paint(video, cx, cy, angle, float(radius.max()), actor_shade(radius))


# --- clips ---------------------------------------------------------------------------------------------

def generate_clip(cls_name: str, rng: np.random.Generator, frames: int, height: int, width: int,
                  distractors: bool = True, noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One clip of class `cls_name`: frames (T, H, W, 3) uint8 RGB and actor boxes (T, 4) float32.

    All random draws happen whatever `distractors`/`noise` say, so a clean render of the same rng shows
    the same actor on the same background (tests use it to check the boxes).
    """
    if cls_name not in MOTIONS:
        raise ValueError(f"unknown class '{cls_name}'; known: {', '.join(CLASSES)}")
    path = actor_path(MOTIONS[cls_name], rng, frames, height, width)  # (T, 4)
    base = background(rng, height, width)  # (H, W, 3)
    others = [random_distractor(rng, frames, height, width) for _ in range(int(rng.integers(2, 4)))]
    grain = rng.integers(-NOISE_LEVEL, NOISE_LEVEL + 1, size=(frames, height, width, 1), dtype=np.int8)

    video = np.empty((frames, height, width, 3), dtype=np.float32)
    np.add(base, np.repeat(grain, 3, axis=3) if noise else 0, out=video)  # (T, H, W, 3); repeat: see paint
    if distractors:
        for d in others:  # behind the actor, so the box always shows it
            paint_distractor(video, d)
    paint_actor(video, path)
    np.clip(video, 0, 255, out=video)
    return video.astype(np.uint8), path_boxes(path)


def clip_rng(seed: int, cls_name: str, index: int) -> np.random.Generator:
    """The generator for clip `index` of a class: independent of which other classes are generated."""
    return np.random.default_rng([seed, CLASSES.index(cls_name), index])


def clip_encoding(index: int) -> Encoding:
    return SYNTH_ENCODINGS[index % len(SYNTH_ENCODINGS)]


def clip_key(cls_name: str, index: int) -> str:
    """The video key (POSIX path relative to the root), e.g. 'move_left/clip_000.avi'."""
    return f"{cls_name}/clip_{index:03d}{clip_encoding(index).suffix}"


# --- datasets --------------------------------------------------------------------------------------------

def check_config(cfg: SynthConfig, classes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The classes to generate; a one-line ValueError for settings a user got wrong."""
    if cfg.width % 2 or cfg.height % 2:
        raise ValueError(f"synth width and height must be even (yuv420p), got {cfg.width}x{cfg.height}")
    if min(cfg.width, cfg.height) < 16:
        raise ValueError(f"synth frames must be at least 16x16, got {cfg.width}x{cfg.height}")
    if cfg.frames < 2 or cfg.clips_per_class < 1 or cfg.fps <= 0 or cfg.seed < 0:
        raise ValueError("synth needs frames >= 2, clips_per_class >= 1, fps > 0 and seed >= 0")
    chosen = tuple(classes) if classes else CLASSES
    unknown = [c for c in chosen if c not in MOTIONS]
    if unknown or len(set(chosen)) != len(chosen):
        raise ValueError(f"synth classes must be distinct names from: {', '.join(CLASSES)}; got {', '.join(chosen)}")
    return chosen


def write_clip(root: Path, cfg: SynthConfig, cls_name: str, index: int) -> tuple[str, Encoding, np.ndarray]:
    """Render and encode one clip; returns its key, encoding and actor boxes (T, 4)."""
    frames, boxes = generate_clip(cls_name, clip_rng(cfg.seed, cls_name, index), cfg.frames, cfg.height, cfg.width)
    key, enc = clip_key(cls_name, index), clip_encoding(index)
    write_video(root / key, frames, cfg.fps, enc)
    return key, enc, boxes


def generate_dataset(root: str | Path, cfg: SynthConfig, classes: Sequence[str] | None = None,
                     progress: Callable[[str], None] | None = None, workers: int | None = None) -> SynthSummary:
    """Write `root/<class>/clip_NNN.<ext>` for every class and `root/boxes.json`; `progress(key)` per clip.

    Clips are independent (own rng), so `workers` threads render and encode them in any order with the
    same result; numpy and the encoders release the GIL for the heavy parts. Default: up to 4 threads.
    """
    chosen = check_config(cfg, classes)
    root = Path(root)
    start = time.perf_counter()
    summary = SynthSummary(root=root, counts={c: 0 for c in chosen}, codecs={c: {} for c in chosen})
    boxes: dict[str, np.ndarray] = {}
    with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        futures = {pool.submit(write_clip, root, cfg, c, i): c for c in chosen for i in range(cfg.clips_per_class)}
        try:
            for future in as_completed(futures):
                key, enc, boxes[key] = future.result()
                cls_name = futures[future]
                summary.counts[cls_name] += 1
                summary.codecs[cls_name][enc.label] = summary.codecs[cls_name].get(enc.label, 0) + 1
                if progress is not None:
                    progress(key)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    write_boxes(root, boxes)
    summary.files = len(boxes)
    summary.seconds = time.perf_counter() - start
    return summary


def write_boxes(root: str | Path, boxes: dict[str, np.ndarray]) -> Path:
    """Write `root/boxes.json` ({"format": 1, "videos": {key: [[x0, y0, x1, y1], ...]}}), 0.01 px steps."""
    return write_dense(Path(root) / BOXES_FILE, boxes)


def read_boxes(root: str | Path) -> dict[str, np.ndarray]:
    """Per-video actor boxes (T, 4) float32 from `root/boxes.json`; {} when the dataset has none."""
    path = Path(root) / BOXES_FILE
    return read_boxes_file(path) if path.exists() else {}


def read_boxes_file(path: str | Path) -> dict[str, np.ndarray]:
    """Per-video boxes (T, 4) float32 from a format-1 boxes file; a ValueError in one line when it is not one."""
    return read_dense(path)
