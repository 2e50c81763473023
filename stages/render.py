"""Stage `render`: what the attention head looks at, as pictures and one offline page.

For a few clips of a split (or the clips asked for) it runs the head on the cached features, re-decodes
the very frames those features came from (the cache's `frame_index`) and writes into `out_dir`:

    clips/<clip>.png     strip: picked frames over the same frames with attention (the study's figures 1-2)
    clips/<clip>.gif     every sampled frame with its attention, per-frame prediction as caption
    curves.png           loss and accuracy per epoch from plots/train/*.tsv (figure 3)
    confusion.png        the confusion matrix
    index.html           metrics, per-class accuracy, figures, every clip and the provenance; offline

Clip choice (default): for each class, up to `per_class` clips of the split, about half predicted right
(most confident first) and half wrong (most confidently wrong first), filled from the other kind when one
runs short. The head only reads cached features, so predicting the whole split costs little.

Metrics, per-class accuracy and the confusion matrix come from `<metrics>/eval.json` when it is there (the
evaluate stage, with attention-vs-box scores); without it they are computed here from the split rendered
(accuracy only, noted on the page). A clip whose video is missing, changed or undecodable is a recorded
skip with a one-line reason. Everything is built in a temporary folder and swapped in, so no file of an
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np

from pipeline.head import checkpoint as ck
from pipeline.report import attention_quality as aq
from pipeline.report import overlay
from pipeline.config import SPLITS, ConfigError, RenderConfig, check
from pipeline.video.folders import dataset_roots, first_existing
from pipeline.features.cache import FeatureCache, source_changed
from pipeline.progress import progress_bar

OUTPUTS = ("clips", "curves.png", "confusion.png", "index.html")  # what a render owns inside out_dir


@dataclass
class RenderedClip:
    key: str
    true: str
    predicted: str
    probability: float
    correct: bool
    strip: Path | None = None  # relative to out_dir
    animation: Path | None = None
    skipped: str | None = None  # the one-line reason when it could not be rendered


@dataclass
class RenderSummary:
    out_dir: Path
    index: Path
    split: str
    device: str
    clips: list[RenderedClip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metrics_source: str = ""
    seconds: float = 0.0

    @property
    def rendered(self) -> list[RenderedClip]:
        return [c for c in self.clips if c.skipped is None]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(c.key, c.skipped) for c in self.clips if c.skipped is not None]


def check_config(cfg: RenderConfig, split: str) -> RenderConfig:
    if split not in SPLITS:
        raise ConfigError(f"render split must be one of {', '.join(SPLITS)}, got '{split}'")
    return check(cfg)


def run(cache_path: Path, model_path: Path, out_dir: Path, cfg: RenderConfig, *, splits_dir: Path = Path("splits"),
        split: str = "test", metrics_dir: Path = Path("metrics"), train_plots: Path = Path("plots/train"),
        clips: list[str] | None = None, videos: Path | None = None, device: str = "auto",
        progress: bool = True, data_videos: Path | None = None) -> RenderSummary:
    """Render attention strips/GIFs for chosen clips, the curves, the confusion matrix and index.html."""
    from pipeline.head import training as tr

    cfg = check_config(cfg, split)
    started = time.monotonic()
    out_dir = Path(out_dir)
    ckpt = ck.load(model_path)
    dev = tr.pick_device(device)
    with FeatureCache(cache_path) as cache:
        extraction, origin = ck.cache_provenance(cache)
        ck.require_same_extraction(ckpt, extraction, str(cache_path))
        ck.require_classes(ckpt, cache.classes, str(cache_path))
        model = ckpt.build().to(dev)
        summary = RenderSummary(out_dir, out_dir / "index.html", split, str(dev))
        split_out = _predict_split(cache, model, splits_dir, split, cfg, dev, required=clips is None, notes=summary.notes)
        chosen = _explicit(cache, model, clips, cfg, dev) if clips else _choose(split_out, cfg.per_class)
        root = _dataset_root(videos, cache, data_videos, summary.notes)
        work = _fresh_work_dir(out_dir)
        try:
            _render_clips(cache, chosen, ckpt.classes, root, work / "clips", cfg, summary, progress)
            metrics = _metrics(metrics_dir, split_out, ckpt, summary)
            train_metrics = _read_json(Path(metrics_dir) / "train.json", summary.notes)
            figures = _figures(work, metrics, train_plots, summary.notes)
            page = render_page(summary, metrics, train_metrics, figures, ckpt, origin, cache_path, model_path)
            (work / "index.html").write_text(page, encoding="utf-8")
            _swap_in(work, out_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    summary.seconds = time.monotonic() - started
    return summary


def _dataset_root(videos: Path | None, cache: FeatureCache, data_videos: Path | None, notes: list[str]) -> Path:
    """--videos, else the cache's recorded root, else params.yaml's data.videos: the first that exists."""
    looked = dataset_roots(videos, cache.attrs.get("dataset_root"), data_videos) or [Path(".")]
    root = first_existing(looked)
    if root is None:
        notes.append(f"no dataset folder found (looked in {', '.join(map(str, looked))}); --videos DIR points "
                     "to the videos")
        return looked[0]
    return root


# --- which clips ------------------------------------------------------------------------------------------


@dataclass
class _Predicted:
    """Head outputs for a list of cache rows."""

    keys: list[str]
    rows: np.ndarray  # (N,) cache rows
    outputs: Any  # pipeline.head.training.Outputs


def _predict(cache: FeatureCache, model, clip_set, cfg: RenderConfig, dev) -> _Predicted:
    from pipeline.head import training as tr

    outputs = tr.infer(model, clip_set, cfg.batch_size, dev)
    return _Predicted(list(clip_set.keys), np.asarray(clip_set.index), outputs)


def _predict_split(cache: FeatureCache, model, splits_dir: Path, split: str, cfg: RenderConfig, dev, *,
                   required: bool, notes: list[str]) -> _Predicted | None:
    """The head's outputs on the whole split; with explicit clips a missing split is only a note."""
    from pipeline.head.batches import open_split
    from pipeline.video.splits import SplitError

    try:
        clip_set = open_split(cache, splits_dir, split)
    except SplitError as exc:
        if required:
            raise
        notes.append(f"split '{split}' not used ({exc})")
        return None
    return _predict(cache, model, clip_set, cfg, dev)


