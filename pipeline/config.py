"""params.yaml sections as typed dataclasses.

Every stage reads its own section; command-line flags override single fields. Keeping the defaults here
(and only here) means `params.yaml`, `--help` and the code can never disagree about them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARAMS_FILE = "params.yaml"


@dataclass
class SynthConfig:
    seed: int = 0
    clips_per_class: int = 12
    frames: int = 48
    width: int = 160
    height: int = 120
    fps: float = 25.0


@dataclass
class ExtractConfig:
    weights: str = "imagenet"  # imagenet | random:<seed> | path to a state_dict
    frames: int = 30
    image_size: int = 224
    layer: str = "pool5"  # pool5 (7x7 at 224) | conv5_3 (14x14 at 224)
    batch_size: int = 32
    workers: int = 2
    timeout: float = 60.0  # seconds per clip before it is recorded as failed
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16


@dataclass
class SplitConfig:
    seed: int = 0
    val: float = 0.21  # the source study's 730/220/78 ~ 0.71/0.21/0.08
    test: float = 0.08


@dataclass
class HeadConfig:
    cell: str = "convlstm"  # convlstm | lstm | mean (no temporal memory: per-frame linear classifier)
    attention: str = "soft"  # soft | none
    channels: int = 48  # d: 48 keeps an epoch of 730 clips x 30 frames under 15 s on 2 CPU cores
    kernel: int = 3
    dropout: float = 0.5  # before the classifier
    feature_dropout: float = 0.5  # whole input channels, one mask per clip (training only)


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-2
    schedule: str = "cosine"  # cosine | step
    attention_reg: float = 1e-3
    patience: int = 8
    device: str = "auto"
    max_memory_gb: float = 8.0  # load the split into memory when it fits under this


@dataclass
class EvaluateConfig:
    split: str = "test"
    batch_size: int = 32


@dataclass
class RenderConfig:
    per_class: int = 2  # clips per class of the split (about half right, half wrong)
    strip_frames: int = 6  # frames shown in each PNG strip (evenly spaced over T)
    fps: float = 4.0  # frame rate of the attention GIFs
    alpha: float = 0.5  # opacity of the heatmap over the frame
    batch_size: int = 32  # clips per batch when the head runs


@dataclass
class DataConfig:
    videos: str = "data/videos"


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "synth": SynthConfig,
    "extract": ExtractConfig,
    "split": SplitConfig,
    "head": HeadConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "render": RenderConfig,
}



class ConfigError(ValueError):
    """A params file or override a user wrote that cannot be used."""


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params.yaml as a dict; an absent file is an empty one."""
    path = Path(path)
    if not path.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return data


def load_section(name: str, params: str | Path | None = PARAMS_FILE, **overrides: Any) -> Any:
    """Section `name` of params.yaml with non-None `overrides` applied on top of it."""
    cls = SECTIONS[name]
    raw = read_params(params).get(name, {}) if params is not None else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params section '{name}' must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"params section '{name}': unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = dict(raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def as_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
