"""The figures `evaluate` reports (and `render` shows): accuracy, localisation against boxes, the CSVs and
the saved maps.

Video and per-frame accuracy are the head's `accuracies`, each clip's hit its `is_correct` (pipeline/head/infer.py:
one definition for the curves, the metrics and the deletion test).
Pure numpy over the head's outputs, so they can be computed again from saved outputs or by other tools.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np

from pipeline.files import atomic_file
from pipeline.head.infer import accuracies, is_correct
from pipeline.report import attention_quality as aq
from pipeline.report import bootstrap
from pipeline.video.boxes import VideoBoxes


def accuracy_report(outputs, classes: list[str], motion: np.ndarray | None = None) -> dict[str, Any]:
    """Video, per-frame and top-5 accuracy, per-class accuracy, confusion matrix, mean attention entropy
    (beside uniform's and, given the clips' motion maps (N, T, h, w), the motion map's: a head whose maps
    are no sharper than the motion map adds no focus of its own)."""
    probs = outputs.probabilities  # (N, K)
    labels = outputs.labels
    k = len(classes)
    predicted = probs.argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    top = min(5, k)
    top_k = np.argsort(-probs, axis=1)[:, :top] if len(labels) else np.zeros((0, top), np.int64)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    for i, name in enumerate(classes):
        n = int(confusion[i].sum())
        per_class[name] = {"clips": n, "accuracy": _num(confusion[i, i] / n) if n else None}
    t, h, w = outputs.attention.shape[1:] if outputs.attention.ndim == 4 else (0, 1, 1)
    entropy = aq.entropy(outputs.attention) if len(labels) else np.zeros(0)
    right = is_correct(probs, labels).astype(np.float64) if len(labels) else np.zeros(0)  # (N,), for the interval
    video, frame = accuracies(outputs)  # nan (shown as None) without clips
    return {
        "video_accuracy": _num(video),
        "video_accuracy_ci": bootstrap.interval(right, np.mean),
        "frame_accuracy": _num(frame),
        f"top{top}_accuracy": _num(np.mean((top_k == labels[:, None]).any(axis=1))) if len(labels) else None,
        "chance": _num(1.0 / k),
        "per_class": per_class,
        "confusion": {"classes": list(classes), "matrix": confusion.tolist()},
        "entropy": {"mean": _num(entropy.mean()) if entropy.size else None, "uniform": _num(math.log(h * w)),
                    "motion": _num(aq.entropy(motion).mean()) if motion is not None and motion.size else None},
    }


def attention_report(attention: np.ndarray, videos: list[str], truth: dict[str, Any],
                     frame_index: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                     labels: np.ndarray | None = None, classes: list[str] | None = None,
                     motion: np.ndarray | None = None) -> dict[str, Any]:
    """Mass in box and pointing over the sampled frames with a box of every clip with boxes, each beside
    uniform attention, the centre prior and (given `motion`) the motion map, with 95% bootstrap intervals over
    clips, overall and per class.

    attention (N, T, h, w); truth {key: VideoBoxes or (frames, 4) one box a frame}; frame_index (N, T);
    heights, widths (N,); labels (N,) into `classes`; motion (N, T, h, w), the clips' motion maps.
    Sampled frames without a box are skipped and counted; a clip without a box at any of them adds nothing
    but that count.
    """
    scored, which, missed = [], [], []  # missed: (clip, sampled frames) of clips in truth with no box at any
    for i, video in enumerate(videos):
        if video not in truth:
            continue
        boxes = VideoBoxes.of(truth[video]).at(frame_index[i], float(heights[i]), float(widths[i]))
        score = aq.score_clip(attention[i], boxes, float(heights[i]), float(widths[i]),
                              None if motion is None else motion[i])
        if score.frames_scored:
            scored.append(score)
            which.append(i)
        else:
            missed.append((i, score.frames_without_box))
    report = _localisation(scored, sum(n for _, n in missed), len(missed))
    if labels is not None and classes is not None and scored:
        per_class = {}
        for k, name in enumerate(classes):
            members = [s for s, i in zip(scored, which) if int(labels[i]) == k]
            lost = [n for i, n in missed if int(labels[i]) == k]
            if members:
                per_class[name] = _localisation(members, sum(lost), len(lost), intervals=False)
        report["per_class"] = per_class
    return report


FIGURES = ("mass", "mass_uniform", "mass_centre", "pointing", "pointing_uniform", "pointing_centre",
           "mass_motion", "pointing_motion")
KEYS = ("mass_in_box", "mass_in_box_uniform", "mass_in_box_centre", "mass_in_box_motion", "mass_ratio",
        "mass_ratio_centre", "mass_ratio_motion", "pointing", "pointing_uniform", "pointing_centre", "pointing_motion")


def _localisation(scored: list, frames_unboxed: int = 0, clips_unboxed: int = 0,
                  intervals: bool = True) -> dict[str, Any]:
    """The figures over `scored` clips (each clip's mean over its frames with a box, then the mean over clips);
    `frames_unboxed`, `clips_unboxed`: what clips with no box at any sampled frame add to the counts."""
    counts = {"clips_with_boxes": len(scored), "clips_without_box": clips_unboxed,
              "frames_scored": int(sum(s.frames_scored for s in scored)),
              "frames_without_box": int(sum(s.frames_without_box for s in scored)) + frames_unboxed}
    if not scored:
        return {"clips_with_boxes": 0, **{key: None for key in KEYS}, **counts}
    per_clip = np.array([[_mean(getattr(s, name)) for name in FIGURES] for s in scored])  # (N, 8), nan: no motion
    mean = dict(zip(FIGURES, per_clip.mean(axis=0)))

    def ratio(rows: np.ndarray, of: int = 0, to: int = 1) -> float:
        denominator = rows[:, to].mean()
        return rows[:, of].mean() / denominator if denominator > 0 else math.nan

    report = {
        "clips_with_boxes": len(scored),
        "mass_in_box": _num(mean["mass"]), "mass_in_box_uniform": _num(mean["mass_uniform"]),
        "mass_in_box_centre": _num(mean["mass_centre"]), "mass_in_box_motion": _num(mean["mass_motion"]),
        "mass_ratio": _num(ratio(per_clip)),  # model / uniform: 1 = no better than uniform attention
        "mass_ratio_centre": _num(ratio(per_clip, 2, 1)),  # centre prior / uniform, on the same scale
        "mass_ratio_motion": _num(ratio(per_clip, 6, 1)),  # motion map / uniform, on the same scale
        "pointing": _num(mean["pointing"]), "pointing_uniform": _num(mean["pointing_uniform"]),
        "pointing_centre": _num(mean["pointing_centre"]), "pointing_motion": _num(mean["pointing_motion"]),
        **counts,
    }
    if intervals:
        report["mass_ratio_ci"] = bootstrap.interval(per_clip, ratio)
        report["pointing_ci"] = bootstrap.interval(per_clip, lambda rows: rows[:, 3].mean())
    return report


def _mean(values: np.ndarray | None) -> float:
    return math.nan if values is None else float(values.mean())


def _num(value: float) -> float | None:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def predictions_csv(keys: list[str], outputs, classes: list[str]) -> str:
    probs = outputs.probabilities
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["video", "true", "predicted", "probability"])
    for key, label, p in zip(keys, outputs.labels, probs):
        best = int(p.argmax())
        writer.writerow([key, classes[int(label)], classes[best], f"{p[best]:.6f}"])
    return buf.getvalue()


def confusion_csv(keys: list[str], outputs, classes: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["video", "actual", "predicted"])
    for key, label, p in zip(keys, outputs.labels, outputs.probabilities):
        writer.writerow([key, classes[int(label)], classes[int(p.argmax())]])
    return buf.getvalue()


def write_maps(path, keys: list[str], outputs, frame_index: np.ndarray, classes: list[str]) -> None:
    """The maps as numpy arrays any tool reads (no pickle): attention (N, T, h, w) float32, video (N,),
    label (N,) into classes, frame_index (N, T) of the frames they were computed on."""
    with atomic_file(path) as handle:
        np.savez_compressed(handle, attention=outputs.attention.astype(np.float32), video=np.array(keys, dtype=str),
                            label=outputs.labels.astype(np.int64), classes=np.array(classes, dtype=str),
                            frame_index=frame_index.astype(np.int32))
