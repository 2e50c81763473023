"""The report's one offline page, index.html, and the folder it lives in.

The page is built from what the head said (metrics, the drawn clips, the charts) and the provenance of the
model and cache; inline CSS, relative image paths, no script, nothing fetched from elsewhere, so the folder
can be copied or mailed and still opens. Every value is escaped (`_e`, `_src`): clip keys are file names.

A report is built in a fresh work folder and swapped in (`fresh_work_dir`, `swap_in`), so no file of an
earlier render lingers and a crash leaves the earlier report whole.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from pipeline.head import checkpoint as ck
from pipeline.report.clips import Predicted, RenderedClip, RenderSummary
from pipeline.report.metrics import accuracy_report

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


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1200px;padding:1em 2em;color:#1a1a1a;background:#fff}
h1{font-size:1.6em;margin:.3em 0}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.3em .8em;margin:.3em 0}
.skip{background:#fdecea;border-left:4px solid #d93025;padding:.3em .8em;margin:.3em 0}
.clip{border:1px solid #ddd;border-radius:6px;padding:.6em;margin:1em 0}
.clip h3{margin:.1em 0 .4em;font-size:1.05em;word-break:break-all}
.right{color:#137333;font-weight:bold}.wrong{color:#c5221f;font-weight:bold}
.clip img{max-width:100%;height:auto;margin-right:.6em;vertical-align:top}
.bar{display:inline-block;height:.8em;background:#4a90d9;vertical-align:middle}
figure{margin:.5em 0}figcaption{color:#555;font-size:.9em}code{font-size:.92em;word-break:break-all}
.muted{color:#666}
"""


def _e(value: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape("" if value is None else str(value), quote=True)


def _src(relative: Path | str) -> str:
    """A relative image path as an escaped, URL-quoted attribute value."""
    return _e(quote(Path(relative).as_posix()))


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.1%}"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "-"
    return _e(value) if value is not None else "-"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    """Rows of already-escaped cells."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _metrics_section(metrics: dict[str, Any] | None, train: dict[str, Any] | None, source: str) -> str:
    parts = ["<h2>Metrics</h2>"]
    if metrics:
        parts.append(f"<p class='muted'>from {_e(source)}; {_e(metrics.get('clips'))} clips</p>")
        top_key = next((k for k in metrics if k.startswith("top") and k.endswith("_accuracy")), None)
        rows = [["video accuracy", _pct(metrics.get("video_accuracy")), f"{_pct(metrics.get('chance'))} chance"],
                ["per-frame accuracy", _pct(metrics.get("frame_accuracy")), ""]]
        if top_key:
            rows.append([_e(top_key.replace("_", " ")), _pct(metrics.get(top_key)), ""])
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
                rows.append(["sampled frames scored (with a box)", _e(att.get("frames_scored")),
                             f"{_e(att.get('frames_without_box'))} without a box, not scored"])
        elif "attention" in metrics:
            rows.append(["attention vs ground truth", "no ground-truth boxes", ""])
        parts.append(_table(rows, ["metric", "model", "baseline"]))
    else:
        parts.append("<p class='note'>no evaluation metrics (run <code>python -m pipeline evaluate</code>)</p>")
    if train:
        rows = [[_e(k), _num(v)] for k, v in train.items() if not isinstance(v, (dict, list))]
        parts.append("<h3>Training (metrics/train.json)</h3>" + _table(rows, ["field", "value"]))
    return "".join(parts)


def _x(ratio: Any) -> str:
    """" (x2.40)": a ratio to uniform attention's figure, or nothing when there is none."""
    return f" (x{ratio:.2f})" if isinstance(ratio, (int, float)) else ""


