"""Attention overlays: heatmaps blended over frames, the PNG strips and the GIFs (charts: charts.py).

Frames are resized *whole* (no crop) before the backbone, so an attention grid of h x w cells covers the
whole picture: cell (i, j) is the rectangle [j*W/w, (j+1)*W/w) x [i*H/h, (i+1)*H/h) of the frame, and
upsampling it bilinearly with half-pixel centres puts the heat where the features came from.

Images are drawn with numpy + PIL; only the colour map is matplotlib's (`COLOUR_MAP`, imported when the
first heatmap is coloured). Every file goes through the one atomic writer (`pipeline.files.atomic_path`):
readers never see half an image.
"""
from __future__ import annotations

import functools
import hashlib
import math
import re
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.files import atomic_path

MIN_DISPLAY_HEIGHT = 160  # frames smaller than this are upscaled (integer factor) to be readable
PAD = 6  # pixels between tiles
FONT_SIZE = 13
LINE = 17  # pixels per text line
TITLE_LINES = 2
TITLE_HEIGHT = TITLE_LINES * LINE + 6
LABEL_HEIGHT = LINE + 2  # the "frame N" line above each row of tiles
CAPTION_LINES = 2
CAPTION_HEIGHT = CAPTION_LINES * LINE + 6
LEGEND_HEIGHT = 2 * LINE + 14  # the colour bar under a strip, and its labels
BOX_COLOUR = (255, 255, 255)  # the ground-truth box outline
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --- colours and blending ----------------------------------------------------------------------------------


COLOUR_MAP = "jet"  # matplotlib's name: dark blue (cold) through cyan, green, yellow to dark red (hot)


@functools.lru_cache(maxsize=None)
def _colour_map():
    import matplotlib

    return matplotlib.colormaps[COLOUR_MAP]


def jet(values: np.ndarray) -> np.ndarray:
    """matplotlib's "jet" colour map (`COLOUR_MAP`): [0, 1] floats -> uint8 RGB (..., 3), blue (cold) to red
    (hot); values outside [0, 1] take the end colours."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    return np.asarray(_colour_map()(x, bytes=True), dtype=np.uint8)[..., :3]


def _bilinear_weights(size: int, cells: int) -> np.ndarray:
    """(size, cells) interpolation matrix, half-pixel centres (align_corners=False), edges clamped."""
    pos = (np.arange(size, dtype=np.float64) + 0.5) * cells / size - 0.5
    pos = np.clip(pos, 0.0, cells - 1)
    return np.clip(1.0 - np.abs(pos[:, None] - np.arange(cells)[None, :]), 0.0, 1.0).astype(np.float32)


def upsample(attention: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of maps (T, h, w) to (T, height, width): separable, two matrix products."""
    maps = np.asarray(attention, dtype=np.float32)
    wy = _bilinear_weights(height, maps.shape[1])  # (H, h)
    wx = _bilinear_weights(width, maps.shape[2])  # (W, w)
    return np.einsum("yi,tij,xj->tyx", wy, maps, wx, optimize=True)


# One fixed colour scale for every map of every clip: A_t times h*w (the cell's attention over the
# uniform share), on a log scale from 1/8x to 16x. A flat map is one colour (where "uniform" lies on the
# bar); only a cell that really draws more than its share shows warm. Stretching each map min-to-max
# instead made a nearly flat map (entropy 3.79 against 3.89 for uniform) look as hot as a sharp one.
RATIO_RANGE = (1 / 8, 16.0)
_LOG_LO, _LOG_HI = math.log2(RATIO_RANGE[0]), math.log2(RATIO_RANGE[1])
UNIFORM_ON_SCALE = -_LOG_LO / (_LOG_HI - _LOG_LO)  # where ratio 1 (uniform attention) sits in [0, 1]


def on_scale(ratio: np.ndarray) -> np.ndarray:
    """Attention ratios (A * h*w) -> positions in [0, 1] on the fixed log colour scale."""
    clipped = np.clip(np.asarray(ratio, dtype=np.float32), *RATIO_RANGE)
    return ((np.log2(clipped) - _LOG_LO) / (_LOG_HI - _LOG_LO)).astype(np.float32)


