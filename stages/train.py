"""Stage `train`: fit the attention head on the cached features of the train split, select on val.

Writes the best checkpoint (lowest validation loss) to `model`, metrics/train.json and per-epoch curves
plots/train/{loss,accuracy}.tsv (DVC's linear plots). After every epoch it also writes `<model>.resume`
(model, optimiser, schedule and random state), so `--resume` continues an interrupted or finished run
exactly where it stopped; the curves and metrics are rewritten every epoch too, so a crash loses at most
the epoch in flight. An epoch whose loss is not finite stops the run and is not recorded: the best epoch so
far stays the model, and a run with no good epoch at all is an error that writes nothing.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.head import checkpoint as ck
from pipeline.head.batches import open_split
from pipeline.config import HeadConfig, TrainConfig, check
from pipeline.features.cache import FeatureCache
from pipeline.files import atomic_file, write_json_atomic, write_tsv_atomic
from pipeline.progress import progress_bar
from pipeline.errors import UserError

RESUME_SUFFIX = ".resume"
RESUME_FORMAT = "videoattn-train-state"


class TrainError(UserError):
    """Training cannot write its outputs or produced no model; the message says what to do."""


@dataclass
class Epoch:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_frame_accuracy: float
    lr: float
    seconds: float


@dataclass
class TrainSummary:
    model: Path
    parameters: int
    device: str
    in_memory: bool
    train_clips: int
    val_clips: int
    history: list[Epoch] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_from: int = 0
    diverged: Epoch | None = None  # the epoch whose loss was NaN or infinite: the run stopped, unrecorded
    seconds: float = 0.0

    @property
    def best(self) -> Epoch | None:
        return next((e for e in self.history if e.epoch == self.best_epoch), None)


def resume_path(model: Path) -> Path:
    return model.with_name(model.name + RESUME_SUFFIX)


def run(cache_path: Path, splits_dir: Path, model_path: Path, head: HeadConfig, cfg: TrainConfig, *,
        metrics_path: Path = Path("metrics/train.json"), plots_dir: Path = Path("plots/train"),
        resume: bool = False, progress: bool = True) -> TrainSummary:
    """Train the head `head` on `cache_path` with the lists in `splits_dir`; write model, metrics, curves."""
    from rich.console import Console

    from pipeline.head import training as tr
    from pipeline.head.model import build_head, count_parameters

    console = Console(stderr=True)
    head, cfg = check(head), check(cfg)
    device = tr.pick_device(cfg.device)
    model_path, started = Path(model_path), time.monotonic()
    check_outputs(model_path, Path(metrics_path), Path(plots_dir))
    with FeatureCache(cache_path) as cache:
        train_set = open_split(cache, splits_dir, "train", cfg.max_memory_gb)
        val_set = open_split(cache, splits_dir, "val", cfg.max_memory_gb)
        extraction, origin = ck.cache_provenance(cache)
        classes, shape = list(cache.classes), list(cache.feature_shape)

        tr.seed_everything(cfg.seed)
        model = build_head(head, shape[1], len(classes)).to(device)
        optimiser = tr.make_optimiser(model, cfg)
        schedule = tr.make_schedule(optimiser, cfg)
        summary = TrainSummary(model_path, count_parameters(model), str(device), train_set.in_memory,
                               len(train_set), len(val_set))
        state = {"best_loss": math.inf, "bad_epochs": 0}
        if resume:
            summary.resumed_from = _restore(resume_path(model_path), model, optimiser, schedule, summary, state,
                                            head, cfg, extraction)
        console.print(f"[bold]train[/] {head.label} head, {summary.parameters:,} parameters, "
                      f"{len(train_set)} train / {len(val_set)} val clips "
                      f"({'in memory' if train_set.in_memory else 'streamed from the cache'}), {device}",
                      highlight=False)

        def checkpoint_of(epoch: Epoch) -> ck.Checkpoint:
            info = dict(dataclasses.asdict(cfg), epoch=epoch.epoch, val_loss=epoch.val_loss,
                        val_accuracy=epoch.val_accuracy, train_clips=len(train_set), val_clips=len(val_set))
            return ck.Checkpoint(model.state_dict(), head, classes, shape, extraction, origin, info)

        with progress_bar("train", len(train_set), "clips", enabled=progress, label="") as bar:
            for index in range(summary.resumed_from, cfg.epochs):
                if state["bad_epochs"] >= cfg.patience:
                    summary.stopped_early = True
                    break
                bar.restart(len(train_set), label=f"epoch {index + 1}/{cfg.epochs}")
                lr = optimiser.param_groups[0]["lr"]
                fit = tr.train_epoch(model, train_set, optimiser, cfg, device, index,
                                     on_batch=bar.advance)
                schedule.step()
                val = tr.infer(model, val_set, cfg.batch_size, device)
                val_loss = tr.loss_of(val, cfg.attention_reg)
                val_acc, val_frame_acc = tr.accuracies(val)
                epoch = Epoch(index + 1, fit.loss, fit.accuracy, val_loss, val_acc, val_frame_acc, lr, fit.seconds)
                if not (math.isfinite(fit.loss) and math.isfinite(val_loss)):
                    summary.diverged = epoch  # more epochs would only train on NaNs
                    break
                summary.history.append(epoch)
                if val_loss < state["best_loss"]:
                    state["best_loss"], state["bad_epochs"] = val_loss, 0
                    summary.best_epoch = epoch.epoch
                    ck.save(model_path, checkpoint_of(epoch))
                else:
                    state["bad_epochs"] += 1
                _save_resume(resume_path(model_path), model, optimiser, schedule, summary, state, head, cfg,
                             extraction)
                write_outputs(summary, metrics_path, plots_dir)
                bar.note(f"loss {fit.loss:.3f}/{val_loss:.3f}  acc {fit.accuracy:.1%}/{val_acc:.1%} (train/val)")
    summary.seconds = time.monotonic() - started
    if summary.diverged is not None:
        _report_divergence(summary, console)
    write_outputs(summary, metrics_path, plots_dir)
    return summary


def _report_divergence(summary: TrainSummary, console) -> None:
    """No good epoch: a TrainError, with every output left as it was (an existing model is an earlier
    run's, and metrics of this run beside it would pass it off as this one's). Else a note: the best
    epoch so far is the model."""
    from rich.markup import escape

    bad = summary.diverged
    loss = bad.train_loss if not math.isfinite(bad.train_loss) else bad.val_loss
    what = f"the loss is {'NaN' if math.isnan(loss) else 'infinite'} at epoch {bad.epoch}"
    if not summary.best_epoch:
        earlier = f" ({summary.model} is an earlier run's model)" if summary.model.exists() else ""
        raise TrainError(f"training diverged: {what}; lower --lr (train.lr). Nothing was written{earlier}")
    console.print(f"[yellow]note[/] training diverged: {what}; stopped and kept epoch {summary.best_epoch} in "
                  f"{escape(str(summary.model))}; a lower --lr (train.lr) may do better", highlight=False)


# --- output locations -------------------------------------------------------------------------------------


def check_outputs(model_path: Path, metrics_path: Path, plots_dir: Path) -> None:
    """Make the output folders now, so an unwritable path fails before the first epoch rather than after it."""
    for output, folder in ((model_path, model_path.parent), (metrics_path, metrics_path.parent),
                           (plots_dir, plots_dir)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            blocker = _file_in_the_way(folder)
            why = f"{blocker} is a file, not a folder" if blocker else (exc.strerror or str(exc))
            raise TrainError(f"cannot write {output}: {why}") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise TrainError(f"cannot write {output}: {folder} is not writable")
    for output in (model_path, metrics_path):
        if output.is_dir():
            raise TrainError(f"cannot write {output}: it is a folder; name a file")


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing one of `folder` and its parents, when that is not a folder."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


# --- outputs ----------------------------------------------------------------------------------------------


def write_outputs(summary: TrainSummary, metrics_path: Path, plots_dir: Path) -> None:
    """metrics/train.json (the selected epoch) and the per-epoch curves, for DVC metrics and plots."""
    rows = summary.history
    write_tsv_atomic(Path(plots_dir) / "loss.tsv", ["epoch", "train", "val"],
                     [[e.epoch, e.train_loss, e.val_loss] for e in rows])
    write_tsv_atomic(Path(plots_dir) / "accuracy.tsv", ["epoch", "train", "val"],
                     [[e.epoch, e.train_accuracy, e.val_accuracy] for e in rows])
    best = summary.best
    seconds = [e.seconds for e in rows]
    metrics: dict[str, Any] = {
        "best_epoch": summary.best_epoch, "epochs_run": len(rows), "stopped_early": summary.stopped_early,
        "val_loss": _finite(best.val_loss) if best else None,
        "val_accuracy": _finite(best.val_accuracy) if best else None,
        "val_frame_accuracy": _finite(best.val_frame_accuracy) if best else None,
        "train_loss": _finite(best.train_loss) if best else None,
        "train_accuracy": _finite(best.train_accuracy) if best else None,
        "parameters": summary.parameters, "train_clips": summary.train_clips, "val_clips": summary.val_clips,
        "seconds_per_epoch": round(sum(seconds) / len(seconds), 3) if seconds else None,
        "device": summary.device,
    }
    write_json_atomic(metrics_path, metrics)


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


# --- resume state -----------------------------------------------------------------------------------------


def _identity(head: HeadConfig, cfg: TrainConfig, extraction: dict) -> dict:
    """What must not change between a run and its resumption (patience and device may)."""
    keep = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("patience", "device")}
    return {"head": dataclasses.asdict(head), "train": keep, "weights": extraction.get("weights"),
            "frames": extraction.get("frames"), "layer": extraction.get("layer")}


def _save_resume(path: Path, model, optimiser, schedule, summary: TrainSummary, state: dict, head: HeadConfig,
                 cfg: TrainConfig, extraction: dict) -> None:
    import torch

    payload = {
        "format": RESUME_FORMAT, "next_epoch": summary.history[-1].epoch, "best_epoch": summary.best_epoch,
        "best_loss": state["best_loss"], "bad_epochs": state["bad_epochs"],
        "model": model.state_dict(), "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(), "history": [dataclasses.asdict(e) for e in summary.history],
        "identity": _identity(head, cfg, extraction),
    }
    with atomic_file(path) as fh:
        torch.save(payload, fh)


def _restore(path: Path, model, optimiser, schedule, summary: TrainSummary, state: dict, head: HeadConfig,
             cfg: TrainConfig, extraction: dict) -> int:
    """Load the resume state into the live objects; returns the number of epochs already done."""
    import torch

    if not path.is_file():
        raise ck.CheckpointError(f"{path}: no training state to resume from; train without --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(payload, dict) and payload.get("format") == RESUME_FORMAT
    except Exception:  # noqa: BLE001 - any unreadable file means the same thing to the user
        raise ck.CheckpointError(f"{path}: not a readable training state; train without --resume") from None
    if payload["identity"] != _identity(head, cfg, extraction):
        raise ck.CheckpointError(f"{path}: was trained with other head/train settings or another cache; "
                                 "train without --resume (or restore those settings)")
    model.load_state_dict(payload["model"])
    optimiser.load_state_dict(payload["optimiser"])
    schedule.load_state_dict(payload["schedule"])
    torch.set_rng_state(payload["rng"])
    summary.history = [Epoch(**e) for e in payload["history"]]
    summary.best_epoch = payload["best_epoch"]
    state["best_loss"], state["bad_epochs"] = payload["best_loss"], payload["bad_epochs"]
    return int(payload["next_epoch"])