def _explicit(cache: FeatureCache, model, keys: Sequence[str], cfg: RenderConfig, dev) -> _Predicted:
    """The clips asked for by key, in that order, once each (an unknown key is a CacheError naming it)."""
    from pipeline.head.batches import ClipSet

    unique = list(dict.fromkeys(keys))
    return _predict(cache, model, ClipSet(cache, unique), cfg, dev)


def choose_clips(labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, keys: Sequence[str],
                 per_class: int) -> list[int]:
    """Positions of up to `per_class` clips per class: half right, half wrong where both exist.

    Right ones most confident first (the clearest successes), wrong ones most confidently wrong first (the
    most instructive failures); a kind that runs short is filled from the other. Ties break by key, so the
    choice is the same on every run.
    """
    chosen: list[int] = []
    for label in sorted(set(int(v) for v in labels)):
        members = [i for i in range(len(labels)) if labels[i] == label]
        order = sorted(members, key=lambda i: (-float(confidence[i]), keys[i]))
        right = [i for i in order if predicted[i] == label]
        wrong = [i for i in order if predicted[i] != label]
        n_wrong = min(len(wrong), per_class // 2)
        n_right = min(len(right), per_class - n_wrong)
        n_wrong = min(len(wrong), per_class - n_right)
        picked = right[:n_right] + wrong[:n_wrong]
        chosen.extend(sorted(picked, key=lambda i: keys[i]))
    return chosen


def _choose(split_out: _Predicted | None, per_class: int) -> _Predicted:
    if split_out is None or per_class == 0:
        return _Predicted([], np.zeros(0, np.int64), None)
    probs = split_out.outputs.probabilities
    predicted = probs.argmax(axis=1)
    picks = choose_clips(split_out.outputs.labels, predicted, probs.max(axis=1), split_out.keys, per_class)
    return _subset(split_out, picks)


def _subset(pred: _Predicted, picks: list[int]) -> _Predicted:
    from pipeline.head.training import Outputs

    o = pred.outputs
    sub = Outputs(o.logits[picks], o.attention[picks], o.labels[picks])
    return _Predicted([pred.keys[i] for i in picks], pred.rows[picks], sub)


# --- the clips --------------------------------------------------------------------------------------------


def _render_clips(cache: FeatureCache, chosen: _Predicted, classes: list[str], root: Path, clips_dir: Path,
                  cfg: RenderConfig, summary: RenderSummary, progress: bool) -> None:
    clips_dir.mkdir(parents=True, exist_ok=True)
    if not chosen.keys:
        return
    truth = _truth(root, summary.notes)
    probs = chosen.outputs.probabilities
    with progress_bar("render", len(chosen.keys), "clips", enabled=progress) as bar:
        for i, key in enumerate(chosen.keys):
            row = int(chosen.rows[i])
            true, best = int(chosen.outputs.labels[i]), int(probs[i].argmax())
            clip = RenderedClip(key, classes[true], classes[best], float(probs[i, best]), best == true)
            try:
                frames = _frames(cache, row, root / key)
                boxes = truth.get(key)
                boxes = aq.boxes_at(boxes, cache.frame_index[row]) if boxes is not None and len(boxes) else None
                paths = _draw(clips_dir, clip, frames, chosen.outputs, i, cache.frame_index[row], classes, cfg,
                              boxes)
                clip.strip, clip.animation = (p.relative_to(clips_dir.parent) for p in paths)
            except _Skip as exc:
                clip.skipped = str(exc)
            summary.clips.append(clip)
            bar.advance(note=key)


class _Skip(Exception):
    """A clip that cannot be drawn; the message is the one-line reason shown in the summary and the page."""


def _frames(cache: FeatureCache, row: int, path: Path) -> np.ndarray:
    """The cached frames of `row`, re-decoded from `path`; _Skip when gone, changed or undecodable."""
    from pipeline.video.decode import VideoError, decode_frames_at

    if not path.is_file():
        raise _Skip(f"video not found at {path}")
    if source_changed(cache.source[row], path):
        raise _Skip(f"{path} changed since it was extracted (rerun extract)")
    try:
        frames = decode_frames_at(path, cache.frame_index[row], cache.decoder[row])
    except VideoError as exc:
        raise _Skip(f"{path}: {exc}") from None
    expected = (int(cache.height[row]), int(cache.width[row]))
    if frames.shape[1:3] != expected:
        raise _Skip(f"{path}: frames are {frames.shape[2]}x{frames.shape[1]}, the cache recorded "
                    f"{expected[1]}x{expected[0]} (rerun extract)")
    return frames


def _truth(root: Path, notes: list[str]) -> dict[str, np.ndarray]:
    """The ground-truth boxes beside the videos (boxes.json), drawn on the overlays; {} when there are none."""
    from pipeline.video.synthetic import BOXES_FILE, read_boxes_file

    path = root / BOXES_FILE
    if not path.is_file():
        return {}
    try:
        return read_boxes_file(path)
    except (ValueError, OSError) as exc:
        notes.append(f"{path} ignored: {str(exc).splitlines()[0]}")
        return {}


def _draw(clips_dir: Path, clip: RenderedClip, frames: np.ndarray, outputs, i: int, frame_index: np.ndarray,
          classes: list[str], cfg: RenderConfig, boxes: np.ndarray | None) -> tuple[Path, Path]:
    mark = "right" if clip.correct else "WRONG"
    title = (f"{clip.key}   true: {clip.true}   predicted: {clip.predicted} "
             f"({clip.probability:.0%}, {mark})")
    logits = outputs.logits[i]  # (T, K): per-frame predictions for the captions
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    frame_probs = z / z.sum(axis=1, keepdims=True)
    total = len(frames)
    captions = [f"t={t + 1}/{total} frame {int(frame_index[t])}: {classes[int(frame_probs[t].argmax())]} "
                f"{float(frame_probs[t].max()):.0%} (clip: {clip.predicted} {clip.probability:.0%})"
                for t in range(total)]
    paths = overlay.render_clip(clips_dir, clip.key, frames, outputs.attention[i], title, captions,
                                cfg.strip_frames, cfg.fps, frame_index=frame_index, alpha=cfg.alpha, boxes=boxes)
    return paths["strip"], paths["animation"]


# --- metrics and figures ----------------------------------------------------------------------------------


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"{path} ignored: not readable JSON ({exc.__class__.__name__})")
        return None
    return data if isinstance(data, dict) else None


