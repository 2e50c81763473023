"""params.yaml sections as typed, validated dataclasses; flags override single fields.

Two sets of defaults, on purpose, and only these two:
* **the code's defaults** (the dataclasses below) are the settings for real datasets (HMDB-51, UCF-101):
  the 30 frames at 224 through pool5 of docs/DESIGN.md, the source study's split fractions, 30 epochs;
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

# The allowed values of the choice settings; pipeline/head/model.py, pipeline/features/backbone.py and
# pipeline/head/fit.py use these same tuples.
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
COMPILES = ("auto", "on", "off")
LAYERS = ("pool5", "conv5_3")
CELLS = ("convlstm", "lstm", "mean")
ATTENTIONS = ("soft", "none")
SCHEDULES = ("cosine", "step")
READOUTS = ("attention", "mean")
MOTIONS = ("none", "prior", "input")
APPEARANCES = ("auto", "none", "attended", "mean")
SPLITS = ("train", "val", "test")
# head.appearance auto: the attended appearance term below this many train clips a class (docs/DESIGN.md)
APPEARANCE_AUTO_BELOW = 50

# what a setting added later was before it existed: a checkpoint or a training state written without the key loads
# and compares as what it was trained with, never as today's default
BEFORE_THE_KEY = {
    "head": {"readout": "mean", "motion": "none", "appearance": "none", "heads": 1},
    "train": {"jitter": 0.0, "ema_epochs": 0.0},
}


class ConfigError(UserError, ValueError):
    """A params file or override a user wrote that cannot be used."""


def _setting(default: Any, help: str = "", *, choices: tuple[str, ...] | None = None, at_least: float | None = None,
             above: float | None = None, below: float | None = None, at_most: float | None = None,
             odd: bool = False, even: bool = False) -> Any:
    """A dataclass field, its help (the CLI's `--help` for its flag) and the rule its values follow (`check`)."""
    rule = {"choices": choices, "at_least": at_least, "above": above, "below": below, "at_most": at_most,
            "odd": odd, "even": even}
    return field(default=default, metadata={"rule": rule, "help": help})


def _device(help: str = "auto | cpu | cuda.") -> Any:
    return _setting("auto", help, choices=DEVICES)


def _compile(help: str) -> Any:
    return _setting("auto", "auto | on | off: the trunk through torch.compile" + help, choices=COMPILES)


def help_of(f: dataclasses.Field) -> str:
    """A field's help: what `--help` says of its flag."""
    return f.metadata.get("help", "")


@dataclass
class DataConfig:
    videos: str = _setting("data/videos", "Dataset root: <videos>/<class>/<clip>.avi|mp4|...")


@dataclass
class SynthConfig:
    seed: int = _setting(0, "Random seed; the same seed gives the same dataset.", at_least=0)
    clips_per_class: int = _setting(12, "Clips per class.", at_least=1)
    frames: int = _setting(48, "Frames per clip.", at_least=2)
    width: int = _setting(160, "Frame width (even).", at_least=16, even=True)  # yuv420p needs even sizes
    height: int = _setting(120, "Frame height (even).", at_least=16, even=True)
    fps: float = _setting(25.0, "Frame rate of the clips.", above=0)


@dataclass
class ExtractConfig:
    weights: str = _setting("imagenet", "imagenet | random:<seed> | path to a VGG-16 state_dict.")
    frames: int = _setting(30, "Frames sampled per clip (T).", at_least=1)
    image_size: int = _setting(224, "Frames are resized whole to SxS.", at_least=32)
    layer: str = _setting("pool5", "pool5 (7x7 at 224) | conv5_3 (14x14).", choices=LAYERS)
    batch_size: int = _setting(32, "Frames per backbone batch (spans clips).", at_least=1)
    workers: int = _setting(2, "Decoding worker processes.", at_least=1)
    timeout: float = _setting(60.0, "Seconds per clip before it is recorded as failed.", above=0)
    device: str = _device()
    precision: str = _setting("auto", "auto | fp32 | bf16 | int8 (int8 is opt-in: README \"Extracting a real "
                              "dataset\").", choices=PRECISIONS)
    compile: str = _compile(" (auto: on a CPU, when the run has frames enough to win the compilation back).")
    shard_clips: int = _setting(32, "Clips per shard written as the run goes: the most a crash can lose.",
                                at_least=1)
    ray_cpus: int = _setting(0, "With --engine ray and no --address: CPUs the local Ray may use (0: every core).",
                             at_least=0)
    ray_threads: int = _setting(0, "With --engine ray: torch threads per backbone actor (0: its share of the CPUs).",
                                at_least=0)


@dataclass
class SplitConfig:
    seed: int = _setting(0, "Seed of the stratified split (and of val carved from train).")
    # the source study's 730/220/78 clips of HMDB-51 ~ 0.71/0.21/0.08
    val: float = _setting(0.21, "Fraction of each class for val (of train, with official lists).", at_least=0,
                          below=1)
    test: float = _setting(0.08, "Fraction of each class for test (stratified split only).", at_least=0, below=1)


@dataclass
class HeadConfig:
    cell: str = _setting("convlstm", "convlstm | lstm | mean (no temporal memory: the baseline).", choices=CELLS)
    attention: str = _setting("soft", "soft | none (uniform attention).", choices=ATTENTIONS)
    readout: str = _setting(
        "attention", "attention: the classifier reads sum_i A_ti H_ti, so evidence reaches it only through the "
        "attention | mean: avgpool(H_t), the first design. ConvLSTM only: does not apply to --cell lstm or mean.",
        choices=READOUTS)
    # d: 48 keeps an epoch of 730 clips x 30 frames under 15 s on 2 cores (docs/BENCHMARKS.md)
    channels: int = _setting(48, "Hidden channels d of the head.", at_least=1)
    kernel: int = _setting(3, "ConvLSTM kernel size k (odd).", at_least=1, odd=True)  # same padding: odd
    dropout: float = _setting(0.5, "Dropout before the classifier.", at_least=0, below=1)
    feature_dropout: float = _setting(0.5, "Training-time dropout of whole input channels (one mask per clip, "
                                      "shared over frames and positions).", at_least=0, below=1)
    # soft attention only; why input is the default: docs/DESIGN.md "Motion", figures in docs/BENCHMARKS.md
    motion: str = _setting(
        "input", "input: the prior, and each cell's amount of motion log(1 + D_t) as one more input channel | "
        "prior: the clip's own motion map M~_t (from its cached features) is added to the attention logits as "
        "beta * log M~_t, beta learned | none: no motion term (the first head).", choices=MOTIONS)
    # none | attended: + W_g LN(sum_i A_ti X_ti), the frame's appearance read through the attention, on y_t |
    # mean: the same with the plain mean over the cells (reads past the attention: kept to measure against) |
    # auto: attended on a small train split, none on a larger one (for_train_split; docs/DESIGN.md "Small real
    # datasets": on the fight set it helped at every size measured below 50 clips a class and cost at 73)
    appearance: str = _setting(
        "auto", f"auto: attended where the train split holds fewer than {APPEARANCE_AUTO_BELOW} clips a class, "
        "else none | attended: the frame's features weighted by the attention, W_g LN(sum_i A_ti X_ti), added to "
        "the logits | mean: the same with the plain mean (reads past the attention) | none.", choices=APPEARANCES)
    heads: int = _setting(1, "Heads trained together from different initial weights; the model's video probability "
                          "is the mean of theirs, its map the mean of their maps.", at_least=1)

    @property
    def uses_motion(self) -> bool:
        """Motion guides the attention (motion: prior | input): only a soft attention can be guided."""
        return self.motion in ("prior", "input") and self.attention == "soft" and self.cell != "mean"

    @property
    def motion_channels(self) -> int:
        """Channels that motion adds to P_t: 1 (log(1 + D_t)) for motion: input where motion applies, else 0."""
        return int(self.uses_motion and self.motion == "input")

    def for_train_split(self, clips_a_class: float) -> HeadConfig:
        """This config with `appearance: auto` made concrete for a train split of `clips_a_class` clips a class
        (its mean over the classes): the head that is built, trained and saved. Any other value is kept."""
        if self.appearance != "auto":
            return self
        return dataclasses.replace(self, appearance="attended" if clips_a_class < APPEARANCE_AUTO_BELOW else "none")

    @property
    def uses_appearance(self) -> bool:
        """The appearance term applies to the attention heads (mean has no attention to read through)."""
        return self.appearance not in ("none", "auto") and self.cell != "mean"

    @property
    def label(self) -> str:
        """"convlstm/soft/attention": the cell, the attention and, where it applies, the readout."""
        label = f"{self.cell}/{self.attention}" + (f"/{self.readout}" if self.cell == "convlstm" else "")
        label += f"/motion-{self.motion}" if self.uses_motion else ""
        label += f"/appearance-{self.appearance}" if self.uses_appearance else ""
        return label + (f" x{self.heads}" if self.heads > 1 else "")


@dataclass
class TrainConfig:
    seed: int = _setting(0, "Seed: the same seed gives the same model.")
    epochs: int = _setting(30, "Most epochs to train.", at_least=1)
    batch_size: int = _setting(16, "Clips per batch.", at_least=1)
    # on the fight set's val splits 3e-4 beat 1e-3 and 1e-4 (docs/BENCHMARKS.md)
    lr: float = _setting(3e-4, "AdamW learning rate.", above=0)
    weight_decay: float = _setting(1e-2, "AdamW weight decay (not on biases).", at_least=0)
    schedule: str = _setting("cosine", "cosine | step (x0.1 at 1/2 and 3/4 of the epochs).", choices=SCHEDULES)
    attention_reg: float = _setting(0.0, "Weight of Sharma et al.'s attention regulariser (0: off; it spreads "
                                    "attention over every cell).", at_least=0)  # against localising
    # beta's own rate: at the main rate it barely leaves 1
    motion_lr: float = _setting(1e-2, "Learning rate of the motion prior's weight beta.", at_least=0)
    # temporal jitter: why, docs/DESIGN.md "Small real datasets"
    jitter: float = _setting(0.0, "Temporal jitter: each clip trains on a window of (1 - jitter) of its cached "
                             "frames at a random offset (evaluation reads them all).", at_least=0, below=1)
    # weight averaging: why, pipeline/head/average.py and docs/DESIGN.md "Small real datasets"
    ema_epochs: float = _setting(0.0, "Validate, select and save a moving average of the weights over about this "
                                 "many recent epochs (0: the weights as they are).", at_least=0)
    patience: int = _setting(8, "Stop after this many epochs without a better val loss.", at_least=1)
    device: str = _device("auto | cpu | cuda (bf16 autocast on CUDA).")
    max_memory_gb: float = _setting(8.0, "Load a split into memory when it fits under this; else stream it from "
                                    "the cache.", at_least=0)
    loader_workers: int = _setting(2, "A streamed split: data-loader processes reading ahead, each with its own "
                                   "handle on the cache (0: a thread).", at_least=0)


@dataclass
class EvaluateConfig:
    split: str = _setting("test", "Which split to evaluate: test | val | train.", choices=SPLITS)
    batch_size: int = _setting(32, "Clips per batch.", at_least=1)
    deletion_draws: int = _setting(20, "Random deletions per k beside the top-k one (0: no deletion test).",
                                   at_least=0)
    device: str = _device()


@dataclass
class RenderConfig:
    per_class: int = _setting(2, "Clips per class of the split (half right, half wrong).", at_least=0)
    strip_frames: int = _setting(6, "Frames in each PNG strip.", at_least=1)  # evenly spaced over T
    fps: float = _setting(4.0, "Frame rate of the GIFs.", above=0)
    alpha: float = _setting(0.5, "Opacity of the heatmap over the frame (0-1).", at_least=0, at_most=1)
    batch_size: int = _setting(32, "Clips per batch when the head runs.", at_least=1)
    device: str = _device()
    # the split it draws is evaluate.split: the page shows that split's eval.json beside its clips


@dataclass
class PredictConfig:
    top_k: int = _setting(5, "Classes shown per file (at most the model's classes).", at_least=1)
    device: str = _device()
    timeout: float = _setting(60.0, "Seconds per file before it is recorded as failed.", above=0)
    compile: str = _compile(", as extract.")  # decided on the files' frames
    # its strips and GIFs are drawn with render's strip_frames, fps and alpha


@dataclass
class WatchConfig:
    window: int = _setting(0, "T: sampled frames each window scores (0: the model's frames).", at_least=0)
    stride: int = _setting(1, "S: a window is scored every S sampled frames.", at_least=1)
    top_k: int = _setting(3, "Classes shown per window.", at_least=1)  # at most the model's classes
    threshold: float = _setting(0.8, "An event starts when a window's probability reaches this.", above=0,
                                at_most=1)
    hysteresis: float = _setting(0.2, "... and ends when it falls below threshold - hysteresis.", at_least=0,
                                 below=1)
    min_duration: float = _setting(1.0, "Seconds an event must last to be reported.", at_least=0)
    queue: int = _setting(8, "A live source: sampled frames that may wait for the model; beyond, the oldest is "
                          "dropped (bounds the latency).", at_least=1)
    read_timeout: float = _setting(10.0, "Seconds without a frame before the source counts as stalled (broken).",
                                   above=0)
    device: str = _device()
    batch: int = _setting(8, "Most sampled frames the backbone embeds at once.", at_least=1)  # a file; a backlog
    compile: str = _compile(", as extract (auto: a file by its length; a stream, a camera or --realtime stays "
                            "eager, on compiles them too and their first frames wait for the compilation).")


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
