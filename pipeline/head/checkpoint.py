"""Head checkpoints: a state_dict plus everything needed to trust and reuse it, loadable with weights_only.

A checkpoint is a plain dict of tensors, strings, numbers, lists and dicts, so `torch.load(path,
weights_only=True)` opens it without running any pickled code:

    format, format_version      "videoattn-head", 1
    state_dict                  the head's parameters
    head                        HeadConfig as a dict (cell, attention, channels, ...)
    classes                     class names, in the order of the logits
    feature_shape               [T, C, h, w] of the cached features it was trained on
    extraction                  the cache's extraction settings (backbone, layer, weights + sha256, frames, ...)
    cache                       where they came from: path, dataset_root (as the cache records it: relative to
                                the cache's folder), versions; created where the cache has it
    train                       TrainConfig as a dict, plus epoch and the validation metrics of that epoch,
                                and sample_interval: the train clips' mean seconds between sampled frames
                                (what `watch` samples a stream at; `sample_interval()` for older files)

Stages that apply a checkpoint to features (evaluate, render, predict) call `require_same_extraction`, so
a head is never fed features made another way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import BEFORE_THE_KEY, HeadConfig
from pipeline.errors import UserError, first_line
from pipeline.features.cache import FeatureCache
from pipeline.features.provenance import SETTINGS_KEYS, settings_mismatch
from pipeline.files import atomic_file

FORMAT = "videoattn-head"
FORMAT_VERSION = 1
REQUIRED = ("state_dict", "head", "classes", "feature_shape", "extraction")  # cache and train are optional


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


@dataclass
class Checkpoint:
    state_dict: dict[str, Any]
    head: HeadConfig
    classes: list[str]
    feature_shape: list[int]  # [T, C, h, w]
    extraction: dict[str, Any]
    cache: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file `load` read it from, named in build's errors; not saved

    def build(self):
        """The head module with these weights loaded, in eval mode.

        Whatever a checkpoint's contents make fail here (a head config build_head refuses, weights of
        other shapes) is the checkpoint's fault, not the caller's: a CheckpointError, never a traceback.
        """
        from pipeline.head.model import build_head

        where = f"{self.source}: " if self.source else ""
        try:
            model = build_head(self.head, self.feature_shape[1], len(self.classes))
        except Exception as exc:  # noqa: BLE001 - ConfigError, TypeError, IndexError: one meaning here
            raise CheckpointError(f"{where}checkpoint head config cannot be built ({first_line(exc)})") from None
        try:
            model.load_state_dict(self.state_dict)
        except Exception as exc:  # noqa: BLE001 - RuntimeError on shapes, TypeError/AttributeError on types
            first = first_line(exc)
            raise CheckpointError(f"{where}checkpoint weights do not fit its head config ({first})") from None
        return model.eval()


def cache_provenance(cache: FeatureCache) -> tuple[dict[str, Any], dict[str, Any]]:
    """(extraction settings, where-from) of a cache, as a checkpoint records them."""
    extraction = dict(cache.settings, precision=cache.precision_summary)
    origin = {"path": str(cache.path), "dataset_root": cache.attrs.get("dataset_root"),
              "versions": cache.attrs.get("versions")}
    if cache.attrs.get("created"):  # a cache before 2026-12-07, or one made under SOURCE_DATE_EPOCH
        origin["created"] = cache.attrs["created"]
    return extraction, origin


def save(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write `ckpt` to `path` atomically (temporary file, fsync, rename): never a half-written model."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "head": dataclasses.asdict(ckpt.head), "classes": list(ckpt.classes),
        "feature_shape": [int(v) for v in ckpt.feature_shape], "extraction": ckpt.extraction,
        "cache": ckpt.cache, "train": ckpt.train,
    }
    with atomic_file(path) as fh:
        torch.save(payload, fh)
    return path


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by `save`; anything else (corrupt, foreign, newer) is a CheckpointError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; run `python -m pipeline train` first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds (KeyError on text files) for one meaning
        raise CheckpointError(f"{path}: not a readable head checkpoint ({first_line(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a head checkpoint of this pipeline "
                              "(expected one written by `python -m pipeline train`)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {payload.get('format_version')!r}; "
                              f"this pipeline reads {FORMAT_VERSION}")
    missing = [name for name in REQUIRED if name not in payload]
    if missing:
        raise CheckpointError(f"{path}: incomplete head checkpoint (missing {', '.join(missing)})")
    problem = _type_problem(payload)
    if problem:
        raise CheckpointError(f"{path}: malformed head checkpoint: {problem}")
    head_fields = {f.name for f in dataclasses.fields(HeadConfig)}
    try:  # _type_problem checks what it knows; anything else of a foreign payload is one line too
        head = {**BEFORE_THE_KEY["head"], **{k: v for k, v in payload["head"].items() if k in head_fields}}
        return Checkpoint(state_dict=dict(payload["state_dict"]), head=HeadConfig(**head),
                          classes=list(payload["classes"]), feature_shape=list(payload["feature_shape"]),
                          extraction=dict(payload["extraction"]), cache=dict(payload.get("cache") or {}),
                          train=dict(payload.get("train") or {}), source=str(path))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a readable head checkpoint ({exc.__class__.__name__}: "
                              f"{first_line(exc, 200)})") from None


def _type_problem(payload: dict[str, Any]) -> str | None:
    """What is ill-typed in a payload that has every field, or None: torch.load(weights_only) only
    promises plain containers, so a foreign or hand-edited file must not get as far as build_head."""
    import torch

    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        return f"state_dict must map names to tensors, got {_short(state)}"
    shape = payload["feature_shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 4 and all(_is_int(v) and v > 0 for v in shape)):
        return f"feature_shape must be 4 positive ints [T, C, h, w], got {_short(shape)}"
    classes = payload["classes"]
    if not (isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes)):
        return f"classes must be a non-empty list of names, got {_short(classes)}"
    if len(set(classes)) != len(classes):
        return "classes repeat a name"
    for name in ("head", "extraction", "cache", "train"):  # cache and train may also be absent or None
        value = payload.get(name) if name in REQUIRED else payload.get(name) or {}
        if not isinstance(value, dict):
            return f"{name} must be a mapping, got {_short(value)}"
    return _head_problem(payload["head"])


def _head_problem(head: dict[str, Any]) -> str | None:
    """A head field whose type is not its HeadConfig default's (bool is no int here, int is a float)."""
    for f in dataclasses.fields(HeadConfig):
        if f.name not in head:
            continue
        kind = type(f.default)
        if not _fits(head[f.name], kind):
            return f"head.{f.name} must be {kind.__name__}, got {_short(head[f.name])}"
    return None