def _metrics(metrics_dir: Path, split_out: _Predicted | None, ckpt: ck.Checkpoint,
             summary: RenderSummary) -> dict[str, Any] | None:
    """eval.json when present and about these classes; else accuracy computed from the split rendered."""
    from pipeline.report.metrics import accuracy_report

    path = Path(metrics_dir) / "eval.json"
    report = _read_json(path, summary.notes)
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


def _figures(work: Path, metrics: dict[str, Any] | None, train_plots: Path, notes: list[str]) -> dict[str, str]:
    """curves.png and confusion.png where their data exists; {name: relative path}."""
    figures: dict[str, str] = {}
    loss, accuracy = Path(train_plots) / "loss.tsv", Path(train_plots) / "accuracy.tsv"
    if loss.is_file() or accuracy.is_file():
        overlay.write_curves(work / "curves.png", loss if loss.is_file() else None,
                             accuracy if accuracy.is_file() else None)
        figures["curves"] = "curves.png"
    else:
        notes.append(f"no training curves: {loss} and {accuracy} are missing")
    confusion = (metrics or {}).get("confusion")
    if confusion and confusion.get("classes"):
        overlay.write_confusion(work / "confusion.png", confusion["classes"], confusion["matrix"])
        figures["confusion"] = "confusion.png"
    return figures


