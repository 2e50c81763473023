"""The report's one offline page, index.html, and the folder it lives in.

The page is built from what the head said (metrics, the drawn clips, the charts) and the provenance of the
model and cache; inline CSS, relative image paths, no script, nothing fetched from elsewhere, so the folder
can be copied or mailed and still opens. The markup is a jinja2 template (templates/index.html.j2) rendered
with autoescape on: every value is escaped (clip keys are file names, class names are folder names).

A report is built in a fresh work folder and swapped in (`fresh_work_dir`, `swap_in`), so no file of an
earlier render lingers and a crash leaves the earlier report whole.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import jinja2

from pipeline.head import checkpoint as ck
from pipeline.report import overlay
from pipeline.report.clips import Predicted, RenderedClip, RenderSummary
from pipeline.report.metrics import accuracy_report
from pipeline.stamps import source_date

OUTPUTS = ("clips", "curves.png", "confusion.png", "deletion.png", "index.html")  # what a render owns inside out_dir


# --- which metrics ----------------------------------------------------------------------------------------


def read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    """A JSON object from `path`; None when missing or not an object (unreadable: a note, not a failure)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"{path} ignored: not readable JSON ({exc.__class__.__name__})")
        return None
    return data if isinstance(data, dict) else None


def page_metrics(metrics_dir: Path, split_out: Predicted | None, ckpt: ck.Checkpoint,
                 summary: RenderSummary) -> dict[str, Any] | None:
    """eval.json when present and about these classes; else accuracy computed from the split rendered."""
    path = Path(metrics_dir) / "eval.json"
    report = read_json(path, summary.notes)
    if report is not None and (report.get("confusion") or {}).get("classes") == list(ckpt.classes):
        summary.metrics_source = f"{path} (split '{report.get('split')}')"
        model = report.get("model") or {}
        if model.get("epoch") != ckpt.train.get("epoch") or model.get("weights") != ckpt.extraction.get("weights"):
            summary.notes.append(f"{path} may describe another model (epoch {model.get('epoch')}, this one "
                                 f"{ckpt.train.get('epoch')}); rerun evaluate")
        return report
    if report is not None:
        summary.notes.append(f"{path} ignored: its classes are not the model's")
    if split_out is None:
        summary.notes.append("no metrics: no eval.json and no split to compute them from")
        return None
    summary.metrics_source = f"computed by render on split '{summary.split}' (no eval.json: accuracy only)"
    report = accuracy_report(split_out.outputs, list(ckpt.classes))
    return {"split": summary.split, "clips": len(split_out.keys), **report}


# --- the work folder ------------------------------------------------------------------------------------


def fresh_work_dir(out_dir: Path) -> Path:
    """An empty folder inside `out_dir` (same filesystem, so the swap is renames) to build a report in."""
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f".render-{os.getpid()}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


def swap_in(work: Path, out_dir: Path) -> None:
    """Move the new outputs over the old: clips/ by rename-aside, files by atomic replace, index.html last."""
    old = out_dir / f".clips-old-{os.getpid()}.tmp"
    target = out_dir / "clips"
    if target.exists():
        os.replace(target, old)
    os.replace(work / "clips", target)
    shutil.rmtree(old, ignore_errors=True)
    for name in ("curves.png", "confusion.png", "deletion.png"):
        if (work / name).exists():
            os.replace(work / name, out_dir / name)
        else:
            (out_dir / name).unlink(missing_ok=True)  # from an earlier render: no longer backed by data
    os.replace(work / "index.html", out_dir / "index.html")


# --- the page ---------------------------------------------------------------------------------------------
# What the page shows is gathered here as plain values (numbers already formatted); the markup is the
# template's, templates/index.html.j2, rendered with autoescape on, so every value is escaped there.