def _fits(value: Any, kind: type) -> bool:
    if kind is int:
        return _is_int(value)
    if kind is float:
        return _is_int(value) or isinstance(value, float)
    return isinstance(value, kind)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, dict) else f"a dict of {len(value)}"
    return text if len(text) <= 60 else text[:57] + "..."


def require_same_extraction(ckpt: Checkpoint, extraction: dict[str, Any], where: str) -> None:
    """Refuse to apply `ckpt` to features whose extraction settings differ from those it was trained on."""
    diffs = settings_mismatch({k: ckpt.extraction.get(k) for k in SETTINGS_KEYS},
                              {k: extraction.get(k) for k in SETTINGS_KEYS})
    if diffs:
        detail = "; ".join(d.replace("cache has", "model has").replace("asked for", f"{where} has") for d in diffs[:3])
        raise CheckpointError(f"the model was trained on features extracted differently from {where} ({detail}); "
                              "retrain on this cache or extract with the model's settings")


def require_classes(ckpt: Checkpoint, classes: list[str], where: str) -> None:
    """Refuse a cache whose class list is not the model's: label ids would mean other classes."""
    if list(classes) != list(ckpt.classes):
        missing = sorted(set(classes) - set(ckpt.classes))
        hint = f" (e.g. {', '.join(missing[:3])} unknown to the model)" if missing else ""
        raise CheckpointError(f"{where} has classes other than the model's {len(ckpt.classes)}{hint}; "
                              "retrain on this cache")


# --- the rate the clips were sampled at (what `watch` samples a stream at) ----------------------------------

# A checkpoint from before the interval was recorded: its clips are taken as 2 s long (HMDB-51's and the
# fight set's clips are 2-5 s; the embedded set's 48 frames at 25 fps are 1.9 s), so T frames span 2 s.
FALLBACK_CLIP_SECONDS = 2.0


def clips_sample_interval(frame_index, fps) -> float | None:
    """The mean time in seconds between the sampled frames of clips (frame_index (N, T), fps (N,)): per clip
    the mean step of its frame_index over its fps, then the mean over the clips; None where no clip says
    (a clip with one sampled frame, or no usable fps, is left out)."""
    import numpy as np

    index = np.asarray(frame_index, dtype=np.float64)
    rate = np.asarray(fps, dtype=np.float64)
    if index.ndim != 2 or index.shape[1] < 2 or not len(index):
        return None
    step = (index[:, -1] - index[:, 0]) / (index.shape[1] - 1)  # (N,) frames between samples, on average
    usable = np.isfinite(rate) & (rate > 0) & (step > 0)
    if not usable.any():
        return None
    return float(np.mean(step[usable] / rate[usable]))


def sample_interval(ckpt: Checkpoint) -> tuple[float, str | None]:
    """(seconds between sampled frames the head was trained on, None), or for a checkpoint that does not
    record it, (FALLBACK_CLIP_SECONDS / T, a one-line note saying so)."""
    recorded = ckpt.train.get("sample_interval")
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and recorded > 0:
        return float(recorded), None
    frames = max(int(ckpt.feature_shape[0]), 1)
    interval = FALLBACK_CLIP_SECONDS / frames
    return interval, (f"{ckpt.source or 'the checkpoint'} does not record its clips' sampling interval (trained "
                      f"before it was recorded): taking {FALLBACK_CLIP_SECONDS:g} s clips, one frame every "
                      f"{interval:.3f} s ({frames} frames); retrain to record the real one")