def blend(frames: np.ndarray, attention: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Attention heatmaps alpha-blended over their frames: (T, H, W, 3) uint8.

    `frames` (T, H, W, 3) uint8; `attention` (T, h, w), each map summing to 1. Each map is taken as the
    ratio to uniform attention (A * h*w), upsampled bilinearly over the whole frame and coloured on one
    fixed log scale (RATIO_RANGE), so colours compare frames and clips with each other: a flat map is all
    one colour, the one `UNIFORM_ON_SCALE` names on the colour bar.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
    attention = np.asarray(attention)
    if attention.ndim != 3 or attention.shape[0] != frames.shape[0]:
        raise ValueError(f"attention must be (T, h, w) with T={frames.shape[0]}, got {attention.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    cells = attention.shape[1] * attention.shape[2]
    heat = jet(on_scale(upsample(attention * cells, frames.shape[1], frames.shape[2]))).astype(np.float32)
    out = frames.astype(np.float32) * (1.0 - alpha) + heat * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# --- file names -------------------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """A file-name stem for any clip key: "move_left/clip_003.avi" -> "move_left__clip_003.avi".

    Characters other than letters, digits, '.', '_' and '-' become '_', and then a short hash of the
    original is appended so that two keys never share a file.
    """
    flat = name.replace("/", "__").replace("\\", "__")
    safe = _SAFE.sub("_", flat).lstrip("._-") or "clip"
    if safe != flat or len(safe) > 120:
        safe = f"{safe[:120]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe


# --- text --------------------------------------------------------------------------------------------------


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit_lines(text: str, width: int, lines: int, font) -> list[str]:
    """`text` wrapped to `width` pixels in at most `lines` lines; the last one cut with "..."."""
    def fits(s: str) -> bool:
        return font.getlength(s) <= width if hasattr(font, "getlength") else len(s) * 6 <= width

    chars = max(8, int(width / max(font.getlength("n") if hasattr(font, "getlength") else 6, 1)))
    wrapped = textwrap.wrap(text, chars) or [""]
    while any(not fits(s) for s in wrapped) and chars > 8:
        chars -= 2
        wrapped = textwrap.wrap(text, chars) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        last = wrapped[-1]
        while last and not fits(last + "..."):
            last = last[:-1]
        wrapped[-1] = last + "..."
    return wrapped


def _draw_lines(draw, xy: tuple[int, int], lines: Sequence[str], font, fill=INK) -> None:
    x, y = xy
    for i, line in enumerate(lines):
        draw.text((x, y + i * LINE), line, fill=fill, font=font)


# --- the strip (the source study's figures 1-2) ------------------------------------------------------------


def display_scale(height: int) -> int:
    """Integer upscaling factor that makes a frame at least MIN_DISPLAY_HEIGHT pixels high."""
    return max(1, math.ceil(MIN_DISPLAY_HEIGHT / max(int(height), 1)))


def pick_frames(total: int, count: int) -> list[int]:
    """`count` evenly spaced positions in 0..total-1, first and last included (fewer when total is short)."""
    if total < 1 or count < 1:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, min(count, total))})


def strip_geometry(count: int, height: int, width: int) -> tuple[tuple[int, int], list[tuple[int, int, int, int]],
                                                                 list[tuple[int, int, int, int]]]:
    """(image size (W, H), top-row tile boxes, bottom-row tile boxes) of a strip of `count` frames.

    Boxes are (left, top, right, bottom) in the PNG. Layout: title, label line, frames, label line, overlays,
    the colour bar.
    """
    s = display_scale(height)
    tw, th = width * s, height * s
    size = (PAD + count * (tw + PAD), TITLE_HEIGHT + 2 * (LABEL_HEIGHT + th) + LEGEND_HEIGHT + PAD)
    top_y = TITLE_HEIGHT + LABEL_HEIGHT
    bottom_y = top_y + th + LABEL_HEIGHT
    xs = [PAD + k * (tw + PAD) for k in range(count)]
    return size, [(x, top_y, x + tw, top_y + th) for x in xs], [(x, bottom_y, x + tw, bottom_y + th) for x in xs]


def _scaled(image: np.ndarray, scale: int):
    """PIL image of `image` (H, W, 3) enlarged by an integer factor with nearest neighbour (exact pixels)."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
    if scale == 1:
        return picture
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)


def write_strip(path: str | Path, frames: np.ndarray, overlays: np.ndarray, picks: list[int], title: str,
                labels: Sequence[str] | None = None) -> Path:
    """PNG: top row the picked frames, bottom row the same frames with attention; a title line above.

    `labels[k]` is written above tile k (default "t=<pick+1>"); small frames are upscaled to be readable.
    """
    from PIL import Image, ImageDraw

    frames, overlays = np.asarray(frames), np.asarray(overlays)
    if frames.shape != overlays.shape:
        raise ValueError(f"frames {frames.shape} and overlays {overlays.shape} differ")
    if not picks or any(not 0 <= p < len(frames) for p in picks):
        raise ValueError(f"picks must be positions in 0..{len(frames) - 1}, got {picks}")
    labels = list(labels) if labels is not None else [f"t={p + 1}" for p in picks]
    height, width = frames.shape[1:3]
    s = display_scale(height)
    size, top, bottom = strip_geometry(len(picks), height, width)
    canvas = Image.new("RGB", size, BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font()
    _draw_lines(draw, (PAD, 3), _fit_lines(title, size[0] - 2 * PAD, TITLE_LINES, font), font)
    for k, p in enumerate(picks):
        canvas.paste(_scaled(frames[p], s), top[k][:2])
        canvas.paste(_scaled(overlays[p], s), bottom[k][:2])
        label = _fit_lines(labels[k], top[k][2] - top[k][0], 1, font)
        draw.text((top[k][0], top[k][1] - LABEL_HEIGHT + 1), label[0], fill=INK, font=font)
        draw.text((bottom[k][0], bottom[k][1] - LABEL_HEIGHT + 1), label[0] + " attention", fill=INK, font=font)
    _draw_colour_bar(canvas, draw, (PAD, bottom[0][3] + 4), min(size[0] - 2 * PAD, 360), font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", optimize=True)
    return Path(path)


def _draw_colour_bar(canvas, draw, xy: tuple[int, int], width: int, font) -> None:
    """The fixed scale: a gradient from 1/8x to 16x the uniform share, with "uniform" marked on it."""
    from PIL import Image

    x, y = xy
    bar = jet(np.linspace(0.0, 1.0, width, dtype=np.float32))[None].repeat(10, axis=0)  # (10, width, 3)
    canvas.paste(Image.fromarray(np.ascontiguousarray(bar), "RGB"), (x, y))
    tick = x + int(round(UNIFORM_ON_SCALE * (width - 1)))
    draw.line([(tick, y - 2), (tick, y + 12)], fill=INK, width=2)
    labels = ((x, "1/8x"), (tick - 24, "uniform"), (x + width - 26, "16x"))
    for left, text in labels:
        draw.text((left, y + 13), text, fill=INK, font=font)
    draw.text((x + width + 8, y), "attention / uniform share (log scale)", fill=INK, font=font)


def draw_boxes(images: np.ndarray, boxes: np.ndarray | Sequence[np.ndarray], colour=BOX_COLOUR) -> np.ndarray:
    """A 1-pixel outline of each frame's boxes (x0, y0, x1, y1 in the frame's pixels) on a copy of `images`:
    `boxes` (T, 4), one a frame, or T arrays (K_t, 4) of any number (0: nothing drawn on that frame)."""
    out = np.array(images, copy=True)
    t, height, width = out.shape[:3]
    for k in range(min(t, len(boxes))):
        for box in np.reshape(boxes[k], (-1, 4)):
            x0, y0, x1, y1 = (int(round(float(v))) for v in box)
            x0, x1 = np.clip([x0, x1 - 1], 0, width - 1)
            y0, y1 = np.clip([y0, y1 - 1], 0, height - 1)
            if x1 < x0 or y1 < y0:
                continue
            out[k, y0, x0:x1 + 1] = out[k, y1, x0:x1 + 1] = colour
            out[k, y0:y1 + 1, x0] = out[k, y0:y1 + 1, x1] = colour
    return out


# --- the animation -----------------------------------------------------------------------------------------


def write_animation(path: str | Path, overlays: np.ndarray, captions: list[str], fps: float) -> Path:
    """Animated GIF of every overlay frame with its caption below it; loops forever."""
    from PIL import Image, ImageDraw

    overlays = np.asarray(overlays)
    if len(captions) != len(overlays) or len(overlays) == 0:
        raise ValueError(f"need one caption per frame: {len(captions)} captions, {len(overlays)} frames")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    s = display_scale(overlays.shape[1])
    width, height = overlays.shape[2] * s, overlays.shape[1] * s
    font = _font()
    images = []
    for frame, caption in zip(overlays, captions):
        canvas = Image.new("RGB", (width, height + CAPTION_HEIGHT), BACKGROUND)
        canvas.paste(_scaled(frame, s), (0, 0))
        _draw_lines(ImageDraw.Draw(canvas), (4, height + 3), _fit_lines(caption, width - 8, CAPTION_LINES, font), font)
        images.append(canvas)
    duration = max(20, int(round(1000.0 / fps)))
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0,
                       disposal=1, optimize=False)
    return Path(path)


def render_clip(out_dir: Path, name: str, frames: np.ndarray, attention: np.ndarray, title: str,
                caption: str | Sequence[str], strip_frames: int, fps: float = 4.0, *,
                frame_index: Sequence[int] | None = None, alpha: float = 0.5,
                boxes: np.ndarray | Sequence[np.ndarray] | None = None) -> dict[str, Path]:
    """Write `<name>.png` (strip of `strip_frames` evenly spaced frames) and `<name>.gif` (all frames).

    `name` is made file-safe (`safe_name`). `caption` is one text for every GIF frame (each gets
    "t=k/T" appended) or a list with one per frame. `frame_index` (the decoded frame numbers) labels the
    strip's tiles; `boxes`, the ground-truth boxes of each frame ((T, 4), or T arrays (K_t, 4)), are outlined
    on the overlays.
    Returns {"strip": png path, "animation": gif path}.
    """
    out_dir = Path(out_dir)
    total = len(frames)
    overlays = blend(frames, attention, alpha)
    if boxes is not None and len(boxes):
        overlays = draw_boxes(overlays, boxes)
    if isinstance(caption, str):
        captions = [f"{caption}  t={k + 1}/{total}" for k in range(total)]
    else:
        captions = list(caption)
    picks = pick_frames(total, strip_frames)
    labels = None if frame_index is None else [f"frame {int(frame_index[p])}" for p in picks]
    stem = safe_name(name)
    strip = write_strip(out_dir / f"{stem}.png", frames, overlays, picks, title, labels)
    animation = write_animation(out_dir / f"{stem}.gif", overlays, captions, fps)
    return {"strip": strip, "animation": animation}
