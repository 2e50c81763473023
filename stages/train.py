"""Stage `train`: fit the attention head on the cached features of the train split, select on val.

Writes the best checkpoint (lowest validation loss) to `model`, the selected epoch's metrics (train.json) and
per-epoch curves {loss,accuracy}.tsv (DVC's linear plots; by default beside the model, the graph names
metrics/ and plots/train/), and `<model>.timings.json` (device, seconds per epoch): timings change on every
run, so they stay out of the metrics git keeps. After every epoch it also writes `<model>.resume`
(model, optimiser, schedule and random state), so `--resume` continues an interrupted or finished run
exactly where it stopped; the curves and metrics are rewritten every epoch too, so a crash loses at most
the epoch in flight. An epoch whose loss is not finite stops the run and is not recorded: the best epoch so
far stays the model, and a run with no good epoch at all is an error that writes nothing. The loop is
`pipeline.head.fit.fit()` (shared with the benches); this stage decides what goes in and which files come out.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import APPEARANCE_AUTO_BELOW, HeadConfig, TrainConfig, check
from pipeline.errors import UserError
from pipeline.features.reader import open_cache
from pipeline.files import write_json_atomic, write_tsv_atomic
from pipeline.head import checkpoint as ck
from pipeline.head.batches import open_split
from pipeline.head.fit import Epoch, FitState
from pipeline.head.ranks import Ranks
from pipeline.progress import progress_bar

RESUME_SUFFIX = ".resume"
TIMINGS_SUFFIX = ".timings.json"
METRICS_NAME = "train.json"


class TrainError(UserError):
    """Training cannot write its outputs or produced no model; the message says what to do."""


@dataclass(kw_only=True)
class TrainSummary(FitState):
    """`fit()`'s state (history, best epoch, early stop, divergence) and what the CLI prints beside it."""

    model: Path
    parameters: int
    device: str
    in_memory: bool
    train_clips: int
    val_clips: int
    seconds: float = 0.0
    ranks: int = 1  # processes that trained together (torchrun)
    main: bool = True  # this process is rank 0: it wrote the outputs and reports them


def print_summary(summary: TrainSummary) -> None:
    """The CLI's table: epochs run, the selected epoch's losses and accuracies, seconds per epoch."""
    if not summary.main:  # under torchrun the other ranks trained alike and report nothing
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    best = summary.best
    table = Table(title=f"train -> {escape(str(summary.model))}")
    for col in ("epochs", "best epoch", "train loss", "val loss", "val acc", "val frame acc", "s/epoch"):
        table.add_column(col, justify="right")
    per_epoch = sum(e.seconds for e in summary.history) / max(len(summary.history), 1)
    if best is None:
        table.add_row(str(len(summary.history)), "-", "-", "-", "-", "-", f"{per_epoch:.1f}")
    else:
        stop = " (early stop)" if summary.stopped_early else " (diverged)" if summary.diverged else ""
        table.add_row(f"{len(summary.history)}{stop}", str(best.epoch),
                      f"{best.train_loss:.3f}", f"{best.val_loss:.3f}", f"{best.val_accuracy:.1%}",
                      f"{best.val_frame_accuracy:.1%}", f"{per_epoch:.2f}")
    Console().print(table)


def resume_path(model: Path) -> Path:
    return model.with_name(model.name + RESUME_SUFFIX)


def timings_path(model: Path) -> Path:
    return model.with_name(model.name + TIMINGS_SUFFIX)


def run(cache_path: Path, splits_dir: Path, model_path: Path, head: HeadConfig, cfg: TrainConfig, *,
        metrics_path: Path | None = None, plots_dir: Path | None = None,
        resume: bool = False, progress: bool = True) -> TrainSummary:
    """Train the head `head` on `cache_path` with the lists in `splits_dir`; write model, metrics, curves.

    `metrics_path` (default: train.json beside the model) and `plots_dir` (default: the model's folder) are
    where the selected epoch's metrics and the per-epoch curves go: nothing is written outside the paths given.

    Under torchrun (WORLD_SIZE > 1) every process runs this alike: DDP, each rank its share of each batch
    (pipeline/engines/torchrun.py, pipeline/head/ranks.py); rank 0 writes and reports (`summary.main`).
    """
    from pipeline.engines.torchrun import join_ranks

    head, cfg, model_path = check(head), check(cfg), Path(model_path)
    metrics_path = Path(metrics_path) if metrics_path is not None else model_path.parent / METRICS_NAME
    plots_dir = Path(plots_dir) if plots_dir is not None else model_path.parent
    with join_ranks(cfg.device) as ranks:
        return _train(cache_path, splits_dir, model_path, head, cfg, metrics_path, plots_dir, resume, progress,
                      ranks)


