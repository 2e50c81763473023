"""Stage `evaluate`: apply a trained head to one split of the cache and say how good it is.

Writes `<out>/eval.json` (DVC metrics), `<out>/predictions.csv` (video, true, predicted, probability) and
`<plots>/confusion.csv` (one actual,predicted row per clip: DVC's confusion template). Attention quality
(mass inside the actor's box, pointing accuracy, each beside its uniform-attention baseline) is measured
when ground-truth boxes exist: `boxes.json` in the cache's dataset root (the synthetic set writes it) or
the file given with --boxes.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import attention_quality as aq
from pipeline import checkpoint as ck
from pipeline.batches import open_split
from pipeline.config import ConfigError, EvaluateConfig, check
from pipeline.data import dataset_roots, first_existing
from pipeline.features import FeatureCache
from pipeline.files import write_json_atomic, write_text_atomic
from pipeline.progress import progress_bar
from pipeline.synthetic import BOXES_FILE, read_boxes_file

def run(cache_path: Path, splits_dir: Path, model_path: Path, out_dir: Path, cfg: EvaluateConfig, *,
        boxes: Path | None = None, plots_dir: Path = Path("plots/eval"), device: str = "auto",
        progress: bool = True, videos: Path | None = None) -> dict[str, Any]:
    """Evaluate `model_path` on split `cfg.split`; write the three outputs; return the eval.json dict."""
    from pipeline import training as tr

    cfg = check(cfg)
    ckpt = ck.load(model_path)
    with FeatureCache(cache_path) as cache:
        extraction, _ = ck.cache_provenance(cache)
        ck.require_same_extraction(ckpt, extraction, str(cache_path))
        ck.require_classes(ckpt, cache.classes, str(cache_path))
        clips = open_split(cache, splits_dir, cfg.split)
        dev = tr.pick_device(device)
        model = ckpt.build().to(dev)
        with progress_bar("evaluate", len(clips), "clips", enabled=progress) as bar:
            outputs = tr.infer(model, clips, cfg.batch_size, dev, on_batch=bar.advance)
        looked = _boxes_candidates(boxes, cache, videos)
        truth_path = first_existing(looked)
        truth = _read_truth(truth_path)
        rows = clips.index
        attention = attention_report(outputs.attention, [cache.videos[i] for i in rows], truth,
                                     cache.frame_index[rows], cache.height[rows], cache.width[rows])
    report = accuracy_report(outputs, ckpt.classes)
    report = {"split": cfg.split, "clips": len(clips), **report,
              "attention": dict(attention, boxes=_shown(truth_path) if truth_path else None,
                                looked_for_boxes=[_shown(p) for p in looked] if not truth else []),
              "model": {"path": str(model_path), "head": ckpt.head.label,
                        "epoch": ckpt.train.get("epoch"), "weights": ckpt.extraction.get("weights")}}
    write_json_atomic(Path(out_dir) / "eval.json", report)
    write_text_atomic(Path(out_dir) / "predictions.csv", predictions_csv(clips.keys, outputs, ckpt.classes))
    write_text_atomic(Path(plots_dir) / "confusion.csv", confusion_csv(clips.keys, outputs, ckpt.classes))
    return report


def _shown(path: Path) -> str:
    """A path as metrics show it: relative to the working directory when inside it, so checkouts compare."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _boxes_candidates(boxes: Path | None, cache: FeatureCache, videos: Path | None) -> list[Path]:
    """--boxes alone when given (it must exist); else boxes.json in the cache's recorded dataset root, then
    in params.yaml's data.videos (a moved or cloned project still finds it there)."""
    if boxes is not None:
        if not Path(boxes).is_file():
            raise ConfigError(f"{boxes}: no such boxes file")
        return [Path(boxes)]
    return [root / BOXES_FILE for root in dataset_roots(None, cache.attrs.get("dataset_root"), videos)]