TEMPLATE = "index.html.j2"


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("pipeline.report", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _src(relative: Path | str) -> str:
    """A relative image path, URL-quoted (the template escapes it as an attribute value)."""
    return quote(Path(relative).as_posix())


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.1%}"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "-"
    return "-" if value is None else str(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _x(ratio: Any) -> str:
    """" (x2.40)": a ratio to uniform attention's figure, or nothing when there is none."""
    return f" (x{ratio:.2f})" if isinstance(ratio, (int, float)) else ""


def _times(value: Any) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else "-"


def _metrics(metrics: dict[str, Any] | None, source: str) -> dict[str, Any] | None:
    """The metrics table: rows of (metric, model, baseline)."""
    if not metrics:
        return None
    top_key = next((k for k in metrics if k.startswith("top") and k.endswith("_accuracy")), None)
    rows = [["video accuracy", _pct(metrics.get("video_accuracy")),
             f"{_pct(metrics.get('chance'))} chance" + _probe(metrics)],
            ["per-frame accuracy", _pct(metrics.get("frame_accuracy")), ""]]
    if top_key:
        rows.append([top_key.replace("_", " "), _pct(metrics.get(top_key)), ""])
    entropy = metrics.get("entropy") or {}
    if entropy:
        motion = f", {_num(entropy['motion'])} motion map" if entropy.get("motion") is not None else ""
        rows.append(["attention entropy (nats)", _num(entropy.get("mean")),
                     f"{_num(entropy.get('uniform'))} uniform{motion}"])
    att = metrics.get("attention") or {}
    if att.get("clips_with_boxes"):
        motion = att.get("mass_in_box_motion") is not None  # the motion-map baseline (absent in older reports)
        rows.append(["attention mass in the actor's box", _pct(att.get("mass_in_box")) + _x(att.get("mass_ratio")),
                     f"{_pct(att.get('mass_in_box_uniform'))} uniform, {_pct(att.get('mass_in_box_centre'))} "
                     f"centre prior{_x(att.get('mass_ratio_centre'))}"
                     + (f", {_pct(att.get('mass_in_box_motion'))} motion map{_x(att.get('mass_ratio_motion'))}"
                        if motion else "")])
        rows.append(["pointing accuracy (argmax cell in box)", _pct(att.get("pointing")),
                     f"{_pct(att.get('pointing_uniform'))} uniform, {_pct(att.get('pointing_centre'))} centre prior"
                     + (f", {_pct(att.get('pointing_motion'))} motion map" if motion else "")])
        if att.get("frames_without_box"):
            rows.append(["sampled frames scored (with a box)", _text(att.get("frames_scored")),
                         f"{_text(att.get('frames_without_box'))} without a box, not scored"])
    elif "attention" in metrics:
        rows.append(["attention vs ground truth", "no ground-truth boxes", ""])
    return {"source": source, "clips": _text(metrics.get("clips")), "rows": rows}


def _probe(metrics: dict[str, Any]) -> str:
    """", 93.8% linear probe": the baseline beside the head's accuracy (absent in older reports)."""
    accuracy = ((metrics.get("baselines") or {}).get("linear_probe") or {}).get("video_accuracy")
    return f", {_pct(accuracy)} linear probe on the mean feature" if accuracy is not None else ""


def _per_class(metrics: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per-class accuracy rows; `width` is the bar's length in pixels (100 for all right)."""
    rows = []
    for name, entry in ((metrics or {}).get("per_class") or {}).items():
        acc = entry.get("accuracy")
        rows.append({"name": name, "clips": _text(entry.get("clips")), "accuracy": _pct(acc),
                     "width": int(round(100 * acc)) if isinstance(acc, (int, float)) else 0})
    return rows


def _localisation(metrics: dict[str, Any] | None) -> list[list[str]]:
    """Localisation per class (where boxes exist): is the map where the actor is?"""
    per_class = ((metrics or {}).get("attention") or {}).get("per_class") or {}
    return [[name, _text(e.get("clips_with_boxes")), _pct(e.get("mass_in_box")) + _x(e.get("mass_ratio")),
             _pct(e.get("mass_in_box_centre")), _pct(e.get("mass_in_box_motion")) + _x(e.get("mass_ratio_motion")),
             _pct(e.get("pointing")), _pct(e.get("pointing_centre")), _pct(e.get("pointing_motion"))]
            for name, e in per_class.items()]


def _deletion(metrics: dict[str, Any] | None, figures: dict[str, str]) -> dict[str, Any] | None:
    """The deletion test's table and, where it was drawn, its curve with the caption's figures."""
    deletion = (metrics or {}).get("deletion") or {}
    if not deletion.get("k"):
        return None
    base = deletion["unmodified"]
    rows = [["none", _pct(base["video_accuracy"]), _num(base["true_probability"]), "", ""]]
    for k, row in deletion["k"].items():
        rand = row["random"]
        rows.append([f"top {k} attended cells", _pct(row["top"]["video_accuracy"]),
                     _num(row["top"]["true_probability"]),
                     f"{_pct(rand['video_accuracy'])} ± {_pct(rand['video_accuracy_std'])}",
                     f"{_num(rand['true_probability'])} ± {_num(rand['true_probability_std'])}"])
    figure = None
    if "deletion" in figures:
        curve, area, ratio = deletion["curve"], deletion.get("area_between") or {}, deletion.get("drop_ratio") or {}
        figure = {"src": _src(figures["deletion"]), "k_first": curve["k"][0], "k_last": curve["k"][-1],
                  "cells": _text(curve.get("cells")), "area_probability": _num(area.get("probability")),
                  "area_accuracy": _pct(area.get("accuracy")), "ratio_5": _times(ratio.get("5")),
                  "ratio_curve": _times(ratio.get("curve"))}
    return {"draws": _text(deletion.get("random_draws")), "rows": rows, "figure": figure}


def _ratio_label(ratio: float) -> str:
    """1/8 -> "1/8x", 16 -> "16x": as the colour bar labels the scale's ends."""
    return f"1/{1 / ratio:g}x" if ratio < 1 else f"{ratio:g}x"


def _colour_scale(feature_shape: Sequence[int]) -> dict[str, str]:
    """What the overlay's colours mean (pipeline/report/overlay.py: `blend`, `on_scale`, the colour bar)."""
    h, w = (int(v) for v in tuple(feature_shape)[-2:])
    low, high = overlay.RATIO_RANGE
    return {"share": f"1/{h * w} of the map on this {h}x{w} grid", "colour_map": overlay.COLOUR_MAP,
            "low": _ratio_label(low), "high": _ratio_label(high)}


def _clip(clip: RenderedClip) -> dict[str, Any]:
    return {"key": clip.key, "true": clip.true, "predicted": clip.predicted, "probability": f"{clip.probability:.1%}",
            "correct": clip.correct, "skipped": clip.skipped,
            "strip": _src(clip.strip) if clip.strip is not None else None,
            "animation": _src(clip.animation) if clip.animation is not None else None}


def _provenance(ckpt: ck.Checkpoint, model_path: Path) -> list[tuple[str, str, bool]]:
    """(label, value, shown as code) rows of what made the model; the rendered cache's rows are the template's."""
    head = dataclasses.asdict(ckpt.head)
    train = {k: v for k, v in ckpt.train.items() if not isinstance(v, (dict, list))}
    rows = [("model", str(model_path), True),
            ("head", ", ".join(f"{k}={v}" for k, v in head.items()), False),
            ("classes", f"{len(ckpt.classes)}: {', '.join(ckpt.classes)}", False),
            ("feature shape [T, C, h, w]", str(ckpt.feature_shape), False),
            ("training", ", ".join(f"{k}={v}" for k, v in train.items()), False)]
    rows += [(f"extraction: {key}", _text(value), True) for key, value in ckpt.extraction.items()]
    rows += [(f"trained on cache: {key}", json.dumps(value) if isinstance(value, dict) else _text(value), True)
             for key, value in (ckpt.cache or {}).items()]
    return rows


def render_page(summary: RenderSummary, metrics: dict[str, Any] | None, train: dict[str, Any] | None,
                figures: dict[str, str], ckpt: ck.Checkpoint, origin: dict[str, Any], cache_path: Path,
                model_path: Path) -> str:
    """The whole index.html: inline CSS, relative image paths, no script, nothing fetched from elsewhere."""
    versions = origin.get("versions")
    context = {
        "split": summary.split, "head_label": ckpt.head.label, "model_path": str(model_path),
        "now": source_date(), "notes": list(summary.notes),  # "now": no wall-clock time, or clones differ
        "metrics": _metrics(metrics, summary.metrics_source),
        "train_rows": [[k, _num(v)] for k, v in (train or {}).items() if not isinstance(v, (dict, list))],
        "per_class": _per_class(metrics), "localisation": _localisation(metrics),
        "deletion": _deletion(metrics, figures),
        "figures": {name: _src(figures[name]) if name in figures else None for name in ("curves", "confusion")},
        "confusion_split": _text((metrics or {}).get("split")),
        "clips": {"rendered": len(summary.rendered), "skipped": summary.skipped,
                  "cards": [_clip(c) for c in summary.clips]},
        "scale": _colour_scale(ckpt.feature_shape),
        "provenance": _provenance(ckpt, model_path),
        "cache": {"path": str(cache_path), "created": _text(origin.get("created")) if origin.get("created") else "",
                  "dataset_root": _text(origin.get("dataset_root")),
                  "versions": json.dumps(versions) if versions else ""},
    }
    return _environment().get_template(TEMPLATE).render(context)
