"""Which frames calibrate an int8 trunk, and when a cache's own calibration is used again instead.

Calibration frames come from the dataset being extracted (its own light, cameras and content set the
activation ranges), chosen deterministically so the same dataset gives the same calibration and the same
bytes: CLIPS clips evenly spaced over the dataset's sorted keys (so over its classes, which sort together),
PER_CLIP frames evenly spaced over each clip's sampled frames, decoded exactly as extraction decodes them.
A clip that does not decode is replaced by the next one in key order.

A cache that already holds int8 features made with the same other settings keeps its calibration: a rerun
(new clips, changed clips, a resume) reuses the record instead of calibrating again, so one cache holds one
calibration even when the dataset grew and the evenly spaced choice would now pick other clips.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

CLIPS = 8  # 8 clips x 8 frames = 64 frames, what the probe used (6.7% pool5 error on the fight set)
PER_CLIP = 8


def choose(keys: Sequence[str], count: int = CLIPS) -> list[int]:
    """Positions in sorted `keys` of the calibration clips: `count` segment centres, then the clips after each
    (in order, wrapping) as replacements. Pure and deterministic: the same keys give the same order."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    n = len(order)
    count = min(count, n)
    if count == 0:
        return []
    picks = [order[int((k + 0.5) * n / count)] for k in range(count)]
    taken = set(picks)
    rest = [i for i in order if i not in taken]
    return picks + rest


def frame_positions(frames: int, per_clip: int = PER_CLIP) -> list[int]:
    """Which of a clip's `frames` sampled frames calibrate: `per_clip` segment centres (all when fewer)."""
    if frames <= per_clip:
        return list(range(frames))
    return [int((k + 0.5) * frames / per_clip) for k in range(per_clip)]


def recorded(cache: Path, settings: dict) -> dict | None:
    """The int8 calibration record of `cache` (its file, else its first unjoined shard) when everything else
    it records matches `settings`; None when there is none to reuse."""
    from pipeline.features.cache import CacheError, main_file
    from pipeline.features.provenance import settings_mismatch
    from pipeline.features.reader import open_cache
    from pipeline.features.shards import pending_shards

    try:
        sources = ([cache] if main_file(cache).exists() else []) + pending_shards(cache)
    except CacheError:
        return None
    for source in sources[:1]:
        try:
            with open_cache(source) as existing:
                record = existing.settings.get("quantization")
                if record in (None, "none"):
                    return None
                if settings_mismatch(existing.settings, dict(settings, quantization=record)):
                    return None
                return record
        except CacheError:
            return None
    return None


def prepare(backbone, cache: Path, clips: Sequence[tuple[str, Path]], frames: int) -> float:
    """Give an int8 `backbone` its calibration: the cache's own (see `recorded`), else one made from `clips`
    (key, path) of the dataset. Returns the seconds it took (decoding, calibration, quantisation; the
    compilation itself happens at the first batch). Where quantising fails, the backbone says so in one line
    and falls back (then nothing needs calibrating)."""
    from pipeline.features.provenance import extraction_settings

    start = time.monotonic()
    record = recorded(cache, extraction_settings(backbone.provenance(), frames))
    if record is not None:
        backbone.use_quantization(record)
        return time.monotonic() - start
    import torch

    from pipeline.video.decode import VideoError, decode_sampled

    keys = [key for key, _ in clips]
    chosen: list[str] = []
    batches = []
    for i in choose(keys):
        if len(chosen) == min(CLIPS, len(keys)):
            break
        try:
            decoded = decode_sampled(clips[i][1], frames)
        except (VideoError, OSError):
            continue
        picked = decoded.frames[frame_positions(len(decoded.frames))]  # (k, H, W, 3) uint8
        batches.append(backbone.preprocess(torch.from_numpy(picked)))
        chosen.append(keys[i])
    if not batches:
        from pipeline.features.extractor import ExtractError

        raise ExtractError("precision int8: no clip of the dataset decodes, so nothing can calibrate the trunk")
    backbone.calibrate(torch.cat(batches), chosen, len(frame_positions(frames)))
    return time.monotonic() - start