def _read_truth(path: Path | None) -> dict[str, np.ndarray]:
    if path is None:
        return {}
    try:
        return read_boxes_file(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


# --- the figures ------------------------------------------------------------------------------------------


def accuracy_report(outputs, classes: list[str]) -> dict[str, Any]:
    """Video, per-frame and top-5 accuracy, per-class accuracy, confusion matrix, mean attention entropy."""
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
    return {
        "video_accuracy": _num(np.mean(predicted == labels)) if len(labels) else None,
        "frame_accuracy": _num(np.mean(outputs.logits.argmax(2) == labels[:, None])) if len(labels) else None,
        f"top{top}_accuracy": _num(np.mean((top_k == labels[:, None]).any(axis=1))) if len(labels) else None,
        "chance": _num(1.0 / k),
        "per_class": per_class,
        "confusion": {"classes": list(classes), "matrix": confusion.tolist()},
        "entropy": {"mean": _num(entropy.mean()) if entropy.size else None, "uniform": _num(math.log(h * w))},
    }


def attention_report(attention: np.ndarray, videos: list[str], truth: dict[str, np.ndarray],
                     frame_index: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> dict[str, Any]:
    """Mean mass-in-box and pointing accuracy over every sampled frame of every clip that has boxes."""
    scored = []
    for i, video in enumerate(videos):
        boxes = truth.get(video)
        if boxes is None or len(boxes) == 0:
            continue
        scored.append(aq.score_clip(attention[i], aq.boxes_at(boxes, frame_index[i]), float(heights[i]),
                                    float(widths[i])))
    if not scored:
        return {"clips_with_boxes": 0, "mass_in_box": None, "mass_in_box_uniform": None, "mass_ratio": None,
                "pointing": None, "pointing_uniform": None}
    mass = float(np.mean([s.mass.mean() for s in scored]))
    uniform = float(np.mean([s.mass_uniform.mean() for s in scored]))
    return {
        "clips_with_boxes": len(scored),
        "mass_in_box": _num(mass), "mass_in_box_uniform": _num(uniform),
        "mass_ratio": _num(mass / uniform) if uniform > 0 else None,
        "pointing": _num(np.mean([s.pointing.mean() for s in scored])),
        "pointing_uniform": _num(np.mean([s.pointing_uniform.mean() for s in scored])),
    }


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


# --- the table ----------------------------------------------------------------------------------------------


def _times(ratio: float | None) -> str:
    """" (x0.61)", or nothing when there is no ratio (boxes of zero area: the uniform share is 0)."""
    return "" if ratio is None else f" (x{ratio:.2f})"


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    table = Table(title=f"evaluate: {escape(report['model']['head'])} on {report['split']} ({report['clips']} clips)")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("baseline", justify="right")
    top_key = next(k for k in report if k.startswith("top") and k.endswith("_accuracy"))
    table.add_row("video accuracy", pct(report["video_accuracy"]), f"{pct(report['chance'])} chance")
    table.add_row("per-frame accuracy", pct(report["frame_accuracy"]), "")
    table.add_row(top_key.replace("_", " "), pct(report[top_key]), "")
    entropy = report["entropy"]
    table.add_row("attention entropy (nats)", "-" if entropy["mean"] is None else f"{entropy['mean']:.3f}",
                  f"{entropy['uniform']:.3f} uniform")
    att = report["attention"]
    if att["clips_with_boxes"]:
        table.add_row("attention mass in box", pct(att["mass_in_box"]),
                      f"{pct(att['mass_in_box_uniform'])} uniform" + _times(att["mass_ratio"]))
        table.add_row("pointing accuracy", pct(att["pointing"]), f"{pct(att['pointing_uniform'])} uniform")
    else:
        table.add_row("attention vs boxes", "no ground-truth boxes", "")
    console = Console()
    console.print(table)
    if att["boxes"] and not att["clips_with_boxes"]:
        console.print(f"  [yellow]note[/] {escape(att['boxes'])} holds no boxes for the {report['clips']} evaluated "
                      "clips", highlight=False)
    elif not att["clips_with_boxes"]:
        looked = ", ".join(att.get("looked_for_boxes") or []) or "nowhere (the cache records no dataset root)"
        console.print(f"  [yellow]note[/] no ground-truth boxes: looked for {escape(looked)}; --boxes FILE points "
                      "elsewhere", highlight=False)
    elif att["clips_with_boxes"] < report["clips"]:
        console.print(f"  [yellow]note[/] boxes for {att['clips_with_boxes']} of {report['clips']} clips only; the "
                      "attention figures are over those", highlight=False)
    if att["clips_with_boxes"] and att["mass_ratio"] is None:
        console.print("  [yellow]note[/] the boxes are degenerate (zero area): no mass ratio", highlight=False)
    worst = sorted(((v["accuracy"], k) for k, v in report["per_class"].items() if v["accuracy"] is not None))[:3]
    if worst and worst[0][0] < 1.0:
        console.print("lowest classes: " + escape(", ".join(f"{k} {pct(a)}" for a, k in worst)), highlight=False)
