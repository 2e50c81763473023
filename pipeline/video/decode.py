"""Exact frame sampling: decord in order, checked, with PyAV where decord's output is wrong.

decord's random access (`get_batch`, `vr[i]`) returns the wrong frames on B-frame streams without any error
(docs/DESIGN.md, "Frame sampling and decoding"), and headers over-report the frame count. So a clip is always
decoded *in order*, the frames that really decode are counted, and the sampled ones are kept.

decord's output is not trusted blindly either: decord2 3.4 returns 4-channel garbage for frames 48 or 96
pixels wide on some CPUs (dmlc/decord #93, #336), and a row-alignment bug can as well give garbage of the
right shape. So every clip decord gives is checked (dtype, shape, frame count) and its first sampled frame
is compared with PyAV's decode of the same frame; a clip that fails is decoded again with PyAV (also in
order, always exact) and `DecodedClip.decoder` says which decoder made the frames, so render and predict
decode them the same way. Nothing here imports torch: this runs in the decoding worker processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError, first_line

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


class VideoError(UserError):
    """A clip that cannot be used; the message is the one-line reason recorded in the cache."""


class MalformedFrames(VideoError):
    """A decoder gave frames that are not (H, W, 3) uint8 of one size; `problem` says how."""

    def __init__(self, decoder: str, problem: str):
        super().__init__(f"{decoder} gave {problem}")
        self.problem = problem


@dataclass
class DecodedClip:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, the sampled frames in order
    frame_index: np.ndarray  # (T,) int32, index of each sampled frame among the frames that decode
    num_frames: int  # frames that really decode (not the header's claim)
    fps: float
    height: int
    width: int
    decoder: str = "decord"  # which decoder made `frames`: decord | pyav (see DECODERS)
    note: str = ""  # why decord's frames were not used, when they were not


# Decoders a clip's frames can come from; the cache records one per clip.
DECODERS = ("decord", "pyav")
# Mean absolute difference (0-255) above which decord's first sampled frame is not PyAV's: the two agree
# exactly on every codec/container pair tested, so this only leaves room for another FFmpeg's rounding.
AGREEMENT = 4.0


def sample_indices(num_frames: int, count: int) -> np.ndarray:
    """Segment centres: idx_k = floor((k + 0.5) * n / T); a clip shorter than T repeats indices."""
    if num_frames < 1 or count < 1:
        raise ValueError(f"need num_frames >= 1 and count >= 1, got {num_frames}, {count}")
    k = np.arange(count, dtype=np.int64)
    return ((2 * k + 1) * num_frames // (2 * count)).astype(np.int32)


def is_video_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".")


_in_worker = False


def enter_decode_worker() -> None:
    """Mark this process as a decoding worker (it never runs torch) and send its fd 2 to /dev/null, once:
    FFmpeg's complaints about broken files would scribble over the progress bar; the reason is recorded."""
    global _in_worker
    if not _in_worker:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        _in_worker = True


def warm_decode_worker() -> None:
    """Enter decoding-worker mode and load both decoders now, before the first clip arrives: decord's import
    alone is ~0.3-0.6 s (it loads FFmpeg and preloads the CUDA libraries of nvidia-* packages), time that a
    worker started early spends while its parent builds the backbone instead of after the first dispatch."""
    enter_decode_worker()
    _import_decord()
    import av  # noqa: F401


def _import_decord():
    """decord, with torch loaded first in any process that may run torch.

    decord2 preloads every library of the nvidia-* pip packages (which a CUDA build of torch installs) with
    RTLD_GLOBAL at import, libnvblas among them; libnvblas then takes over BLAS for libraries loaded after
    it, and torch's first matrix product segfaults ("[NVBLAS] CPU Blas library need to be provided"). With
    torch loaded first its BLAS is bound already. Decoding workers never run torch and skip the cost.
    """
    import importlib.util
    import sys

    if not _in_worker and "torch" not in sys.modules and importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401
    import decord

    return decord


class _DecordReader:
    """decord's sequential reader: header frame count, fps, and the next frame as an (H, W, C) array."""

    def __init__(self, path: Path):
        decord = _import_decord()
        try:
            self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        except Exception as exc:  # decord raises its own DECORDError and plain RuntimeErrors
            raise VideoError(f"not a readable video ({first_line(exc)})") from None

    def header(self) -> tuple[int, float]:
        return len(self._reader), float(self._reader.get_avg_fps() or 0.0)

    def next(self) -> np.ndarray:
        return self._reader.next().asnumpy()  # StopIteration at the end


