"""`predict`: apply a trained head to new video files, the way their features would have been cached.

The checkpoint records how its training features were made (backbone, layer, weights and their sha256,
image size, frames, sampling, precision). Predict rebuilds exactly that backbone and refuses to run when it
cannot (the weights changed, or are not here): a head fed features made another way gives confident
nonsense. Each file is decoded in order (`decode_sampled`, in a worker process with a time limit, so a
broken file can neither hang nor crash the run), embedded, rounded to float16 like the cache (the one
extractor of pipeline/features/extractor.py, as extract runs it), and run through the head. A file that
cannot be used is a recorded failure; the other files are still predicted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import first_line
from pipeline.features.rebuild import PredictError, rebuild_backbone
from pipeline.head import checkpoint as ck
from pipeline.head.infer import infer_clip, top_classes
from pipeline.progress import progress_bar
from pipeline.video.decode import DecodedClip
from pipeline.video.folders import video_files

if TYPE_CHECKING:
    from pipeline.config import PredictConfig, RenderConfig

__all__ = ["Prediction", "PredictError", "exit_status", "print_predictions", "run"]


@dataclass
class Prediction:
    """What the model says about one file, or why it could not say anything."""

    file: Path
    topk: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), best first
    probabilities: np.ndarray | None = None  # (K,) mean over t of the per-frame softmax, in checkpoint class order
    attention: np.ndarray | None = None  # (T, h, w) float32, each map sums to 1
    frame_index: np.ndarray | None = None  # (T,) int32, the sampled frames among those that decode
    decoder: str = ""  # which decoder made the frames (decord, or pyav where decord's failed their check)
    error: str | None = None  # one line, when the file could not be predicted
    rendered: dict[str, Path] = field(default_factory=dict)  # {"strip": png, "animation": gif} with --render

    @property
    def ok(self) -> bool:
        return self.error is None


# --- the stage --------------------------------------------------------------------------------------------


def run(videos: list[Path], model_path: Path, cfg: PredictConfig | None = None, *, render_dir: Path | None = None,
        progress: bool = True, weights: str | None = None, drawing: RenderConfig | None = None,
        workers: int = 2) -> list[Prediction]:
    """Predict every file of `videos` (folders expand to their videos) with `model_path`, in input order.

    `cfg` is params.yaml's `predict` section (top-k, device, time limit, compile); `drawing` (strip frames, GIF
    fps, heatmap opacity) its `render` section, so a predicted overlay looks like a rendered one."""
    from pipeline.config import ExtractConfig, PredictConfig, RenderConfig
    from pipeline.features.extractor import Extracted, Extractor
    from pipeline.head.runtime import pick_device

    cfg = cfg if cfg is not None else PredictConfig()
    if cfg.top_k < 1:
        raise PredictError(f"--top-k must be at least 1, got {cfg.top_k}")
    files = video_files(videos)
    if not files:
        raise PredictError("no video files given")
    drawing = drawing if drawing is not None else RenderConfig()
    ckpt = ck.load(model_path)
    dev = pick_device(cfg.device)
    backbone = rebuild_backbone(ckpt.extraction, str(dev), weights, ckpt.feature_shape, str(model_path))
    frames, k = int(ckpt.extraction["frames"]), min(cfg.top_k, len(ckpt.classes))
    model = ckpt.build().to(dev)
    backbone.compile(cfg.compile, len(files) * frames)  # extract's rule: compiled when the files' frames pay it back
    names = unique_names(files)
    results: dict[Path, Prediction] = {}
    extractor = Extractor(backbone, frames, ExtractConfig().batch_size, min(workers, len(files)), cfg.timeout)
    with progress_bar("predict", len(files), "files", enabled=progress) as bar:

        def on_result(done: Extracted) -> None:
            results[done.path] = _predict_one(done, model, ckpt, dev, k)
            if render_dir is not None and results[done.path].ok:
                _render(results[done.path], done.decoded, Path(render_dir), names[done.path], drawing)
            bar.advance(note=names[done.path])

        extractor.run([(str(f), f) for f in files], on_result)
    return [results[f] for f in files]


def _predict_one(done, model, ckpt, dev, k: int) -> Prediction:
    """One file's prediction from its extracted cubes, or its failure when decoding did not give frames."""
    if not done.ok:
        return Prediction(done.path, error=first_line(Exception(done.error), 200))
    import torch

    probs, attention = infer_clip(model, torch.from_numpy(done.features), dev)  # (T, C, h, w) checked up front
    return Prediction(done.path, top_classes(probs, ckpt.classes, k), probs, attention,
                      np.asarray(done.decoded.frame_index, dtype=np.int32), done.decoded.decoder)