def _train(cache_path: Path, splits_dir: Path, model_path: Path, head: HeadConfig, cfg: TrainConfig,
           metrics_path: Path, plots_dir: Path, resume: bool, progress: bool, ranks: Ranks) -> TrainSummary:
    """run() on this rank: every rank reads its own handle on the cache and trains its share; rank 0 writes."""
    from rich.console import Console

    from pipeline.head.fit import fit, resume_identity
    from pipeline.head.model import build_head, count_parameters
    from pipeline.head.runtime import pick_device, seed_everything

    console = Console(stderr=True)
    device = ranks.place(pick_device(cfg.device))
    started = time.monotonic()
    check_outputs(model_path, metrics_path, plots_dir)
    with open_cache(cache_path) as cache:
        train_set = open_split(cache, splits_dir, "train", cfg.max_memory_gb, cfg.loader_workers)
        val_set = open_split(cache, splits_dir, "val", cfg.max_memory_gb, cfg.loader_workers)
        extraction, origin = ck.cache_provenance(cache)
        classes, shape = list(cache.classes), list(cache.feature_shape)
        # seconds between the sampled frames of the train clips: the rate `watch` samples a stream at
        interval = ck.clips_sample_interval(cache.frame_index[train_set.index], cache.fps[train_set.index])
        requested = head.appearance
        head = head.for_train_split(train_set.clips_a_class)
        seed_everything(cfg.seed)
        model = build_head(head, shape[1], len(classes)).to(device)
        summary = TrainSummary(model=model_path, parameters=count_parameters(model), device=str(device),
                               in_memory=train_set.in_memory, train_clips=len(train_set), val_clips=len(val_set),
                               ranks=ranks.world, main=ranks.main)

        def started_at(_: FitState) -> None:
            on = f"{ranks.world} ranks ({device.type})" if ranks.distributed else str(device)
            console.print(f"[bold]train[/] {head.label} head, {summary.parameters:,} parameters, "
                          f"{len(train_set)} train / {len(val_set)} val clips "
                          f"({'in memory' if train_set.in_memory else 'streamed from the cache'}), {on}",
                          highlight=False)
            if requested == "auto":
                size = "fewer than" if head.appearance == "attended" else "at least"
                console.print(f"head.appearance auto: {head.appearance} (the train split has {size} "
                              f"{APPEARANCE_AUTO_BELOW} clips a class)", highlight=False)

        def save_best(epoch: Epoch) -> None:
            info = dict(dataclasses.asdict(cfg), epoch=epoch.epoch, val_loss=epoch.val_loss,
                        val_accuracy=epoch.val_accuracy, train_clips=len(train_set), val_clips=len(val_set),
                        sample_interval=interval)
            ck.save(model_path, ck.Checkpoint(model.state_dict(), head, classes, shape, extraction, origin, info))

        main = ranks.main  # the other ranks train alike and write nothing
        fit(model, train_set, val_set, cfg, device, resume_from=resume_path(model_path) if resume else None,
            save_to=resume_path(model_path), identity=resume_identity(head, cfg, extraction),
            on_start=started_at if main else None, on_best=save_best if main else None,
            on_epoch=(lambda _: write_outputs(summary, metrics_path, plots_dir, model_path)) if main else None,
            state=summary,
            bar=progress_bar("train", len(train_set), "clips", enabled=progress, label="") if main else None,
            ranks=ranks)
    summary.seconds = time.monotonic() - started
    if summary.diverged is not None:
        _report_divergence(summary, console)
    if main:
        write_outputs(summary, metrics_path, plots_dir, model_path)
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
    if summary.main:
        console.print(f"[yellow]note[/] training diverged: {what}; stopped and kept epoch {summary.best_epoch} in "
                      f"{escape(str(summary.model))}; a lower --lr (train.lr) may do better", highlight=False)


def check_outputs(model_path: Path, metrics_path: Path, plots_dir: Path) -> None:
    """Make the output folders now, so an unwritable path fails before the first epoch rather than after it."""
    for output, folder in ((model_path, model_path.parent), (metrics_path, metrics_path.parent),
                           (plots_dir, plots_dir)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            existing = next((p for p in (folder, *folder.parents) if p.exists()), None)  # a file in the way?
            blocker = existing if existing is not None and not existing.is_dir() else None
            why = f"{blocker} is a file, not a folder" if blocker else (exc.strerror or str(exc))
            raise TrainError(f"cannot write {output}: {why}") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise TrainError(f"cannot write {output}: {folder} is not writable")
    for output in (model_path, metrics_path):
        if output.is_dir():
            raise TrainError(f"cannot write {output}: it is a folder; name a file")


def write_outputs(summary: TrainSummary, metrics_path: Path, plots_dir: Path, model_path: Path) -> None:
    """train.json (the selected epoch) and the per-epoch curves, for DVC metrics and plots; the timings apart.

    The metrics hold only what the data and settings decide, so a rerun of the same settings writes the same
    file (git stays clean after `dvc repro`); seconds and the device go to `<model>.timings.json`."""
    rows, best = summary.history, summary.best
    for name, train_of, val_of in (("loss", "train_loss", "val_loss"), ("accuracy", "train_accuracy", "val_accuracy")):
        write_tsv_atomic(Path(plots_dir) / f"{name}.tsv", ["epoch", "train", "val"],
                         [[e.epoch, getattr(e, train_of), getattr(e, val_of)] for e in rows])
    metrics: dict[str, Any] = {"best_epoch": summary.best_epoch, "epochs_run": len(rows),
                               "stopped_early": summary.stopped_early}
    for key in ("val_loss", "val_accuracy", "val_frame_accuracy", "train_loss", "train_accuracy"):
        value = getattr(best, key) if best else math.nan
        metrics[key] = round(value, 6) if math.isfinite(value) else None
    metrics.update(parameters=summary.parameters, train_clips=summary.train_clips, val_clips=summary.val_clips,
                   ranks=summary.ranks)
    write_json_atomic(metrics_path, metrics)
    write_json_atomic(timings_path(model_path), {
        "device": summary.device, "ranks": summary.ranks, "seconds": round(summary.seconds, 3) or None,
        "seconds_per_epoch": round(sum(e.seconds for e in rows) / len(rows), 3) if rows else None,
        "epochs": [{"epoch": e.epoch, "seconds": round(e.seconds, 3)} for e in rows]})
