"""Head checkpoints: a state_dict plus everything needed to trust and reuse it, loadable with weights_only.

A checkpoint is a plain dict of tensors, strings, numbers, lists and dicts, so `torch.load(path,
weights_only=True)` opens it without running any pickled code:

    format, format_version      "videoattn-head", 1
    state_dict                  the head's parameters
    head                        HeadConfig as a dict (cell, attention, channels, ...)
    classes                     class names, in the order of the logits
    feature_shape               [T, C, h, w] of the cached features it was trained on
    extraction                  the cache's extraction settings (backbone, layer, weights + sha256, frames, ...)
    cache                       where they came from: path, dataset_root, created, versions
    train                       TrainConfig as a dict, plus epoch and the validation metrics of that epoch

Stages that apply a checkpoint to features (evaluate, render, predict) call `require_same_extraction`, so
a head is never fed features made another way.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, HeadConfig
from pipeline.features import SETTINGS_KEYS, FeatureCache, settings_mismatch

FORMAT = "videoattn-head"
FORMAT_VERSION = 1


class CheckpointError(Exception):
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

    def build(self):
        """The head module with these weights loaded, in eval mode."""
        from pipeline.head import build_head

        model = build_head(self.head, self.feature_shape[1], len(self.classes))
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint weights do not fit its head config ({first})") from None
        return model.eval()


def cache_provenance(cache: FeatureCache) -> tuple[dict[str, Any], dict[str, Any]]:
    """(extraction settings, where-from) of a cache, as a checkpoint records them."""
    extraction = dict(cache.settings, precision=cache.attrs.get("precision"))
    origin = {"path": str(cache.path), "dataset_root": cache.attrs.get("dataset_root"),
              "created": cache.attrs.get("created"), "versions": cache.attrs.get("versions")}
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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
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
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:160]
        raise CheckpointError(f"{path}: not a readable head checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a head checkpoint of this pipeline "
                              "(expected one written by `python -m pipeline train`)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {payload.get('format_version')!r}; "
                              f"this pipeline reads {FORMAT_VERSION}")
    try:
        head_fields = {f.name for f in dataclasses.fields(HeadConfig)}
        head = HeadConfig(**{k: v for k, v in payload["head"].items() if k in head_fields})
        return Checkpoint(state_dict=payload["state_dict"], head=head, classes=list(payload["classes"]),
                          feature_shape=list(payload["feature_shape"]), extraction=dict(payload["extraction"]),
                          cache=dict(payload.get("cache") or {}), train=dict(payload.get("train") or {}))
    except (KeyError, TypeError, AttributeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: incomplete head checkpoint (missing {exc})") from None


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
