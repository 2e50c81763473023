"""The motion map of every evaluated clip, the baseline a learned attention map must beat.

A map that only follows what moves costs nothing: M~_t comes from the cached features alone (docs/DESIGN.md,
"The head", motion; pipeline/features/motion.py). evaluate scores it against the boxes exactly as it
scores the attention (pipeline/report/attention_quality.py), so a head's localisation is read beside what a
frame difference gives for free. torch is imported when a map is computed, not when this module is.
"""
from __future__ import annotations

import numpy as np


def motion_maps(clips, batch_size: int, device=None) -> np.ndarray:
    """M~_t of every clip of a ClipSet (pipeline/head/batches.py), in the set's order: (N, T, h, w) float32,
    each frame summing to 1. `device`: where to compute (default the CPU; the maps are small either way)."""
    import torch

    from pipeline.features.motion import motion_map

    maps = []
    with torch.inference_mode():
        for batch in clips.batches(batch_size):
            x = batch.features if device is None else batch.features.to(device)  # (B, T, C, h, w) float16
            maps.append(motion_map(x).cpu().numpy())  # (B, T, h, w) float32
    t, _, h, w = clips.cache.feature_shape
    return np.concatenate(maps) if maps else np.zeros((0, t, h, w), np.float32)
