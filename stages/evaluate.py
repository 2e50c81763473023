"""Stage `evaluate`: apply a trained head to one split of the cache and say how good it is, and how
faithful and how well placed its attention is.

Writes `<out>/eval.json` (DVC metrics), `<out>/predictions.csv` (video, true, predicted, probability),
`<out>/attention.npz` (the split's attention maps, N x T x h x w, with the clip keys, for measures of your
own) and `<plots>/confusion.csv` (DVC's confusion template). Two measures of the attention:
* localisation, where ground-truth boxes exist (`boxes.json` in the dataset root, or --boxes): mass in the
  box and the pointing game, beside uniform attention and a centre prior, overall and per class;
* faithfulness, on any dataset: the deletion test (pipeline/report/faithfulness.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.head import checkpoint as ck
from pipeline.report import faithfulness
from pipeline.report import metrics
from pipeline.head.batches import open_split
from pipeline.config import ConfigError, EvaluateConfig, check
from pipeline.video.folders import dataset_roots, first_existing
from pipeline.features.cache import FeatureCache
from pipeline.files import atomic_file, write_json_atomic, write_text_atomic
from pipeline.progress import progress_bar
from pipeline.video.synthetic import BOXES_FILE, read_boxes_file

MAPS_FILE = "attention.npz"


def run(cache_path: Path, splits_dir: Path, model_path: Path, out_dir: Path, cfg: EvaluateConfig, *,
        boxes: Path | None = None, plots_dir: Path = Path("plots/eval"), device: str = "auto",
        progress: bool = True, videos: Path | None = None) -> dict[str, Any]:
    """Evaluate `model_path` on split `cfg.split`; write the four outputs; return the eval.json dict."""
    from pipeline.head import training as tr

    cfg = check(cfg)
    ckpt = ck.load(model_path)
    with FeatureCache(cache_path) as cache:
        extraction, _ = ck.cache_provenance(cache)
        ck.require_same_extraction(ckpt, extraction, str(cache_path))
        ck.require_classes(ckpt, cache.classes, str(cache_path))
        clips = open_split(cache, splits_dir, cfg.split)
        dev = tr.pick_device(device)
        model = ckpt.build().to(dev)
        cells = int(np.prod(cache.feature_shape[2:]))
        passes = 1 + (2 * len(faithfulness.applicable(faithfulness.K, cells)) if cfg.deletion_draws else 0)
        with progress_bar("evaluate", passes, "passes", enabled=progress) as bar:
            outputs = tr.infer(model, clips, cfg.batch_size, dev)
            bar.advance(note="accuracy")
            deletion = None
            if cfg.deletion_draws:
                def rerun(keep):
                    return tr.infer(model, clips, cfg.batch_size, dev, keep=keep).probabilities

                deletion = faithfulness.deletion_test(rerun, outputs.attention, outputs.labels, cfg.deletion_draws,
                                                      on_pass=lambda: bar.advance(note="deletion test"))
        looked = _boxes_candidates(boxes, cache, videos)
        truth_path = first_existing(looked)
        truth = _read_truth(truth_path)
        rows = clips.index
        frame_index = cache.frame_index[rows]  # (N, T)
        attention = metrics.attention_report(outputs.attention, [cache.videos[i] for i in rows], truth,
                                             frame_index, cache.height[rows], cache.width[rows],
                                             outputs.labels, ckpt.classes)
    report = metrics.accuracy_report(outputs, ckpt.classes)
    report = {"split": cfg.split, "clips": len(clips), **report,
              "attention": dict(attention, boxes=_shown(truth_path) if truth_path else None,
                                looked_for_boxes=[_shown(p) for p in looked] if not truth else []),
              "deletion": deletion,
              "model": {"path": str(model_path), "head": ckpt.head.label,
                        "epoch": ckpt.train.get("epoch"), "weights": ckpt.extraction.get("weights")}}
    write_json_atomic(Path(out_dir) / "eval.json", report)
    write_text_atomic(Path(out_dir) / "predictions.csv", metrics.predictions_csv(clips.keys, outputs, ckpt.classes))
    write_text_atomic(Path(plots_dir) / "confusion.csv", metrics.confusion_csv(clips.keys, outputs, ckpt.classes))
    _write_maps(Path(out_dir) / MAPS_FILE, clips.keys, outputs, frame_index, ckpt.classes)
    return report


def _write_maps(path: Path, keys: list[str], outputs, frame_index: np.ndarray, classes: list[str]) -> None:
    """The maps as numpy arrays any tool reads (no pickle): attention (N, T, h, w) float32, video (N,),
    label (N,) into classes, frame_index (N, T) of the frames they were computed on."""
    with atomic_file(path) as handle:
        np.savez_compressed(handle, attention=outputs.attention.astype(np.float32), video=np.array(keys, dtype=str),
                            label=outputs.labels.astype(np.int64), classes=np.array(classes, dtype=str),
                            frame_index=frame_index.astype(np.int32))


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
        table.add_row("attention mass in box", pct(att["mass_in_box"]) + _times(att["mass_ratio"]),
                      f"{pct(att['mass_in_box_uniform'])} uniform, {pct(att.get('mass_in_box_centre'))} centre prior"
                      + _times(att.get("mass_ratio_centre")))
        table.add_row("pointing accuracy", pct(att["pointing"]),
                      f"{pct(att['pointing_uniform'])} uniform, {pct(att.get('pointing_centre'))} centre prior")
    else:
        table.add_row("attention vs boxes", "no ground-truth boxes", "")
    deletion = report.get("deletion") or {}
    for k, row in deletion.get("k", {}).items():
        rand = row["random"]
        table.add_row(f"true-class p, top-{k} cells deleted", f"{row['top']['true_probability']:.3f}",
                      f"{rand['true_probability']:.3f} ± {rand['true_probability_std']:.3f} random-{k}, "
                      f"{deletion['unmodified']['true_probability']:.3f} none")
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