# --- files ------------------------------------------------------------------------------------------------


def _fresh_work_dir(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f".render-{os.getpid()}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


def _swap_in(work: Path, out_dir: Path) -> None:
    """Move the new outputs over the old: clips/ by rename-aside, files by atomic replace, index.html last."""
    old = out_dir / f".clips-old-{os.getpid()}.tmp"
    target = out_dir / "clips"
    if target.exists():
        os.replace(target, old)
    os.replace(work / "clips", target)
    shutil.rmtree(old, ignore_errors=True)
    for name in ("curves.png", "confusion.png"):
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
            rows.append(["attention entropy (nats)", _num(entropy.get("mean")), f"{_num(entropy.get('uniform'))} uniform"])
        att = metrics.get("attention") or {}
        if att.get("clips_with_boxes"):
            rows.append(["attention mass in the actor's box", _pct(att.get("mass_in_box")) + _x(att.get("mass_ratio")),
                         f"{_pct(att.get('mass_in_box_uniform'))} uniform, {_pct(att.get('mass_in_box_centre'))} "
                         f"centre prior{_x(att.get('mass_ratio_centre'))}"])
            rows.append(["pointing accuracy (argmax cell in box)", _pct(att.get("pointing")),
                         f"{_pct(att.get('pointing_uniform'))} uniform, {_pct(att.get('pointing_centre'))} centre prior"])
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


def _attention_section(metrics: dict[str, Any] | None) -> str:
    """Localisation per class (where boxes exist) and the deletion test: is the map where the evidence is?"""
    metrics = metrics or {}
    parts = []
    per_class = (metrics.get("attention") or {}).get("per_class") or {}
    if per_class:
        rows = [[_e(name), _e(e.get("clips_with_boxes")), _pct(e.get("mass_in_box")) + _x(e.get("mass_ratio")),
                 _pct(e.get("mass_in_box_centre")), _pct(e.get("pointing")), _pct(e.get("pointing_centre"))]
                for name, e in per_class.items()]
        parts.append("<h2>Where the attention is, per class</h2><p class='muted'>mass in the actor's box "
                     "(x: over uniform attention) and pointing, beside a centre prior (a Gaussian at the frame "
                     "centre)</p>" + _table(rows, ["class", "clips", "mass in box", "centre prior", "pointing",
                                                   "centre prior"]))
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
    return "".join(parts)


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
            + _attention_section(metrics)
            + _figures_section(figures, metrics) + _clips_section(summary)
            + _provenance_section(ckpt, origin, cache_path, model_path))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>Attention report: {_e(summary.split)}</title><style>{CSS}</style></head>"
            f"<body>{body}</body></html>\n")


# --- the table --------------------------------------------------------------------------------------------


def print_summary(summary: RenderSummary) -> None:
    """A short table of the rendered clips, then skips and notes, then where the page is."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title=f"render -> {escape(str(summary.out_dir))} (split {summary.split}, {summary.device})")
    for col, justify in (("clip", "left"), ("true", "left"), ("predicted", "left"), ("prob", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    for c in summary.clips:
        status = "[red]skipped[/]" if c.skipped else ("[green]right[/]" if c.correct else "[red]wrong[/]")
        table.add_row(escape(c.key), escape(c.true), escape(c.predicted), f"{c.probability:.0%}", status)
    console.print(table)
    for key, reason in summary.skipped:
        console.print(f"  [red]skipped[/] {escape(key)}: {escape(reason)}", highlight=False)
    for note in summary.notes:
        console.print(f"  [yellow]note[/] {escape(note)}", highlight=False)
    console.print(f"  {len(summary.rendered)} clips rendered in {summary.seconds:.1f}s; "
                  f"open {escape(str(summary.index))}", highlight=False)
