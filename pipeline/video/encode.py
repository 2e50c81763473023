"""Writing real encoded video files through PyAV.

The embedded dataset and the decoding tests both need files that exercise the hard cases users have:
H.264 and MPEG-4 Part 2, with and without B-frames, in AVI, MP4 and MKV.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Encoding:
    """One codec/container pair. `bframes` > 0 asks the encoder for B-frames (reordered output)."""

    codec: str = "libx264"  # libx264 | mpeg4
    container: str = "mp4"  # mp4 | avi | mkv
    bframes: int = 0
    quality: int = 4  # mpeg4 qscale (lower is better); libx264 uses crf = 4 * quality

    @property
    def suffix(self) -> str:
        return "." + self.container

    @property
    def label(self) -> str:
        return f"{self.codec}-{'b' if self.bframes else 'nob'}-{self.container}"


# Every pair the decoding guarantees are proven on.
ENCODINGS: tuple[Encoding, ...] = tuple(
    Encoding(codec, container, bframes)
    for codec in ("libx264", "mpeg4")
    for bframes in (0, 2)
    for container in ("avi", "mp4", "mkv")
)


# What makes the bytes a function of the frames alone, not of the machine or of what the process did before:
# * On AVX-512 CPUs, x264's SIMD macroblock-tree propagation (mbtree, on by default) reads heap memory it never
#   wrote, so the same frames gave other bytes from one call to the next. `cpu-independent` swaps just those
#   two routines for x264's C ones, which x264 keeps for output that does not depend on the CPU; the rest
#   stays SIMD (here the bytes then equal those of asm=0; the time, within the noise of a timing).
# * PyAV asks for slice threads and as many threads as there are cores; both encoders cut each picture into
#   that many slices, so the bytes followed the machine's core count. One thread per file: a dataset gets its
#   parallelism from encoding several files at once (`generate_dataset`'s workers), and is faster for it.
X264_DETERMINISTIC = "cpu-independent=1"
ENCODER_THREADS = 1


def _options(enc: Encoding) -> dict[str, str]:
    if enc.codec == "libx264":
        opts = {"crf": str(4 * enc.quality), "preset": "veryfast", "bf": str(enc.bframes)}
        opts["x264-params"] = X264_DETERMINISTIC if enc.bframes else f"bframes=0:{X264_DETERMINISTIC}"
        return opts
    # A fixed quantiser, as ffmpeg's `-qscale:v q` sets it (a bare "qscale" option is silently ignored and
    # leaves the encoder at its low default bitrate, smearing small moving objects).
    return {"flags": "+qscale", "global_quality": str(enc.quality * 118), "bf": str(enc.bframes), "g": "12"}


def write_video(path: str | Path, frames: np.ndarray, fps: float = 25.0, enc: Encoding = Encoding(),
                rotation: int | None = None) -> Path:
    """Encode `frames` (T, H, W, 3) uint8 RGB to `path`.

    Even sizes use yuv420p (what cameras write); odd sizes need yuv444p, which only libx264 offers here.
    `rotation` stores a display rotation (degrees counter-clockwise), as phones do for portrait clips.
    """
    import av

    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
    _, height, width, _ = frames.shape
    odd = bool(height % 2 or width % 2)
    if odd and enc.codec != "libx264":
        raise ValueError(f"odd frame sizes ({width}x{height}) need codec libx264 (yuv444p)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    # bitexact: no random segment UID or encoder stamp, so the same frames give the same bytes on every run
    # (the DVC lock of the embedded dataset then matches on a fresh clone); the encoders' part: _options
    with av.open(str(path), mode="w", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(enc.codec, rate=rate, options=_options(enc))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if odd else "yuv420p"
        stream.codec_context.thread_count = ENCODER_THREADS  # see X264_DETERMINISTIC
        if enc.bframes:
            stream.codec_context.max_b_frames = enc.bframes
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


# --- frame numbers drawn into the pixels, so a test can tell which frame a decoder returned ---------------

_BITS = 10  # up to 1023 frames
_GRID = (2, 5)  # rows x cols of bit cells


def stamp_frame_number(image: np.ndarray, number: int) -> np.ndarray:
    """Draw `number` into `image` (H, W, 3) as a grid of black/white cells, robust to lossy coding."""
    out = image.copy()
    h, w = out.shape[:2]
    rows, cols = _GRID
    ch, cw = h // rows, w // cols
    for bit in range(_BITS):
        r, c = divmod(bit, cols)
        value = 255 if (number >> bit) & 1 else 0
        out[r * ch + 2:(r + 1) * ch - 2, c * cw + 2:(c + 1) * cw - 2] = value
    return out


def read_frame_number(image: np.ndarray) -> int:
    """Inverse of `stamp_frame_number` for a decoded frame of the same size."""
    h, w = image.shape[:2]
    rows, cols = _GRID
    ch, cw = h // rows, w // cols
    number = 0
    for bit in range(_BITS):
        r, c = divmod(bit, cols)
        cell = image[r * ch + ch // 4:(r + 1) * ch - ch // 4, c * cw + cw // 4:(c + 1) * cw - cw // 4]
        if cell.mean() > 127:
            number |= 1 << bit
    return number


def numbered_frames(count: int, height: int = 96, width: int = 128) -> np.ndarray:
    """`count` frames (T, H, W, 3) uint8, frame i showing the number i."""
    base = np.full((height, width, 3), 128, dtype=np.uint8)
    return np.stack([stamp_frame_number(base, i) for i in range(count)])