def unique_names(files: list[Path]) -> dict[Path, str]:
    """Output names for rendered files: the file's stem, "<folder>-<stem>" where stems repeat (clips of
    different classes often share one), then -2, -3, ... where even that repeats."""
    stems = [p.stem or "video" for p in files]
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path, stem in zip(files, stems):
        base = stem if stems.count(stem) == 1 or not path.parent.name else f"{path.parent.name}-{stem}"
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        names[path] = name
        taken.add(name)
    return names


def _render(pred: Prediction, decoded: DecodedClip, out_dir: Path, name: str, drawing) -> None:
    """Attention blended over the very frames that were embedded: a PNG strip and a GIF."""
    from pipeline.report.overlay import render_clip

    (top, p), rest = pred.topk[0], pred.topk[1:]
    caption = f"{top} {p:.0%}" + (f" (then {', '.join(f'{c} {q:.0%}' for c, q in rest)})" if rest else "")
    title = f"{pred.file.name}: {caption}"
    pred.rendered = {key: Path(value) for key, value in
                     render_clip(out_dir, name, decoded.frames, pred.attention, title, caption,
                                 drawing.strip_frames, drawing.fps, frame_index=pred.frame_index,
                                 alpha=drawing.alpha).items()}


# --- output -----------------------------------------------------------------------------------------------


def as_json(predictions: list[Prediction], model_path: Path) -> dict[str, Any]:
    """What --json writes: per predicted file its sampled frames and top-k; per failed file the reason."""
    return {
        "model": str(model_path),
        "predictions": [{"file": str(p.file), "frame_index": p.frame_index.tolist(), "decoder": p.decoder,
                         "topk": [{"class": c, "probability": round(q, 6)} for c, q in p.topk],
                         **({"rendered": {k: str(v) for k, v in p.rendered.items()}} if p.rendered else {})}
                        for p in predictions if p.ok],
        "failed": [{"file": str(p.file), "reason": p.error} for p in predictions if not p.ok],
    }


def write_json(predictions: list[Prediction], model_path: Path, path: Path) -> Path:
    from pipeline.files import write_json_atomic

    return write_json_atomic(path, as_json(predictions, model_path))


def exit_status(predictions: list[Prediction]) -> int:
    """0 all files predicted, 1 some failed, 2 all failed (nothing could be done)."""
    failed = sum(not p.ok for p in predictions)
    return 0 if not failed else 2 if failed == len(predictions) else 1


def print_predictions(predictions: list[Prediction], model_path: Path, console=None) -> None:
    """file | top-1 | probability | the rest of the top-k; a failed file shows its reason instead."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    ok = sum(p.ok for p in predictions)
    table = Table(title=f"predict with {escape(str(model_path))}: {ok}/{len(predictions)} files")
    table.add_column("file", overflow="fold", ratio=2)
    table.add_column("top-1", no_wrap=True)
    table.add_column("p", justify="right", no_wrap=True)
    table.add_column("then / why it failed", overflow="fold", ratio=2)
    for pred in predictions:
        if pred.ok:
            (top, p), rest = pred.topk[0], pred.topk[1:]
            table.add_row(escape(str(pred.file)), f"[bold]{escape(top)}[/]", f"{p:.1%}",
                          escape(", ".join(f"{c} {q:.1%}" for c, q in rest)))
        else:
            table.add_row(escape(str(pred.file)), "[red]failed[/]", "", f"[red]{escape(str(pred.error))}[/]")
    console = console or Console()
    console.print(table)
    for pred in predictions:
        if pred.rendered:
            outputs = ", ".join(str(v) for v in pred.rendered.values())
            console.print(f"  rendered {escape(str(pred.file))}: {escape(outputs)}", highlight=False)
