"""Exact frame sampling with decord.

decord's random access (`get_batch`, `vr[i]`) returns the wrong frames on B-frame streams without any error
(DESIGN.md), and headers over-report the frame count. So a clip is always decoded *in order*, the frames that
really decode are counted, and the sampled ones are kept. Nothing here imports torch: this runs in the
decoding worker processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.messages import first_line

VIDEO_EXTENSIONS = frozenset(
    {".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ogv"}
)

# Frames are kept in memory during the single sequential pass when the whole clip fits in this budget;
# longer clips keep only the frames that any plausible true length could sample, with a second pass as
# the fallback when the real length is further off than that.
KEEP_ALL_BYTES = 256 * 2**20
HEADER_SLACK = 4


# How T frames are chosen from the n that decode; recorded in every cache (part of its settings).
SAMPLING = "segment-centre: floor((k + 0.5) * n / T) over frames decoded in order"


class VideoError(Exception):
    """A clip that cannot be used; the message is the one-line reason recorded in the cache."""


@dataclass
class DecodedClip:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, the sampled frames in order
    frame_index: np.ndarray  # (T,) int32, index of each sampled frame among the frames that decode
    num_frames: int  # frames that really decode (not the header's claim)
    fps: float
    height: int
    width: int


def sample_indices(num_frames: int, count: int) -> np.ndarray:
    """Segment centres: idx_k = floor((k + 0.5) * n / T); a clip shorter than T repeats indices."""
    if num_frames < 1 or count < 1:
        raise ValueError(f"need num_frames >= 1 and count >= 1, got {num_frames}, {count}")
    k = np.arange(count, dtype=np.int64)
    return ((2 * k + 1) * num_frames // (2 * count)).astype(np.int32)


def is_video_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".")


_silenced = False


def silence_native_stderr() -> None:
    """Send this process's fd 2 to /dev/null (once); for decoder worker processes only."""
    global _silenced
    if not _silenced:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        _silenced = True


def _open(path: Path):
    import decord

    if not path.exists():
        raise VideoError("file not found")
    if path.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # decord raises its own DECORDError and plain RuntimeErrors
        raise VideoError(f"not a readable video ({first_line(exc)})") from None


def _frames_to_keep(header_frames: int, frame_bytes: int, count: int) -> set[int] | None:
    """Indices worth keeping in one pass, or None to keep every frame."""
    if header_frames * frame_bytes <= KEEP_ALL_BYTES:
        return None
    keep: set[int] = set()
    for n in range(max(1, header_frames - HEADER_SLACK), header_frames + 1):
        keep.update(sample_indices(n, count).tolist())
    return keep


def _read_in_order(reader, keep, limit: int) -> tuple[dict[int, np.ndarray], int, str | None]:
    """Decode sequentially up to `limit` frames; return kept frames, how many decoded, and the error that
    stopped it (if any). `keep` is a set of indices, None for all, or a callable deciding from the first
    frame's shape (so the memory budget is known before the rest is read)."""
    kept: dict[int, np.ndarray] = {}
    decoded = 0
    while decoded < limit:
        try:
            frame = reader.next().asnumpy()
        except StopIteration:
            return kept, decoded, None
        except Exception as exc:
            return kept, decoded, first_line(exc)
        if callable(keep):
            keep = keep(frame.nbytes)
        if keep is None or decoded in keep:
            kept[decoded] = frame
        decoded += 1
    return kept, decoded, None


def decode_sampled(path: str | Path, count: int = 30) -> DecodedClip:
    """Decode `path` in order and return its `count` segment-centre frames.

    A truncated or damaged stream is cut at the last frame that decodes; a stream with no decodable frame
    raises VideoError with the reason.
    """
    path = Path(path)
    reader = _open(path)
    try:
        header_frames = len(reader)
        fps = float(reader.get_avg_fps() or 0.0)
    except Exception as exc:
        raise VideoError(f"unreadable header ({first_line(exc)})") from None
    if header_frames < 1:
        raise VideoError("no frames in stream")
    keep = lambda frame_bytes: _frames_to_keep(header_frames, frame_bytes, count)  # noqa: E731
    # Never read further than the header promises (plus slack): a runaway stream is cut, not followed.
    kept, decoded, error = _read_in_order(reader, keep, header_frames + 16)
    if decoded == 0:
        raise VideoError(f"no frame decodes ({error})" if error else "no frame decodes")
    index = sample_indices(decoded, count)
    if any(i not in kept for i in index.tolist()):
        kept, _, _ = _read_in_order(_open(path), set(index.tolist()), decoded)
    frames = np.stack([kept[i] for i in index.tolist()])  # (T, H, W, 3)
    return DecodedClip(frames, index, decoded, fps, frames.shape[1], frames.shape[2])


def decode_frames_at(path: str | Path, frame_index: np.ndarray) -> np.ndarray:
    """The frames at `frame_index` (indices among decodable frames), decoded in order: (T, H, W, 3) uint8.

    Used by render and predict to show the very frames whose features were cached.
    """
    wanted = np.asarray(frame_index, dtype=np.int64)
    reader = _open(Path(path))
    kept, decoded, error = _read_in_order(reader, set(wanted.tolist()), int(wanted.max()) + 1)
    missing = [i for i in wanted.tolist() if i not in kept]
    if missing:
        raise VideoError(f"frame {missing[0]} no longer decodes (only {decoded}; {error or 'end of stream'})")
    return np.stack([kept[i] for i in wanted.tolist()])
