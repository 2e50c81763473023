"""params.yaml sections as typed, validated dataclasses; flags override single fields.

Two sets of defaults, on purpose, and only these two:
* **the code's defaults** (the dataclasses below) are the settings for real datasets (HMDB-51, UCF-101):
  DESIGN's 30 frames at 224 through pool5, the source study's split fractions, 30 epochs;
* **params.yaml** (shipped beside dvc.yaml) holds the embedded synthetic set's settings, small enough that
  `dvc repro` runs in minutes on 2 CPU cores. A key params.yaml leaves out takes the code's default.
Both go through the same validation (`check`): a value of the wrong type or out of range, or a key that no
section knows, is one line naming the section, the key, the value and what is allowed (exit status 2).

Values are read the way people write them and tools write them: YAML 1.1 reads `3e-4` as a string (it
wants `3.0e-4`), and `dvc exp run -S train.epochs=2.0` writes a float, so numeric strings are accepted
where a number is expected and whole floats where an integer is.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

PARAMS_FILE = "params.yaml"

# The allowed values of the choice settings; head.py, backbone.py and training.py use these same tuples.
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
COMPILES = ("auto", "on", "off")
LAYERS = ("pool5", "conv5_3")
CELLS = ("convlstm", "lstm", "mean")
ATTENTIONS = ("soft", "none")
SCHEDULES = ("cosine", "step")
READOUTS = ("attention", "mean")
MOTIONS = ("none", "prior", "input")
SPLITS = ("train", "val", "test")


class ConfigError(UserError, ValueError):
    """A params file or override a user wrote that cannot be used."""


def _setting(default: Any, *, choices: tuple[str, ...] | None = None, at_least: float | None = None,
             above: float | None = None, below: float | None = None, at_most: float | None = None,
             odd: bool = False, even: bool = False) -> Any:
    """A dataclass field with the rule its values must follow (checked by `check`)."""
    rule = {"choices": choices, "at_least": at_least, "above": above, "below": below, "at_most": at_most,
            "odd": odd, "even": even}
    return field(default=default, metadata={"rule": rule})


@dataclass
class DataConfig:
    videos: str = "data/videos"


@dataclass
class SynthConfig:
    seed: int = _setting(0, at_least=0)
    clips_per_class: int = _setting(12, at_least=1)
    frames: int = _setting(48, at_least=2)
    width: int = _setting(160, at_least=16, even=True)  # yuv420p needs even sizes
    height: int = _setting(120, at_least=16, even=True)
    fps: float = _setting(25.0, above=0)


@dataclass
class ExtractConfig:
    weights: str = "imagenet"  # imagenet | random:<seed> | path to a state_dict
    frames: int = _setting(30, at_least=1)
    image_size: int = _setting(224, at_least=32)
    layer: str = _setting("pool5", choices=LAYERS)  # pool5 (7x7 at 224) | conv5_3 (14x14 at 224)
    batch_size: int = _setting(32, at_least=1)
    workers: int = _setting(2, at_least=1)
    timeout: float = _setting(60.0, above=0)  # seconds per clip before it is recorded as failed
    device: str = _setting("auto", choices=DEVICES)
    precision: str = _setting("auto", choices=PRECISIONS)
    compile: str = _setting("auto", choices=COMPILES)  # the trunk through torch.compile; auto: when it pays back
    shard_clips: int = _setting(32, at_least=1)  # clips per shard flushed: what a crash can lose at most
    ray_cpus: int = _setting(0, at_least=0)  # --engine ray, a local Ray: CPUs it may use (0: every core)
    ray_threads: int = _setting(0, at_least=0)  # --engine ray: torch threads per backbone actor (0: sized)


@dataclass
class SplitConfig:
    seed: int = 0
    val: float = _setting(0.21, at_least=0, below=1)  # the source study's 730/220/78 ~ 0.71/0.21/0.08
    test: float = _setting(0.08, at_least=0, below=1)


@dataclass
class HeadConfig:
    cell: str = _setting("convlstm", choices=CELLS)  # mean: no temporal memory (per-frame linear classifier)
    attention: str = _setting("soft", choices=ATTENTIONS)
    readout: str = _setting("attention", choices=READOUTS)  # convlstm only: r_t = sum_i A_ti H_ti, or avgpool(H_t)
    channels: int = _setting(48, at_least=1)  # d: 48 keeps an epoch of 730 clips x 30 frames under 15 s on 2 cores
    kernel: int = _setting(3, at_least=1, odd=True)  # same padding needs an odd kernel
    dropout: float = _setting(0.5, at_least=0, below=1)  # before the classifier
    feature_dropout: float = _setting(0.5, at_least=0, below=1)  # whole input channels, one mask per clip
    # none: no motion term | prior: + beta * log M~_t on Z_t | input: the prior, and log(1 + D_t) as one more
    # channel of P_t (soft attention only). input: 74% on the fight set's val splits, prior 67%, none 66%
    motion: str = _setting("input", choices=MOTIONS)

    @property
    def label(self) -> str:
        """"convlstm/soft/attention": the cell, the attention and, where it applies, the readout."""
        label = f"{self.cell}/{self.attention}" + (f"/{self.readout}" if self.cell == "convlstm" else "")
        guided = self.motion != "none" and self.cell != "mean" and self.attention == "soft"
        return label + (f"/motion-{self.motion}" if guided else "")


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = _setting(30, at_least=1)
    batch_size: int = _setting(16, at_least=1)
    lr: float = _setting(3e-4, above=0)  # on the fight set's val splits 3e-4 beat 1e-3 and 1e-4 (docs/BENCHMARKS.md)
    weight_decay: float = _setting(1e-2, at_least=0)
    schedule: str = _setting("cosine", choices=SCHEDULES)
    attention_reg: float = _setting(0.0, at_least=0)  # Sharma's term spreads attention: against localising
    motion_lr: float = _setting(1e-2, at_least=0)  # beta's own rate: at the main rate it barely leaves 1
    patience: int = _setting(8, at_least=1)
    device: str = _setting("auto", choices=DEVICES)
    max_memory_gb: float = _setting(8.0, at_least=0)  # load the split into memory when it fits under this
    loader_workers: int = _setting(2, at_least=0)  # a streamed split: reader processes, each its own handle


@dataclass
class EvaluateConfig:
    split: str = _setting("test", choices=SPLITS)
    batch_size: int = _setting(32, at_least=1)
    deletion_draws: int = _setting(20, at_least=0)  # random deletions per k beside the top-k one; 0: no test
    device: str = _setting("auto", choices=DEVICES)


@dataclass
class RenderConfig:
    per_class: int = _setting(2, at_least=0)  # clips per class of the split (about half right, half wrong)
    strip_frames: int = _setting(6, at_least=1)  # frames shown in each PNG strip (evenly spaced over T)
    fps: float = _setting(4.0, above=0)  # frame rate of the attention GIFs
    alpha: float = _setting(0.5, at_least=0, at_most=1)  # opacity of the heatmap over the frame
    batch_size: int = _setting(32, at_least=1)  # clips per batch when the head runs
    device: str = _setting("auto", choices=DEVICES)
    # the split it draws is evaluate.split: the page shows that split's eval.json beside its clips


@dataclass
class PredictConfig:
    top_k: int = _setting(5, at_least=1)  # classes shown per file (at most the model's classes)
    device: str = _setting("auto", choices=DEVICES)
    timeout: float = _setting(60.0, above=0)  # seconds per file before it is recorded as failed
    compile: str = _setting("auto", choices=COMPILES)  # as extract.compile, decided on the files' frames
    # its strips and GIFs are drawn with render's strip_frames, fps and alpha


@dataclass
class WatchConfig:
    window: int = _setting(0, at_least=0)  # T: sampled frames the head scores at once (0: the model's frames)
    stride: int = _setting(1, at_least=1)  # S: a window is scored every S sampled frames
    top_k: int = _setting(3, at_least=1)  # classes shown per window (at most the model's classes)
    threshold: float = _setting(0.8, above=0, at_most=1)  # an event starts at this window probability
    hysteresis: float = _setting(0.2, at_least=0, below=1)  # ... and ends below threshold - hysteresis
    min_duration: float = _setting(1.0, at_least=0)  # seconds an event must last to be reported
    queue: int = _setting(8, at_least=1)  # a live source: sampled frames waiting; beyond, the oldest is dropped
    read_timeout: float = _setting(10.0, above=0)  # seconds without a frame before a source counts as stalled
    device: str = _setting("auto", choices=DEVICES)
    batch: int = _setting(8, at_least=1)  # most sampled frames the backbone embeds at once (a file; a backlog)
    compile: str = _setting("auto", choices=COMPILES)  # as extract.compile, on the run's sampled frames (live: many)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "synth": SynthConfig,
    "extract": ExtractConfig,
    "split": SplitConfig,
    "head": HeadConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "render": RenderConfig,
    "predict": PredictConfig,
    "watch": WatchConfig,
}

_TYPES = {"int": int, "float": float, "str": str}


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params.yaml as a dict, every section checked; an absent file is an empty one."""
    path = Path(path)
    if not path.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    unknown = sorted(str(name) for name in data if name not in SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    for name, raw in data.items():  # a mistake in any section fails now, not after an hour of extraction
        make(name, _mapping(raw, name, path), where=str(path))
    return data


def _mapping(raw: Any, name: str, path: Path | str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: section '{name}' must be a mapping of key: value, got {raw!r}")
    return raw


def load_section(name: str, params: str | Path | None = PARAMS_FILE, **overrides: Any) -> Any:
    """Section `name` of params.yaml (defaults for what it leaves out), with non-None `overrides` on top."""
    raw = _mapping(read_params(params).get(name), name, params) if params is not None else {}
    cfg = make(name, raw, where=str(params))
    flags = {key: value for key, value in overrides.items() if value is not None}
    return make(name, {**as_dict(cfg), **flags}, where="the command line") if flags else cfg


def make(name: str, values: dict[str, Any], where: str = "params") -> Any:
    """The dataclass of section `name` from `values`, every key known, every value converted and checked."""
    cls = SECTIONS[name]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ConfigError(f"{where}: {name}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return check(cls(**values), where)


def check(cfg: Any, where: str = "params") -> Any:
    """`cfg` with every field converted to its declared type and checked against its rule.

    Stages call this on the config they are given too, so the Python API gets the same checks as the CLI.
    """
    name = next((n for n, c in SECTIONS.items() if isinstance(cfg, c)), type(cfg).__name__)
    converted = {}
    for f in dataclasses.fields(cfg):
        value = _convert(getattr(cfg, f.name), _TYPES[str(f.type)], f"{where}: {name}.{f.name}")
        _apply_rule(value, f.metadata.get("rule"), f"{where}: {name}.{f.name}")
        converted[f.name] = value
    return dataclasses.replace(cfg, **converted)


def _convert(value: Any, kind: type, label: str) -> Any:
    """`value` as `kind`: whole floats and integer strings as int, numeric strings as float."""
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{label} = {value!r}: expected text")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{label} = {value!r}: expected {'a whole number' if kind is int else 'a number'}")
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"{label} = {value!r}: expected {'a whole number' if kind is int else 'a number'}"
                              ) from None
    if not math.isfinite(number):
        raise ConfigError(f"{label} = {value!r}: expected a finite number")
    if kind is int:
        if float(number) != int(number):
            raise ConfigError(f"{label} = {value!r}: expected a whole number")
        return int(number)
    return float(number)


def _apply_rule(value: Any, rule: dict[str, Any] | None, label: str) -> None:
    if not rule:
        return
    if rule["choices"] is not None and value not in rule["choices"]:
        raise ConfigError(f"{label} = {value!r}: must be one of {', '.join(rule['choices'])}")
    bounds = (("at_least", lambda v, b: v >= b, ">="), ("above", lambda v, b: v > b, ">"),
              ("below", lambda v, b: v < b, "<"), ("at_most", lambda v, b: v <= b, "<="))
    if any(rule[key] is not None and not holds(value, rule[key]) for key, holds, _ in bounds):
        allowed = " and ".join(f"{sign} {rule[key]:g}" for key, _, sign in bounds if rule[key] is not None)
        raise ConfigError(f"{label} = {value!r}: must be {allowed}")
    if rule["odd"] and value % 2 == 0:
        raise ConfigError(f"{label} = {value!r}: must be odd")
    if rule["even"] and value % 2:
        raise ConfigError(f"{label} = {value!r}: must be even")


def code_default(section: str, key: str) -> Any:
    """The code's default of `section.key` (what applies where params.yaml leaves the key out)."""
    return getattr(SECTIONS[section](), key)


def as_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
