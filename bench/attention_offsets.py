"""Where the attention's peak lies relative to the actor, in grid cells, from evaluate's saved maps.

A diagnosis, not a score: the pointing game only says whether the peak hit the box; this says how it
missed. For every evaluated frame, the offset of the most attended cell's centre from the actor box's
centre, in cells (x in cell widths, y in cell heights), split along the actor's heading (positive: ahead
of it, where it is going) and across it; and the peak's share of the map against the uniform 1/(h w).
Needs the synthetic set's classes (each is a heading: pipeline/video/synthetic.py) and its boxes.json.

    python bench/attention_offsets.py [metrics/attention.npz] [data/videos/boxes.json] [--cache cache/features.h5]
"""
from __future__ import annotations

import argparse

import numpy as np


def offsets(maps: np.ndarray, boxes: np.ndarray, heading: np.ndarray, height: float, width: float) -> np.ndarray:
    """maps (T, h, w), boxes (T, 4), heading (2,) unit -> (T, 3): along, across, distance in cells."""
    t, h, w = maps.shape
    row, col = np.divmod(maps.reshape(t, -1).argmax(axis=1), w)  # (T,) each
    peak = np.stack([(col + 0.5) / w, (row + 0.5) / h], axis=1)  # (T, 2), in frames
    centre = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / width, (boxes[:, 1] + boxes[:, 3]) / 2 / height], axis=1)
    off = (peak - centre) * np.array([w, h])  # (T, 2), in cells
    across = np.array([-heading[1], heading[0]])
    return np.stack([off @ heading, off @ across, np.hypot(off[:, 0], off[:, 1])], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("maps", nargs="?", default="metrics/attention.npz")
    parser.add_argument("boxes", nargs="?", default="data/videos/boxes.json")
    parser.add_argument("--cache", default="cache/features.h5", help="the cache the maps came from (frame sizes)")
    args = parser.parse_args()

    from pipeline.features.reader import open_cache
    from pipeline.report.attention_quality import boxes_at
    from pipeline.video.synthetic import MOTIONS, read_boxes_file

    saved = np.load(args.maps)
    truth = read_boxes_file(args.boxes)
    classes = [str(c) for c in saved["classes"]]
    with open_cache(args.cache) as cache:
        size = {key: (float(h), float(w)) for key, h, w in zip(cache.videos, cache.height, cache.width)}
    rows = []
    for maps, key, label, index in zip(saved["attention"], saved["video"], saved["label"], saved["frame_index"]):
        key = str(key)
        motion = MOTIONS[classes[label]]
        rows.append(offsets(maps, boxes_at(truth[key], index), np.array([motion.dx, motion.dy]), *size[key]))
    along, across, distance = np.concatenate(rows).T
    cells = saved["attention"].shape[-2] * saved["attention"].shape[-1]
    peak = saved["attention"].reshape(*saved["attention"].shape[:2], -1).max(axis=-1)
    print(f"{len(rows)} clips, {len(along)} frames, {saved['attention'].shape[-2]}x{saved['attention'].shape[-1]} grid")
    print(f"peak ahead of the actor along its heading: mean {along.mean():+.2f}, median {np.median(along):+.2f} cells")
    print(f"peak across the heading: mean {across.mean():+.2f}, mean |.| {np.abs(across).mean():.2f} cells")
    print(f"peak to actor centre: median {np.median(distance):.2f} cells; within 0.75: {(distance < 0.75).mean():.0%}, "
          f"0.75-1.5: {((distance >= 0.75) & (distance < 1.5)).mean():.0%}, beyond 1.5: {(distance >= 1.5).mean():.0%}")
    print(f"peak share of the map: mean {peak.mean():.3f} (uniform {1 / cells:.3f})")


if __name__ == "__main__":
    main()
