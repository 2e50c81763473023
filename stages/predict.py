"""`predict`: apply a trained head to new video files, the way their features would have been cached.

The checkpoint records how its training features were made (backbone, layer, weights and their sha256,
image size, frames, sampling, precision). Predict rebuilds exactly that backbone and refuses to run when it
cannot (the weights changed, or are not here): a head fed features made another way gives confident
nonsense. Each file is decoded in order (`decode_sampled`, in a worker process with a time limit, so a
broken file can neither hang nor crash the run), embedded, rounded to float16 like the cache, and run
through the head. A file that cannot be used is a recorded failure; the other files are still predicted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.errors import first_line
from pipeline.progress import progress_bar
from pipeline.video.decode import DecodedClip, decode_sampled, is_video_file, enter_decode_worker
from pipeline.errors import UserError

FRAME_BATCH = 16  # frames per backbone call: bounds memory at 224x224 whatever T is


class PredictError(UserError):
    """Prediction cannot start: the model, its backbone or an option; the message says what to do."""


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


# --- the backbone the model's features were made with ------------------------------------------------------


def _weights_spec(recorded: str, override: str | None) -> tuple[str, str]:
    """(spec to build the backbone from, label to compare) for a recorded "<label> sha256:<hex>".

    A file is recorded by its name only, so it must be pointed at again (`--weights PATH`); its sha256 still
    has to match. ImageNet weights are only read from the local hub cache: predict never downloads.
    """
    label = recorded.split(" sha256:", 1)[0]
    if override is not None:
        return override, label
    if label.startswith("file:"):
        raise PredictError(f"the model's features were extracted with the weights file {label[5:]!r}: "
                           "pass --weights PATH to that file")
    if label == "imagenet":
        from pipeline.features.weights import cached_weights_file, imagenet_state_dict

        if cached_weights_file() is None:
            imagenet_state_dict(allow_download=False)  # raises WeightsError saying what to run
    return label, label


def _precision(recorded: Any, device: str) -> str:
    """The recorded precision where this device runs it; fp32 (the exact one) where it cannot."""
    from pipeline.features.backbone import resolve_device, resolve_precision

    precision = recorded if recorded in ("fp32", "bf16") else "auto"
    try:
        resolve_precision(precision, resolve_device(device))
    except ValueError:
        return "fp32"
    return precision


def rebuild_backbone(extraction: dict[str, Any], device: str, weights: str | None = None):
    """The backbone of `extraction` (a checkpoint's record), checked to make the very same features."""
    from pipeline.features.backbone import Backbone
    from pipeline.features.cache import extraction_settings, settings_mismatch
    from pipeline.features.weights import WeightsError

    spec, label = _weights_spec(str(extraction.get("weights", "")), weights)
    try:
        backbone = Backbone(spec, str(extraction.get("layer")), int(extraction.get("image_size") or 0), device,
                            _precision(extraction.get("precision"), device))
    except WeightsError as exc:
        raise PredictError(f"cannot rebuild the model's backbone: {first_line(exc, 200)}") from None
    except (ValueError, TypeError) as exc:
        raise PredictError(f"cannot rebuild the model's backbone ({first_line(exc, 200)})") from None
    frames = int(extraction.get("frames") or 0)
    diffs = settings_mismatch(extraction, extraction_settings(backbone.provenance(), frames, label))
    if diffs:
        detail = "; ".join(d.replace("cache has", "model has").replace("asked for", "here") for d in diffs[:3])
        raise PredictError(f"this backbone would not make the features the model was trained on ({detail}); "
                           "use the weights it was extracted with, or retrain")
    return backbone


# --- files ------------------------------------------------------------------------------------------------


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; a folder stands for the video files under it (sorted), so a whole set is one call."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_video_file(p))
            out.extend(found or [path])  # an empty folder stays, to be reported as a failure
        else:
            out.append(path)
    return list(dict.fromkeys(out))


def decode_task(task: tuple[str, int]) -> DecodedClip:
    """Worker-process entry point; a folder or an unreadable file raises, and becomes a recorded failure."""
    enter_decode_worker()
    path, frames = Path(task[0]), task[1]
    if path.is_dir():
        from pipeline.video.decode import VideoError

        raise VideoError("folder holds no video files")
    return decode_sampled(path, frames)


def _decoded(files: list[Path], frames: int, workers: int, timeout: float) -> Iterator[tuple[Path, Any]]:
    """(file, DecodedClip or the exception that stopped it), in completion order."""
    from pipeline.video.workers import TimedPool

    with TimedPool(decode_task, min(workers, len(files)), timeout) as pool:
        for (path, _), result in pool.imap_unordered((str(f), frames) for f in files):
            yield Path(path), result


# --- the model --------------------------------------------------------------------------------------------


def embed(backbone, frames: np.ndarray) -> "torch.Tensor":  # noqa: F821
    """uint8 (T, H, W, 3) -> float16 (T, C, h, w) on the CPU: the rows `extract` would have cached."""
    import torch

    blocks = [backbone.embed(torch.from_numpy(frames[i:i + FRAME_BATCH])).to(torch.float16).cpu()
              for i in range(0, len(frames), FRAME_BATCH)]
    return torch.cat(blocks)


def apply_head(model, features: "torch.Tensor", device) -> tuple[np.ndarray, np.ndarray]:  # noqa: F821
    """float16 (T, C, h, w) -> (video probabilities (K,), attention (T, h, w)), as evaluate computes them."""
    import torch

    from pipeline.head.model import video_probabilities
    from pipeline.head.training import autocast

    with torch.inference_mode(), autocast(device):
        out = model(features.unsqueeze(0).to(device))
    probs = video_probabilities(out.logits)[0].float().cpu().numpy()
    return probs, out.attention[0].float().cpu().numpy()


def top_classes(probs: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(classes[i], float(probs[i])) for i in order]


# --- the stage --------------------------------------------------------------------------------------------


def run(videos: list[Path], model_path: Path, *, top_k: int = 5, render_dir: Path | None = None,
        device: str = "auto", progress: bool = True, weights: str | None = None, strip_frames: int = 6,
        workers: int = 2, timeout: float = 60.0) -> list[Prediction]:
    """Predict every file of `videos` (folders expand to their videos) with `model_path`, in input order."""
    from pipeline.head.training import pick_device

    if top_k < 1:
        raise PredictError(f"--top-k must be at least 1, got {top_k}")
    files = expand(videos)
    if not files:
        raise PredictError("no video files given")
    ckpt = load_checkpoint(model_path)
    dev = pick_device(device)
    backbone = rebuild_backbone(ckpt.extraction, str(dev), weights)  # checks frames too
    frames, k = int(ckpt.extraction["frames"]), min(top_k, len(ckpt.classes))
    if [frames, *backbone.out_shape] != list(ckpt.feature_shape):
        raise PredictError(f"{model_path}: its backbone gives features {[frames, *backbone.out_shape]}, its head "
                           f"expects {list(ckpt.feature_shape)}: the checkpoint is inconsistent; retrain")
    model = ckpt.build().to(dev)
    names = unique_names(files)
    results: dict[Path, Prediction] = {}
    with progress_bar("predict", len(files), "files", enabled=progress) as bar:
        for path, decoded in _decoded(files, frames, workers, timeout):
            results[path] = _predict_one(path, decoded, backbone, model, ckpt, dev, k)
            if render_dir is not None and results[path].ok:
                _render(results[path], decoded, Path(render_dir), names[path], strip_frames)
            bar.advance(note=names[path])
    return [results[f] for f in files]


def load_checkpoint(path: Path):
    """`checkpoint.load`, with any file torch cannot unpickle also a one-line error (torch's weights-only
    unpickler raises KeyError, IndexError, ... on arbitrary bytes, beyond what `load` catches)."""
    from pipeline.head import checkpoint as ck

    try:
        return ck.load(path)
    except ck.CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever torch.load raises on a foreign file
        raise PredictError(f"{path}: not a readable head checkpoint ({exc.__class__.__name__}: "
                           f"{first_line(exc, 200)})") from None


def _predict_one(path: Path, decoded: Any, backbone, model, ckpt, dev, k: int) -> Prediction:
    """One file's prediction, or its failure when decoding did not give frames."""
    if isinstance(decoded, BaseException):
        return Prediction(path, error=first_line(decoded, 200))
    features = embed(backbone, decoded.frames)  # (T, C, h, w): T and the shape were checked up front
    probs, attention = apply_head(model, features, dev)
    return Prediction(path, top_classes(probs, ckpt.classes, k), probs, attention,
                      np.asarray(decoded.frame_index, dtype=np.int32), decoded.decoder)


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


def _render(pred: Prediction, decoded: DecodedClip, out_dir: Path, name: str, strip_frames: int) -> None:
    """Attention blended over the very frames that were embedded: a PNG strip and a GIF."""
    from pipeline.report.overlay import render_clip

    (top, p), rest = pred.topk[0], pred.topk[1:]
    caption = f"{top} {p:.0%}" + (f" (then {', '.join(f'{c} {q:.0%}' for c, q in rest)})" if rest else "")
    title = f"{pred.file.name}: {caption}"
    pred.rendered = {key: Path(value) for key, value in
                     render_clip(out_dir, name, decoded.frames, pred.attention, title, caption, strip_frames,
                                   frame_index=pred.frame_index).items()}


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


def print_table(predictions: list[Prediction], model_path: Path, console=None) -> None:
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