class _PyAVReader:
    """PyAV's sequential decode of the first video stream, as RGB (H, W, 3) arrays."""

    def __init__(self, path: Path):
        import av

        try:
            self._container = av.open(str(path))
            self._stream = self._container.streams.video[0]
        except Exception as exc:  # av.error.* and IndexError (no video stream)
            raise VideoError(f"not a readable video for PyAV ({first_line(exc)})") from None
        self._frames = self._container.decode(self._stream)

    def header(self) -> tuple[int, float]:
        rate = self._stream.average_rate or self._stream.guessed_rate
        return int(self._stream.frames or 0), float(rate or 0.0)

    def next(self) -> np.ndarray:
        frame = next(self._frames)  # StopIteration at the end
        rgb = frame.to_ndarray(format="rgb24")
        # decord shows a clip upright (its display rotation applied); PyAV leaves that to us
        turns = (int(getattr(frame, "rotation", 0) or 0) // 90) % 4  # counter-clockwise quarter turns
        return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _open(path: Path, decoder: str = "decord"):
    if not path.exists():
        raise VideoError("file not found")
    if path.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    return _PyAVReader(path) if decoder == "pyav" else _DecordReader(path)


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
            frame = reader.next()
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


def _count_frames(path: Path, decoder: str) -> int:
    """Frames that decode, counted in one pass without keeping any (for streams with no frame count)."""
    _, decoded, _ = _read_in_order(_open(path, decoder), set(), 1 << 31)
    return decoded


def _decode(path: Path, count: int, decoder: str) -> DecodedClip:
    """One decoder's in-order pass (two when the header's frame count is too far off to keep candidates)."""
    reader = _open(path, decoder)
    try:
        header_frames, fps = reader.header()
    except Exception as exc:
        raise VideoError(f"unreadable header ({first_line(exc)})") from None
    if header_frames < 1 and decoder == "pyav":  # containers that record no count (MKV, some AVIs)
        header_frames = _count_frames(path, decoder)
    if header_frames < 1:
        raise VideoError("no frames in stream")
    keep = lambda frame_bytes: _frames_to_keep(header_frames, frame_bytes, count)  # noqa: E731
    # Never read further than the header promises (plus slack): a runaway stream is cut, not followed.
    kept, decoded, error = _read_in_order(reader, keep, header_frames + 16)
    if decoded == 0:
        raise VideoError(f"no frame decodes ({error})" if error else "no frame decodes")
    index = sample_indices(decoded, count)
    if any(i not in kept for i in index.tolist()):
        kept, _, _ = _read_in_order(_open(path, decoder), set(index.tolist()), decoded)
    frames = [kept[i] for i in index.tolist()]
    problem = _malformed(frames)
    if problem:
        raise MalformedFrames(decoder, problem)
    stacked = np.stack(frames)  # (T, H, W, 3)
    return DecodedClip(stacked, index, decoded, fps, stacked.shape[1], stacked.shape[2], decoder)


def _malformed(frames: list[np.ndarray]) -> str | None:
    """What is wrong with decoded frames, as a phrase; None when they are (H, W, 3) uint8 of one size."""
    first = frames[0]
    if first.dtype != np.uint8:
        return f"frames of dtype {first.dtype}, not uint8"
    if first.ndim != 3 or first.shape[2] != 3:
        return f"frames of shape {tuple(first.shape)}, not (H, W, 3)"
    if any(f.shape != first.shape or f.dtype != first.dtype for f in frames):
        return "frames of differing sizes"
    return None


def _disagreement(path: Path, clip: DecodedClip) -> str | None:
    """Why decord's first sampled frame is not PyAV's decode of it; None when they agree (or PyAV cannot say).

    A shape check alone misses garbage with the right shape, so the content is compared, once per clip:
    PyAV decodes in order up to that frame (a few frames: the first sampled index is n / 2T).
    """
    try:
        reference = decode_frames_at(path, clip.frame_index[:1], "pyav")[0]
    except VideoError:
        return None  # PyAV cannot read it: decord's checked shape is all there is to go on
    if reference.shape != clip.frames[0].shape:
        return f"frames of {clip.width}x{clip.height}, PyAV {reference.shape[1]}x{reference.shape[0]}"
    difference = float(np.abs(reference.astype(np.int16) - clip.frames[0].astype(np.int16)).mean())
    if difference > AGREEMENT:
        return f"frames unlike PyAV's (mean difference {difference:.0f}/255)"
    return None


def decode_sampled(path: str | Path, count: int = 30, decoder: str = "auto") -> DecodedClip:
    """Decode `path` in order and return its `count` segment-centre frames.

    `decoder`: "auto" (decord, checked against PyAV, PyAV where decord's frames are wrong), "decord" or
    "pyav" (that one only, no cross-check). A truncated or damaged stream is cut at the last frame that
    decodes; a stream with no decodable frame raises VideoError with the reason.
    """
    path = Path(path)
    if decoder != "auto":
        return _decode(path, count, decoder)
    try:  # a file decord cannot open or decode at all (another VideoError) is a failed clip, as before
        clip = _decode(path, count, "decord")
        problem = _disagreement(path, clip)
    except MalformedFrames as exc:
        problem = exc.problem
    if problem is None:
        return clip
    try:
        fallback = _decode(path, count, "pyav")
    except VideoError as exc:
        raise VideoError(f"decord gave {problem}; PyAV: {exc}") from None
    fallback.note = f"decord gave {problem}"
    return fallback


def decode_frames_at(path: str | Path, frame_index: np.ndarray, decoder: str = "decord") -> np.ndarray:
    """The frames at `frame_index` (indices among decodable frames), decoded in order by `decoder` (the one
    the cache recorded for the clip): (T, H, W, 3) uint8.

    Used by render and predict to show the very frames whose features were cached.
    """
    wanted = np.asarray(frame_index, dtype=np.int64)
    reader = _open(Path(path), decoder)
    kept, decoded, error = _read_in_order(reader, set(wanted.tolist()), int(wanted.max()) + 1)
    missing = [i for i in wanted.tolist() if i not in kept]
    if missing:
        raise VideoError(f"frame {missing[0]} no longer decodes (only {decoded}; {error or 'end of stream'})")
    frames = [kept[i] for i in wanted.tolist()]
    problem = _malformed(frames)
    if problem:
        raise VideoError(f"{decoder} gave {problem}; it did not when the clip was extracted")
    return np.stack(frames)
