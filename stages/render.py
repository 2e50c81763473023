"""Stage `render`: what the attention head looks at, as pictures and one offline page.

For a few clips of a split (or the clips asked for) it runs the head on the cached features, re-decodes
the very frames those features came from (the cache's `frame_index`) and writes into `out_dir`:

    clips/<clip>.png     strip: picked frames over the same frames with attention (the study's figures 1-2)
    clips/<clip>.gif     every sampled frame with its attention, per-frame prediction as caption
    curves.png           loss and accuracy per epoch from <train_plots>/*.tsv (figure 3)
    confusion.png        the confusion matrix
    deletion.png         the deletion curve from eval.json (true-class p left, top-attended vs random cells)
    index.html           metrics, per-class accuracy, figures, every clip and the provenance; offline

Clip choice (default): for each class, up to `per_class` clips of the split, about half predicted right
(most confident first) and half wrong (most confidently wrong first), filled from the other kind when one
runs short. The head only reads cached features, so predicting the whole split costs little.

Metrics, per-class accuracy and the confusion matrix come from `<metrics>/eval.json` when it is there (the
evaluate stage, with attention-vs-box scores); without it they are computed here from the split rendered
(accuracy only, noted on the page). Ground-truth boxes (--boxes FILE, else boxes.json beside the videos;
format 1 or 2 of pipeline/video/boxes.py) are outlined on the overlays, as many as a frame has. A clip whose
video is missing, changed or undecodable is a recorded skip with a one-line reason. Everything is built in a
temporary folder and swapped in, so no file of an earlier render lingers and a crash leaves the earlier
report whole. How each piece is made lives in pipeline/report/ (clips.py, charts.py, page.py, tables.py);
this module says what goes where.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipeline.config import SPLITS, ConfigError, RenderConfig, check
from pipeline.features.reader import open_cache
from pipeline.head import checkpoint as ck
from pipeline.report import charts, page
from pipeline.report import clips as picked
from pipeline.report.clips import RenderedClip, RenderSummary, choose_clips, print_summary

# choose_clips, RenderedClip: how the clips are chosen and what is said of each; print_summary: the CLI's table
__all__ = ["RenderSummary", "RenderedClip", "check_config", "choose_clips", "print_summary", "run"]


def check_config(cfg: RenderConfig, split: str) -> RenderConfig:
    if split not in SPLITS:
        raise ConfigError(f"render split must be one of {', '.join(SPLITS)}, got '{split}'")
    return check(cfg)


def run(cache_path: Path, model_path: Path, out_dir: Path, cfg: RenderConfig, *, splits_dir: Path = Path("splits"),
        split: str = "test", metrics_dir: Path | None = None, train_plots: Path | None = None,
        clips: list[str] | None = None, videos: Path | None = None, progress: bool = True,
        data_videos: Path | None = None, boxes: Path | None = None) -> RenderSummary:
    """Render attention strips/GIFs for chosen clips, the curves, the confusion matrix and index.html.

    `metrics_dir` (eval.json, train.json) and `train_plots` (loss.tsv, accuracy.tsv) default to the model's
    folder, where `train` writes them unless told otherwise: the page shows this model's figures, not
    whatever a metrics/ folder in the working directory holds. `split` is params.yaml's evaluate.split."""
    from pipeline.head.runtime import pick_device

    cfg = check_config(cfg, split)
    started = time.monotonic()
    out_dir = Path(out_dir)
    metrics_dir = Path(metrics_dir) if metrics_dir is not None else Path(model_path).parent
    train_plots = Path(train_plots) if train_plots is not None else Path(model_path).parent
    ckpt = ck.load(model_path)
    dev = pick_device(cfg.device)
    with open_cache(cache_path) as cache:
        extraction, origin = ck.cache_provenance(cache)
        ck.require_same_extraction(ckpt, extraction, str(cache_path))
        ck.require_classes(ckpt, cache.classes, str(cache_path))
        model = ckpt.build().to(dev)
        summary = RenderSummary(out_dir, out_dir / "index.html", split, str(dev))
        split_out = picked.predict_split(cache, model, splits_dir, split, cfg, dev, required=clips is None,
                                         notes=summary.notes)
        chosen = picked.explicit(cache, model, clips, cfg, dev) if clips else picked.choose(split_out, cfg.per_class)
        root = picked.dataset_root(videos, cache, data_videos, summary.notes)
        work = page.fresh_work_dir(out_dir)
        try:
            picked.render_clips(cache, chosen, ckpt.classes, root, work / "clips", cfg, summary, progress, boxes)
            metrics = page.page_metrics(metrics_dir, split_out, ckpt, summary)
            train_metrics = page.read_json(Path(metrics_dir) / "train.json", summary.notes)
            figures = charts.write_figures(work, metrics, train_plots, summary.notes)
            html = page.render_page(summary, metrics, train_metrics, figures, ckpt, origin, cache_path, model_path)
            (work / "index.html").write_text(html, encoding="utf-8")
            page.swap_in(work, out_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    summary.seconds = time.monotonic() - started
    return summary
