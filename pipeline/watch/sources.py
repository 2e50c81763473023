"""Where `watch` gets its frames: a video file, a folder of them (played in order, time running on), a URL
(RTSP/HTTP/..., through PyAV) or a camera device (/dev/videoN, through PyAV's v4l2).

Frames are decoded in order (never seek-based access: docs/DESIGN.md, "Frame sampling and decoding") and sampled
at the model's interval on the source's own clock (its timestamps), so a file and a camera give the model
the same spacing between frames whatever their frame rates. A source that ends before the length its
headers declare, raises while demuxing or decoding, or gives no frame for `read_timeout` seconds has
broken (`SourceBroken`, exit status 1); one that cannot be opened at all is the user's to fix
(`SourceError`, exit status 2).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import UserError, describe
from pipeline.video.decode import is_video_file

URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
# a file that stops this much short of the length its headers declare has broken, not ended
SHORT_BY_SECONDS = 0.5
# a live stream's timestamps that go back, or forward by more than this, are a jump of its clock, not time
JUMP_SECONDS = 5.0
# sampled frames a run of unknown length is taken to last (a stream or a camera runs as long as it is watched):
# far past what pays back compiling the trunk (pipeline/features/backbone.py, COMPILE_MIN_FRAMES)
LONG_RUN_FRAMES = 1_000_000


class SourceError(UserError):
    """A source that cannot be opened or used at all; the message says which and why."""


class SourceBroken(Exception):
    """A source that broke after it started (cut short, a decoding error, a stall); one line of text."""


@dataclass
class Frame:
    """One decoded frame: its time in seconds from the start of the source, its pixels and when it arrived."""

    time: float
    image: np.ndarray  # (H, W, 3) uint8 RGB
    arrived: float = 0.0  # time.monotonic() when it was read: a live frame's latency is measured from here


@dataclass
class Source:
    """A parsed SOURCE argument: what it is (file | folder | url | device) and, for a folder, its files."""

    kind: str
    location: str
    files: list[Path] = field(default_factory=list)

    @property
    def live(self) -> bool:
        """Frames arrive at the rate they happen (a stream or a camera), not as fast as they can be read."""
        return self.kind in ("url", "device")

    @property
    def name(self) -> str:
        return self.location


def parse_source(text: str) -> Source:
    """SOURCE as the user wrote it -> a Source; an unusable one is a SourceError naming what is accepted."""
    if "://" in text:
        if not text.lower().startswith(URL_SCHEMES):
            raise SourceError(f"{text}: unsupported URL scheme; watch reads {', '.join(s[:-3] for s in URL_SCHEMES)}")
        return Source("url", text)
    path = Path(text).expanduser()
    if str(path).startswith("/dev/video"):
        if not path.exists():
            raise SourceError(f"{path}: no such camera device")
        return Source("device", str(path))
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file() and is_video_file(p)), key=lambda p: p.name)
        if not files:
            raise SourceError(f"{path}: a folder without video files")
        return Source("folder", str(path), files)
    if path.is_file():
        return Source("file", str(path), [path])
    raise SourceError(f"{path}: no such file, folder, camera or URL")


class Sampler:
    """Keeps the frames due on a grid of `interval` seconds from the first one (the model's sampling rate):
    a frame is kept when it is the first at or past the next grid point, less half a source frame."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._due: float | None = None
        self._last: float | None = None
        self.seen = 0
        self.kept = 0

    def keep(self, t: float) -> bool:
        step = t - self._last if self._last is not None else 0.0
        self._last, self.seen = t, self.seen + 1
        slack = min(max(step, 0.0), self.interval) / 2  # half a source frame: the nearest frame, not the next
        if self._due is not None and t < self._due - slack:
            return False
        if self._due is None:
            self._due = t
        self._due += self.interval * max(1, math.floor((t + slack - self._due) / self.interval) + 1)
        self.kept += 1
        return True


def _open(location: str, kind: str, read_timeout: float):
    """A PyAV input container (and its video stream) for a file, URL or device; SourceError when it cannot."""
    import av

    options = {"format": "v4l2"} if kind == "device" else {}
    try:
        container = av.open(location, timeout=(read_timeout, read_timeout), **options)
    except (av.error.FFmpegError, OSError) as exc:
        raise SourceError(f"{location}: cannot be opened as video ({describe(exc, 200)})") from None
    if not container.streams.video:
        container.close()
        raise SourceError(f"{location}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def declared_seconds(container, stream) -> float | None:
    """The length a file's headers declare (container duration, stream duration or frame count), or None."""
    candidates = []
    if container.duration:
        candidates.append(container.duration / 1_000_000)
    if stream.duration and stream.time_base:
        candidates.append(float(stream.duration * stream.time_base))
    rate = stream.average_rate or stream.guessed_rate
    if stream.frames and rate:
        candidates.append(stream.frames / float(rate))
    return max(candidates) if candidates else None


class Reader:
    """The decoded frames of a Source, in order, with times from its start (a folder's run on), paced at
    their own rate when `paced` (a live source, or a file read as a camera would deliver it)."""

    def __init__(self, source: Source, read_timeout: float = 10.0, paced: bool = False) -> None:
        self.source, self.read_timeout, self.paced = source, read_timeout, paced
        self.fps: float | None = None  # the source's frame rate, once known
        self.size: tuple[int, int] | None = None  # (width, height) of its frames
        self.position = 0.0  # seconds of source read so far
        self.declared: float | None = None  # the length the (first) file's headers declare, once checked
        self._anchor: float | None = None

    def check(self) -> None:
        """Open the (first) source now, so a source that cannot be opened is a SourceError before any work."""
        location = str(self.source.files[0]) if self.source.files else self.source.location
        container, stream = _open(location, self.source.kind, self.read_timeout)
        self.fps = float(stream.average_rate or stream.guessed_rate or 0) or None
        self.size = (stream.codec_context.width, stream.codec_context.height)
        self.declared = declared_seconds(container, stream) if not self.source.live else None
        container.close()

    def sampled_frames(self, interval: float) -> int:
        """About how many frames a run samples every `interval` seconds, known from headers alone (after
        `check`): a file's declared length over the interval, a folder's first file's times its files;
        LONG_RUN_FRAMES for a live source or a file that declares no length."""
        if not self.declared:
            return LONG_RUN_FRAMES
        return max(1, math.ceil(self.declared * len(self.source.files) / interval))

    def frames(self) -> Iterator[Frame]:
        """Every frame, in order; SourceBroken when the source breaks, SourceError when a file cannot open."""
        offset = 0.0
        locations = [str(p) for p in self.source.files] or [self.source.location]
        for i, location in enumerate(locations):
            end = yield from self._frames_of(location, offset, first=i == 0)
            offset = end

    def _frames_of(self, location: str, offset: float, first: bool):
        import av

        try:
            container, stream = _open(location, self.source.kind, self.read_timeout)
        except SourceError as exc:
            if first:
                raise
            raise SourceBroken(f"{exc} (after {offset:.1f} s of {self.source.name})") from None
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        self.fps = self.fps or rate
        step = 1.0 / rate if rate else 0.0
        declared = declared_seconds(container, stream) if self.source.kind in ("file", "folder") else None
        start_pts, t, count = None, offset, 0
        try:
            for frame in container.decode(stream):
                if frame.pts is not None and frame.time_base is not None:
                    start_pts = frame.pts if start_pts is None else start_pts
                    t = offset + float((frame.pts - start_pts) * frame.time_base)
                else:  # a source without timestamps (some cameras): its nominal rate, else the wall clock
                    t = offset + (count * step if step else time.monotonic() - (self._anchor or time.monotonic()))
                if self.source.live and count and not 0 <= t - self.position <= JUMP_SECONDS:
                    # a stream's clock jumped (a camera restarting its timestamps, a wrap): time runs on
                    offset += self.position + (step or 0.04) - t
                    t = self.position + (step or 0.04)
                count += 1
                self._pace(t)
                image = frame.to_ndarray(format="rgb24")
                self.size = (image.shape[1], image.shape[0])
                self.position = t
                yield Frame(t, image, time.monotonic())
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise SourceBroken(f"{location} broke at {self.position:.1f} s: {_reason(exc, self.read_timeout)}"
                               ) from None
        finally:
            container.close()
        end = t + step if count else offset
        if declared is not None and end - offset < declared - max(SHORT_BY_SECONDS, 2 * step):
            raise SourceBroken(f"{location} ended at {end - offset:.1f} s of the {declared:.1f} s its headers "
                               "declare: cut short or damaged")
        if count == 0:
            raise SourceBroken(f"{location}: no frame could be decoded")
        return end

    def _pace(self, t: float) -> None:
        """Wait until `t` is due on the wall clock (paced reading); a source running late is never caught up."""
        now = time.monotonic()
        if not self.paced:
            return
        if self._anchor is None or now - self._anchor > t:
            self._anchor = now - t  # late (or the first frame): from here on, no burst to catch up
            return
        time.sleep(self._anchor + t - now)


def _reason(exc: BaseException, read_timeout: float) -> str:
    """A decoding/demuxing error in words: a timeout is a stall, not damage."""
    import av

    if isinstance(exc, av.error.ExitError):  # PyAV's read timeout interrupts FFmpeg with AVERROR_EXIT
        return f"stalled: no data for {read_timeout:g} s (watch.read_timeout)"
    strerror = getattr(exc, "strerror", None)  # PyAV's errors: the FFmpeg message, without the URL again
    text = f"{exc.__class__.__name__}: {strerror}" if strerror else describe(exc, 160)
    if "timed out" in text.lower() or "ETIMEDOUT" in text or isinstance(exc, TimeoutError):
        return f"stalled (no data for the read timeout): {text}"
    return text
