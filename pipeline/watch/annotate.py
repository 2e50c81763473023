"""--out: the annotated video, written frame by frame as the windows are scored.

One output frame per sampled frame the model saw, at its own time (so dropped frames leave a gap in time,
not a lie): the frame with its attention map blended over it (the overlay colour scale of the report,
pipeline/report/overlay.py: the cell's share over the uniform share, log, 1/8x to 16x), and below it a bar
with the window's top classes, the frame's time and the event state (classes whose event is open, in red).

The container is PyAV's: H.264 (libx264) in .mp4 / .mkv / .mov, MPEG-4 Part 2 in .avi (what the
embedded dataset is encoded with, pipeline/video/encode.py). `close()` flushes the encoder and writes the
container's index: the caller closes it in a `finally`, so a run stopped by Ctrl-C, SIGTERM or a broken
source still leaves a playable file.

A frame is written once the window that scores it is (`Annotator`): the map drawn over it is the one the head
gave that very frame, not a map of frames around it.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.watch.online import Window
    from pipeline.watch.sources import Frame

CODECS = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".avi": "mpeg4"}
FALLBACK_CODEC = "mpeg4"  # where this PyAV's FFmpeg has no libx264
BAR_HEIGHT = 34  # pixels of the label bar under each frame
TIME_BASE = Fraction(1, 1000)  # output timestamps in milliseconds of source time
BAR_COLOUR = (24, 24, 24)
TEXT = (235, 235, 235)
ALERT = (230, 40, 40)


class OutputError(UserError):
    """--out cannot be written as asked."""


def codec_for(path: Path) -> str:
    """The encoder --out's suffix asks for, as far as this PyAV has it; OutputError for other suffixes."""
    import av

    suffix = Path(path).suffix.lower()
    if suffix not in CODECS:
        raise OutputError(f"--out {path}: write .mp4, .mkv, .mov (H.264) or .avi (MPEG-4)")
    codec = CODECS[suffix]
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # noqa: BLE001 - av raises UnknownCodecError or ValueError by version
        return FALLBACK_CODEC
    return codec


def check_out(path: Path) -> str:
    """Check --out before any work: its suffix, its folder writable. Returns the codec it will use."""
    codec = codec_for(path)
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {path}: cannot create {folder} ({exc.strerror or exc})") from None
    if Path(path).is_dir():
        raise OutputError(f"--out {path}: is a folder; name a video file")
    return codec


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


class AnnotatedVideo:
    """An output video opened at the first frame (its size is then known) and closed by `close()`."""

    def __init__(self, path: Path, alpha: float = 0.5) -> None:
        self.path, self.alpha = Path(path), alpha
        self.codec = check_out(self.path)
        self.frames = 0
        self._container = None
        self._stream = None
        self._size: tuple[int, int] | None = None  # (width, height) of the picture, even
        self._last_pts = -1
        self._font = None

    def _open(self, width: int, height: int) -> None:
        import av

        self._size = (width + width % 2, height + height % 2)  # yuv420p wants even sizes
        try:
            self._container = av.open(str(self.path), mode="w")
        except (av.error.FFmpegError, OSError) as exc:
            raise OutputError(f"--out {self.path}: cannot be written ({exc})") from None
        stream = self._container.add_stream(self.codec, rate=25)
        stream.width, stream.height = self._size[0], self._size[1] + BAR_HEIGHT
        stream.pix_fmt = "yuv420p"
        stream.time_base = TIME_BASE
        stream.codec_context.time_base = TIME_BASE
        if self.codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "23"}
        else:
            stream.options = {"flags": "+qscale", "global_quality": str(4 * 118)}
        self._stream = stream
        self._font = _font()

    def write(self, image: np.ndarray, t: float, attention: np.ndarray | None, lines: Sequence[str],
              alert: bool = False) -> None:
        """Append `image` (H, W, 3) uint8 at source time `t` s, with `attention` (h, w) blended over it (None:
        no map yet) and `lines` (one or two) of text in the bar, in red when `alert`."""
        import av

        from pipeline.report.overlay import blend

        if self._container is None:
            self._open(image.shape[1], image.shape[0])
        picture = image if attention is None else blend(image[None], attention[None], self.alpha)[0]
        canvas = self._canvas(picture, lines, alert)
        pts = max(int(round(t * 1000)), self._last_pts + 1)  # strictly increasing, whatever the source did
        self._last_pts = pts
        frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
        frame.pts, frame.time_base = pts, TIME_BASE
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def _canvas(self, picture: np.ndarray, lines: Sequence[str], alert: bool) -> np.ndarray:
        """The picture (padded to the even size) above the label bar: (H + BAR_HEIGHT, W, 3) uint8."""
        from PIL import Image, ImageDraw

        width, height = self._size
        canvas = np.empty((height + BAR_HEIGHT, width, 3), dtype=np.uint8)
        canvas[:] = BAR_COLOUR
        h, w = min(picture.shape[0], height), min(picture.shape[1], width)
        canvas[:h, :w] = picture[:h, :w]
        bar = Image.fromarray(canvas[height:])
        draw = ImageDraw.Draw(bar)
        for i, line in enumerate(lines[:2]):
            draw.text((4, 2 + 16 * i), line, fill=ALERT if alert and i == 0 else TEXT, font=self._font)
        canvas[height:] = np.asarray(bar)
        return canvas

    def close(self) -> None:
        """Flush the encoder and finish the container (its index): the file is playable afterwards."""
        if self._container is None:
            return
        container, self._container = self._container, None
        try:
            for packet in self._stream.encode():
                container.mux(packet)
        finally:
            container.close()


class Annotator:
    """Frames waiting for the window that scores them, written to an AnnotatedVideo with their attention, the
    window's top classes and the event state. It alone knows which frames a window covers."""

    def __init__(self, video: AnnotatedVideo, top_k: int) -> None:
        self.video, self.top_k = video, top_k
        self.waiting: list[Frame] = []

    def add(self, frames: list[Frame]) -> None:
        """Frames embedded, in order, to be written once the window that scores them is."""
        self.waiting.extend(frames)

    def write(self, window: Window | None, active: list[str]) -> None:
        """Write the waiting frames up to the window's last: its newest frames with their maps, older ones
        (never in a window) as they are; without a window (the run is over), every waiting frame as it is."""
        if not self.waiting:
            return
        upto = len(self.waiting)
        if window is not None:  # the frames after the window's last wait for the next window
            upto = next(i for i, f in enumerate(self.waiting) if f.time == window.end) + 1
        frames, self.waiting = self.waiting[:upto], self.waiting[upto:]
        new = min(window.new, len(frames)) if window is not None else 0
        top = window.top(self.top_k) if window is not None else []
        line = "  ".join(f"{c} {p:.0%}" for c, p in top) or "waiting for a full window"
        state = f"EVENT: {', '.join(active)}" if active else "no event"
        for i, frame in enumerate(frames):
            k = i - (len(frames) - new)  # position among the window's new frames, negative: not in it
            attention = window.attention[len(window.attention) - new + k] if k >= 0 else None  # (h, w)
            self.video.write(frame.image, frame.time, attention, [line, f"{frame.time:7.1f} s   {state}"],
                             alert=bool(active))
