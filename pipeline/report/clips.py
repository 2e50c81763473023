"""Which clips a report shows and how each is drawn: the head's outputs on a split, the choice of clips,
the frames re-decoded from the videos and the strip and GIF of each.

The head only reads cached features, so predicting a whole split costs little: the choice is made from the
whole split's outputs, and only the chosen clips are decoded again. The frames drawn are the very frames
the features came from (the cache's `frame_index`), so the attention sits on what the head saw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.config import RenderConfig
from pipeline.features.cache import FeatureCache
from pipeline.features.provenance import source_changed
from pipeline.progress import progress_bar
from pipeline.report import overlay
from pipeline.report.boxes import truth_beside
from pipeline.video.folders import dataset_roots, first_existing


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


def dataset_root(videos: Path | None, cache: FeatureCache, data_videos: Path | None, notes: list[str]) -> Path:
    """--videos, else the cache's recorded root, else params.yaml's data.videos: the first that exists."""
    looked = dataset_roots(videos, cache.dataset_root, data_videos) or [Path(".")]
    root = first_existing(looked)
    if root is None:
        notes.append(f"no dataset folder found (looked in {', '.join(map(str, looked))}); --videos DIR points "
                     "to the videos")
        return looked[0]
    return root


# --- which clips ------------------------------------------------------------------------------------------


@dataclass
class Predicted:
    """Head outputs for a list of cache rows."""

    keys: list[str]
    rows: np.ndarray  # (N,) cache rows
    outputs: Any  # pipeline.head.infer.Outputs


def _predict(model, clip_set, cfg: RenderConfig, dev) -> Predicted:
    from pipeline.head import infer as tr

    outputs = tr.infer(model, clip_set, cfg.batch_size, dev)
    return Predicted(list(clip_set.keys), np.asarray(clip_set.index), outputs)


def predict_split(cache: FeatureCache, model, splits_dir: Path, split: str, cfg: RenderConfig, dev, *,
                  required: bool, notes: list[str]) -> Predicted | None:
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
    return _predict(model, clip_set, cfg, dev)


def explicit(cache: FeatureCache, model, keys: Sequence[str], cfg: RenderConfig, dev) -> Predicted:
    """The clips asked for by key, in that order, once each (an unknown key is a CacheError naming it)."""
    from pipeline.head.batches import ClipSet

    unique = list(dict.fromkeys(keys))
    return _predict(model, ClipSet(cache, unique), cfg, dev)


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


def choose(split_out: Predicted | None, per_class: int) -> Predicted:
    """The default choice (choose_clips) made from the split's outputs; nothing without a split."""
    if split_out is None or per_class == 0:
        return Predicted([], np.zeros(0, np.int64), None)
    probs = split_out.outputs.probabilities
    predicted = probs.argmax(axis=1)
    picks = choose_clips(split_out.outputs.labels, predicted, probs.max(axis=1), split_out.keys, per_class)
    return _subset(split_out, picks)


def _subset(pred: Predicted, picks: list[int]) -> Predicted:
    from pipeline.head.infer import Outputs

    o = pred.outputs
    sub = Outputs(o.logits[picks], o.attention[picks], o.labels[picks])
    return Predicted([pred.keys[i] for i in picks], pred.rows[picks], sub)


# --- the clips --------------------------------------------------------------------------------------------


def render_clips(cache: FeatureCache, chosen: Predicted, classes: list[str], root: Path, clips_dir: Path,
                 cfg: RenderConfig, summary: RenderSummary, progress: bool, boxes_file: Path | None = None) -> None:
    """Draw every chosen clip into `clips_dir`, appending each (drawn or skipped) to `summary.clips`; the
    boxes outlined are `boxes_file`'s, else those of boxes.json beside the videos."""
    clips_dir.mkdir(parents=True, exist_ok=True)
    if not chosen.keys:
        return
    truth = truth_beside(root, summary.notes, boxes_file)
    probs = chosen.outputs.probabilities
    with progress_bar("render", len(chosen.keys), "clips", enabled=progress) as bar:
        for i, key in enumerate(chosen.keys):
            row = int(chosen.rows[i])
            true, best = int(chosen.outputs.labels[i]), int(probs[i].argmax())
            clip = RenderedClip(key, classes[true], classes[best], float(probs[i, best]), best == true)
            try:
                frames = _frames(cache, row, root / key)
                boxes = truth.get(key)  # VideoBoxes -> per sampled frame (K_t, 4) in this clip's pixels, K_t >= 0
                boxes = boxes.at(cache.frame_index[row], float(cache.height[row]), float(cache.width[row])) \
                    if boxes is not None else None
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


def _frame_probabilities(outputs, i: int) -> np.ndarray:
    """Per-frame class probabilities (T, K) of clip i: each frame taken as a clip of one frame, so the one
    softmax (Outputs.probabilities) computes them."""
    from pipeline.head.infer import Outputs

    return Outputs(outputs.logits[i][:, None], outputs.attention[i][:, None], outputs.labels[:0]).probabilities


def _draw(clips_dir: Path, clip: RenderedClip, frames: np.ndarray, outputs, i: int, frame_index: np.ndarray,
          classes: list[str], cfg: RenderConfig, boxes: list[np.ndarray] | None) -> tuple[Path, Path]:
    mark = "right" if clip.correct else "WRONG"
    title = (f"{clip.key}   true: {clip.true}   predicted: {clip.predicted} "
             f"({clip.probability:.0%}, {mark})")
    frame_probs = _frame_probabilities(outputs, i)  # per-frame predictions for the captions
    total = len(frames)
    captions = [f"t={t + 1}/{total} frame {int(frame_index[t])}: {classes[int(frame_probs[t].argmax())]} "
                f"{float(frame_probs[t].max()):.0%} (clip: {clip.predicted} {clip.probability:.0%})"
                for t in range(total)]
    paths = overlay.render_clip(clips_dir, clip.key, frames, outputs.attention[i], title, captions,
                                cfg.strip_frames, cfg.fps, frame_index=frame_index, alpha=cfg.alpha, boxes=boxes)
    return paths["strip"], paths["animation"]


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
