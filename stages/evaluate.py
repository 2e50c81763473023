"""Stage `evaluate`: apply a trained head to one split of the cache and say how good it is, and how
faithful and how well placed its attention is.

Writes `<out>/eval.json` (DVC metrics), `<out>/predictions.csv` (video, true, predicted, probability),
`<out>/attention.npz` (the split's attention maps, N x T x h x w, with the clip keys, for measures of your
own) and `<plots>/confusion.csv` (DVC's confusion template; `plots` defaults to `out`: nothing is written
outside the paths given). Two measures of the attention:
* localisation, where ground-truth boxes exist (`boxes.json` in the dataset root, or --boxes; format 1 or 2 of
  pipeline/video/boxes.py): mass in the box and the pointing game over the sampled frames with a box (the
  others counted), beside uniform attention, a centre prior and the clip's motion map, overall and per class;
* faithfulness, on any dataset: the deletion test and its curve over k, 1 to half the cells
  (pipeline/report/faithfulness.py).
Beside the head's accuracy, the baseline a sceptic runs first: a linear probe on each clip's mean feature,
fitted on the train split with its L2 strength chosen on val (pipeline/report/probe.py), in `baselines`.
The figures are computed in pipeline/report/; this module says which, on what, and where they go.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import EvaluateConfig, check
from pipeline.features.reader import open_cache
from pipeline.files import write_json_atomic, write_text_atomic
from pipeline.head import checkpoint as ck
from pipeline.head.batches import open_split
from pipeline.progress import progress_bar
from pipeline.report import boxes as gt
from pipeline.report import faithfulness, metrics, probe
from pipeline.report.motion_baseline import motion_maps
from pipeline.report.tables import print_report
from pipeline.video.folders import first_existing

__all__ = ["MAPS_FILE", "print_report", "run"]  # print_report: the CLI's table, pipeline/report/tables.py

MAPS_FILE = "attention.npz"


def run(cache_path: Path, splits_dir: Path, model_path: Path, out_dir: Path, cfg: EvaluateConfig, *,
        boxes: Path | None = None, plots_dir: Path | None = None, progress: bool = True,
        videos: Path | None = None) -> dict[str, Any]:
    """Evaluate `model_path` on split `cfg.split`; write the four outputs; return the eval.json dict."""
    from pipeline.head import infer as tr
    from pipeline.head.runtime import pick_device

    cfg = check(cfg)
    ckpt = ck.load(model_path)
    with open_cache(cache_path) as cache:
        extraction, _ = ck.cache_provenance(cache)
        ck.require_same_extraction(ckpt, extraction, str(cache_path))
        ck.require_classes(ckpt, cache.classes, str(cache_path))
        clips = open_split(cache, splits_dir, cfg.split)
        looked = gt.candidates(boxes, cache.dataset_root, videos)
        truth_path = first_existing(looked)
        truth = gt.read_truth(truth_path)  # before the passes: a bad boxes file costs no inference
        dev = pick_device(cfg.device)
        model = ckpt.build().to(dev)
        cells = int(np.prod(cache.feature_shape[2:]))
        passes = 1 + (faithfulness.passes(cells, cfg.deletion_draws) if cfg.deletion_draws else 0)
        with progress_bar("evaluate", passes, "passes", enabled=progress) as bar:
            outputs = tr.infer(model, clips, cfg.batch_size, dev)
            bar.advance(note="accuracy")
            deletion = None
            if cfg.deletion_draws:
                def rerun(keep):
                    return tr.infer(model, clips, cfg.batch_size, dev, keep=keep).probabilities

                deletion = faithfulness.deletion_test(rerun, outputs.attention, outputs.labels, cfg.deletion_draws,
                                                      on_pass=lambda: bar.advance(note="deletion test"))
        motion = motion_maps(clips, cfg.batch_size, dev)  # (N, T, h, w): the motion baseline, boxes or not
        baselines = {"linear_probe": linear_probe_of(cache, splits_dir, clips, cfg.batch_size)}
        rows = clips.index
        frame_index = cache.frame_index[rows]  # (N, T)
        attention = metrics.attention_report(outputs.attention, [cache.videos[i] for i in rows], truth,
                                             frame_index, cache.height[rows], cache.width[rows],
                                             outputs.labels, ckpt.classes, motion=motion)
    report = metrics.accuracy_report(outputs, ckpt.classes, motion)
    report = {"split": cfg.split, "clips": len(clips), **report,
              "attention": dict(attention, boxes=gt.shown(truth_path) if truth_path else None,
                                looked_for_boxes=[gt.shown(p) for p in looked] if not truth else []),
              "deletion": deletion, "baselines": baselines,
              "model": {"path": str(model_path), "head": ckpt.head.label,
                        "epoch": ckpt.train.get("epoch"), "weights": ckpt.extraction.get("weights")}}
    write_json_atomic(Path(out_dir) / "eval.json", report)
    write_text_atomic(Path(out_dir) / "predictions.csv", metrics.predictions_csv(clips.keys, outputs, ckpt.classes))
    plots_dir = Path(plots_dir) if plots_dir is not None else Path(out_dir)
    write_text_atomic(plots_dir / "confusion.csv", metrics.confusion_csv(clips.keys, outputs, ckpt.classes))
    metrics.write_maps(Path(out_dir) / MAPS_FILE, clips.keys, outputs, frame_index, ckpt.classes)
    return report


def linear_probe_of(cache, splits_dir: Path, clips, batch_size: int) -> dict[str, Any]:
    """The linear probe (pipeline/report/probe.py) trained on the train split, chosen on val (C = 1 where there
    is no val list), scored on `clips`; a note instead where the splits folder has no train list."""
    from pipeline.video.splits import SplitError

    def features_of(name: str):
        chosen = open_split(cache, splits_dir, name, max_memory_gb=0) if name else clips  # streamed
        return probe.mean_features(chosen, batch_size), chosen.labels.numpy()

    try:
        train = features_of("train")
    except SplitError as exc:
        return {"video_accuracy": None, "note": f"no linear probe: {exc}"}
    try:
        val = features_of("val")
    except SplitError:
        val = (np.zeros((0, train[0].shape[1])), np.zeros(0, np.int64))
    return probe.linear_probe(train, val, features_of(""))