def _attention_section(metrics: dict[str, Any] | None, figures: dict[str, str] | None = None) -> str:
    """Localisation per class (where boxes exist) and the deletion test: is the map where the evidence is?"""
    metrics = metrics or {}
    parts = []
    per_class = (metrics.get("attention") or {}).get("per_class") or {}
    if per_class:
        rows = [[_e(name), _e(e.get("clips_with_boxes")), _pct(e.get("mass_in_box")) + _x(e.get("mass_ratio")),
                 _pct(e.get("mass_in_box_centre")), _pct(e.get("mass_in_box_motion")) + _x(e.get("mass_ratio_motion")),
                 _pct(e.get("pointing")), _pct(e.get("pointing_centre")), _pct(e.get("pointing_motion"))]
                for name, e in per_class.items()]
        parts.append("<h2>Where the attention is, per class</h2><p class='muted'>mass in the actor's box "
                     "(x: over uniform attention) and pointing, beside a centre prior (a Gaussian at the frame "
                     "centre) and the motion map (where the cached features change: what a frame difference gives "
                     "for free)</p>" + _table(rows, ["class", "clips", "mass in box", "centre prior", "motion map",
                                                     "pointing", "centre prior", "motion map"]))
    deletion = metrics.get("deletion") or {}
    if deletion.get("k"):
        base = deletion["unmodified"]
        rows = [["none", _pct(base["video_accuracy"]), _num(base["true_probability"]), "", ""]]
        for k, row in deletion["k"].items():
            rand = row["random"]
            rows.append([f"top {_e(k)} attended cells", _pct(row["top"]["video_accuracy"]),
                         _num(row["top"]["true_probability"]),
                         f"{_pct(rand['video_accuracy'])} ± {_pct(rand['video_accuracy_std'])}",
                         f"{_num(rand['true_probability'])} ± {_num(rand['true_probability_std'])}"])
        parts.append(f"<h2>Deletion test</h2><p class='muted'>cells of the cached features zeroed in every frame; "
                     f"random: {_e(deletion.get('random_draws'))} draws of as many cells (mean ± sd). A map that "
                     "shows the evidence makes the top rows drop more than the random ones.</p>"
                     + _table(rows, ["deleted", "video accuracy", "true-class p", "random: accuracy",
                                     "random: true-class p"]))
        if "deletion" in (figures or {}):
            parts.append(_deletion_figure(figures["deletion"], deletion))
    return "".join(parts)


def _deletion_figure(src: str, deletion: dict[str, Any]) -> str:
    """The deletion curve's chart; the caption states the area between the curves and the drop ratios."""
    curve, area, ratio = deletion["curve"], deletion.get("area_between") or {}, deletion.get("drop_ratio") or {}

    def times(value: Any) -> str:
        return f"{value:.2f}x" if isinstance(value, (int, float)) else "-"

    return (f"<figure><img src='{_src(src)}' alt='deletion curve: true-class probability left against the cells "
            f"deleted'><figcaption>true-class probability left after zeroing k cells of every frame, k = "
            f"{_e(curve['k'][0])} to {_e(curve['k'][-1])} of {_e(curve.get('cells'))}: the top-attended cells (red) "
            "and random cells (grey, band ±1 sd over the draws). Area between the curves (random minus top, "
            f"averaged over the fraction of cells deleted): <b>{_num(area.get('probability'))}</b> true-class "
            f"probability, {_pct(area.get('accuracy'))} video accuracy. Deleting the top cells costs the true "
            f"class {times(ratio.get('5'))} what as many random cells cost at k = 5, {times(ratio.get('curve'))} "
            "over the curve.</figcaption></figure>")


def _per_class_section(metrics: dict[str, Any] | None) -> str:
    per_class = (metrics or {}).get("per_class") or {}
    if not per_class:
        return ""
    rows = []
    for name, entry in per_class.items():
        acc = entry.get("accuracy")
        width = int(round(100 * acc)) if isinstance(acc, (int, float)) else 0
        rows.append([_e(name), _e(entry.get('clips')),
                     f"{_pct(acc)} <span class='bar' style='width:{width}px'></span>"])
    return "<h2>Per-class accuracy</h2>" + _table(rows, ["class", "clips", "video accuracy"])


def _figures_section(figures: dict[str, str], metrics: dict[str, Any] | None) -> str:
    parts = []
    if "curves" in figures:
        parts.append(f"<h2>Training curves</h2><figure><img src='{_src(figures['curves'])}' alt='loss and accuracy "
                     "per epoch'><figcaption>loss and video accuracy per epoch, train and val</figcaption></figure>")
    if "confusion" in figures:
        split = (metrics or {}).get("split")
        parts.append(f"<h2>Confusion matrix</h2><figure><img src='{_src(figures['confusion'])}' alt='confusion "
                     f"matrix'><figcaption>split {_e(split)}: rows true class, columns predicted</figcaption></figure>")
    return "".join(parts)


def _clip_card(clip: RenderedClip) -> str:
    mark = ("<span class='right'>&#10003; right</span>" if clip.correct
            else "<span class='wrong'>&#10007; wrong</span>")
    head = (f"<h3>{_e(clip.key)}</h3><p>true <b>{_e(clip.true)}</b> &middot; predicted <b>{_e(clip.predicted)}</b> "
            f"({clip.probability:.1%}) &middot; {mark}</p>")
    if clip.skipped is not None:
        return f"<div class='clip'>{head}<p class='skip'>skipped: {_e(clip.skipped)}</p></div>"
    return (f"<div class='clip'>{head}<img src='{_src(clip.strip)}' alt='frames and attention of {_e(clip.key)}'>"
            f"<img src='{_src(clip.animation)}' alt='attention over time in {_e(clip.key)}'></div>")


def _clips_section(summary: RenderSummary) -> str:
    parts = [f"<h2>Clips ({len(summary.rendered)} rendered, {len(summary.skipped)} skipped)</h2>",
             "<p class='muted'>Top row: the sampled frames whose features were cached; bottom row: the same frames "
             "with the head's attention (bilinear over the whole frame, each map scaled to its own min..max: red = "
             "where that frame's attention is highest). The animation shows every sampled frame with its per-frame "
             "prediction.</p>"]
    for key, reason in summary.skipped:
        parts.append(f"<p class='skip'>skipped <code>{_e(key)}</code>: {_e(reason)}</p>")
    parts.extend(_clip_card(c) for c in summary.clips)
    if not summary.clips:
        parts.append("<p class='note'>no clips chosen</p>")
    return "".join(parts)


def _provenance_section(ckpt: ck.Checkpoint, origin: dict[str, Any], cache_path: Path, model_path: Path) -> str:
    head = dataclasses.asdict(ckpt.head)
    rows = [["model", f"<code>{_e(model_path)}</code>"],
            ["head", _e(", ".join(f"{k}={v}" for k, v in head.items()))],
            ["classes", f"{len(ckpt.classes)}: {_e(', '.join(ckpt.classes))}"],
            ["feature shape [T, C, h, w]", _e(ckpt.feature_shape)]]
    train = {k: v for k, v in ckpt.train.items() if not isinstance(v, (dict, list))}
    rows.append(["training", _e(", ".join(f"{k}={v}" for k, v in train.items()))])
    for key, value in ckpt.extraction.items():
        rows.append([f"extraction: {_e(key)}", f"<code>{_e(value)}</code>"])
    for key, value in (ckpt.cache or {}).items():
        rows.append([f"trained on cache: {_e(key)}", f"<code>{_e(json.dumps(value) if isinstance(value, dict) else value)}</code>"])
    rows.append(["rendered from cache", f"<code>{_e(cache_path)}</code> (created {_e(origin.get('created'))}, "
                 f"dataset root <code>{_e(origin.get('dataset_root'))}</code>)"])
    versions = origin.get("versions")
    if versions:
        rows.append(["rendered cache versions", f"<code>{_e(json.dumps(versions))}</code>"])
    return "<h2>Provenance</h2>" + _table(rows)


def render_page(summary: RenderSummary, metrics: dict[str, Any] | None, train: dict[str, Any] | None,
                figures: dict[str, str], ckpt: ck.Checkpoint, origin: dict[str, Any], cache_path: Path,
                model_path: Path) -> str:
    """The whole index.html: inline CSS, relative image paths, no script, nothing fetched from elsewhere."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    notes = "".join(f"<p class='note'>{_e(n)}</p>" for n in summary.notes)
    body = (f"<h1>Attention report</h1><p class='muted'>{_e(ckpt.head.label)} head "
            f"<code>{_e(model_path)}</code> on split <b>{_e(summary.split)}</b>; rendered {_e(now)}</p>{notes}"
            + _metrics_section(metrics, train, summary.metrics_source) + _per_class_section(metrics)
            + _attention_section(metrics, figures)
            + _figures_section(figures, metrics) + _clips_section(summary)
            + _provenance_section(ckpt, origin, cache_path, model_path))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>Attention report: {_e(summary.split)}</title><style>{CSS}</style></head>"
            f"<body>{body}</body></html>\n")
