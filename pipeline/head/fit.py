"""Fitting the head: the optimiser, its schedule, one epoch, and `fit()`, the one loop every trainer runs.

`stages/train.py` and the benches train the same way (AdamW, a per-epoch schedule, early stopping on the
validation loss), so the loop lives here once and they differ only in what they do with each epoch: the
stage writes the best checkpoint, the resume state and its curves through the callbacks; the attention
probe keeps the best weights in memory. `fit()` stops on its own when the validation loss has not improved
for `patience` epochs, or when an epoch's loss is not finite (more epochs would only train on NaNs); that
epoch is not recorded. With `save_to` it writes, after every epoch, everything needed to continue the run
exactly (model, optimiser, schedule, random state, history), and `resume_from` picks such a run up again.
With `train.ema_epochs` a moving average of the weights (pipeline/head/average.py) is what is validated,
selected and handed to `on_best`, and the state file carries it too.
torch is imported inside the functions, so importing this module stays cheap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.config import BEFORE_THE_KEY, HeadConfig, TrainConfig
from pipeline.files import atomic_file
from pipeline.head.average import WeightAverage
from pipeline.head.batches import ClipSet
from pipeline.head.checkpoint import CheckpointError
from pipeline.head.infer import Outputs, accuracies, infer, interleave, is_correct, loss_of
from pipeline.head.ranks import ALONE, Ranks
from pipeline.head.runtime import autocast

RESUME_FORMAT = "videoattn-train-state"


def make_optimiser(model, cfg: TrainConfig):
    """AdamW; biases and other 1-d parameters are not decayed."""
    import torch

    beta = [p for name, p in model.named_parameters() if name.split(".")[-1] == "beta"]  # the motion prior's weight
    decay = [p for p in model.parameters() if p.ndim > 1]
    plain = [p for p in model.parameters() if p.ndim <= 1 and all(p is not b for b in beta)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    if beta:
        groups.append({"params": beta, "weight_decay": 0.0, "lr": cfg.motion_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_schedule(optimiser, cfg: TrainConfig):
    """Per-epoch learning rate: cosine to 1% of lr over `epochs`, or x0.1 at 1/2 and 3/4 of them."""
    import torch

    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=cfg.epochs, eta_min=cfg.lr * 0.01)
    milestones = sorted({max(1, cfg.epochs // 2), max(1, (3 * cfg.epochs) // 4)})
    return torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=milestones, gamma=0.1)


@dataclass
class EpochResult:
    loss: float  # mean total loss per clip
    accuracy: float  # video accuracy (mean of per-frame softmax)
    frame_accuracy: float  # per-frame accuracy
    seconds: float


def clip_noise(seed: int, epoch: int, rows: np.ndarray) -> "torch.Tensor":  # noqa: F821
    """(B,) int64 dropout seeds of the clips at positions `rows` in epoch `epoch`: a function of the clip, not
    of its batch or rank (pipeline/head/dropout.py)."""
    import torch

    base = (seed * 1_000_003 + epoch) * 1_000_000_007
    return torch.tensor([(base + int(r)) % 2**63 for r in rows], dtype=torch.int64)


def jitter_frames(x: "torch.Tensor", jitter: float, noise: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """Temporal jitter: each clip's window of T - round(jitter * T) consecutive cached frames, at an offset drawn
    from its dropout seed (a function of the clip and the epoch, so any rank or batch draws the same one).

    x (B, T, C, h, w) -> (B, L, C, h, w). Why: on a few hundred clips the head learns the clips by heart within a
    few epochs; a shifted window is another clip of the same action at the same frame spacing (the motion
    energy between neighbouring frames keeps its scale, which a random subset of frames would not), and it
    costs no new extraction. Evaluation reads every frame."""
    import torch

    t = x.shape[1]
    length = t - int(round(jitter * t))
    if length >= t or length < 1:
        return x
    offsets = (noise % (t - length + 1)).to(x.device)  # (B,)
    frames = offsets[:, None] + torch.arange(length, device=x.device)  # (B, L)
    return x[torch.arange(x.shape[0], device=x.device)[:, None], frames]


def train_epoch(model, clips: ClipSet, optimiser, cfg: TrainConfig, device, epoch: int,
                on_batch: Callable[[int], None] | None = None, ranks: Ranks = ALONE,
                average: WeightAverage | None = None) -> EpochResult:
    """One pass over `clips` in a seeded random order (seed, epoch), updating `model` in place (and `average`,
    the moving average of its weights, after every step).

    With several `ranks` each takes its share of every global batch (pipeline/head/ranks.py) and `model` is
    DDP-wrapped; the loss is scaled so the averaged gradient is the global batch's mean, and the returned
    figures are summed over the ranks.
    """
    import time

    import torch

    from pipeline.head.model import head_loss, video_probabilities

    start = time.perf_counter()
    model.train()
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)).numpy()
    chunks = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]  # the global batches
    shares = [ranks.share(c) for c in chunks]
    # a rank whose share of the last batch is empty runs the batch's first clip at weight 0: DDP needs every
    # rank in every forward and backward, and a zero weight adds nothing to the averaged gradient
    stand_in = [len(share) == 0 for share in shares]
    shares = [c[:1] if empty else share for c, share, empty in zip(chunks, shares, stand_in)]
    total = right = frame_right = frames = 0.0
    for whole, empty, batch in zip(chunks, stand_in, clips.batches_of(shares)):
        n = len(batch.rows)
        x = batch.features.to(device, non_blocking=True)
        y = batch.labels.to(device)
        noise = clip_noise(cfg.seed, epoch, batch.rows)
        with autocast(device):
            out = model(jitter_frames(x, cfg.jitter, noise), noise)
            loss, _ = head_loss(out, y, cfg.attention_reg)
        # DDP averages over the ranks: N * (n / B) makes that average the global batch's mean loss
        step_loss = loss * (0.0 if empty else n * ranks.world / len(whole)) if ranks.distributed else loss
        optimiser.zero_grad(set_to_none=True)
        step_loss.backward()
        optimiser.step()
        if average is not None:
            average.update(model)
        if not empty:
            with torch.no_grad():
                total += float(loss) * n
                right += float(is_correct(video_probabilities(out.logits), y).sum())
                frame_right += float(is_correct(out.logits, y).sum())
                frames += out.logits.shape[0] * out.logits.shape[1]
        if on_batch is not None:
            on_batch(len(whole))
    total, right, frame_right, frames = ranks.sum([total, right, frame_right, frames])
    n = max(len(clips), 1)
    return EpochResult(total / n, right / n, frame_right / max(frames, 1), time.perf_counter() - start)


def validate(model, val_set: ClipSet, cfg: TrainConfig, device, ranks: Ranks = ALONE) -> Outputs:
    """The head's outputs over the whole validation set, the same on every rank: each rank infers its share,
    and the shares are gathered."""
    rows = np.arange(len(val_set))
    mine = infer(model, val_set, cfg.batch_size, device, rows=ranks.share(rows) if ranks.distributed else None)
    return interleave(ranks.gather(mine))


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
class FitState:
    """Where a run stands: its recorded epochs and the early-stopping bookkeeping, all a resume restores."""

    history: list[Epoch] = field(default_factory=list)
    best_epoch: int = 0  # 0: no epoch recorded yet
    best_loss: float = math.inf
    bad_epochs: int = 0  # epochs since the best one
    stopped_early: bool = False
    resumed_from: int = 0  # epochs already done when this run started
    diverged: Epoch | None = None  # the epoch whose loss was NaN or infinite: the run stopped, unrecorded

    @property
    def best(self) -> Epoch | None:
        return next((e for e in self.history if e.epoch == self.best_epoch), None)


def fit(model, train_set: ClipSet, val_set: ClipSet, cfg: TrainConfig, device, *,
        resume_from: Path | None = None, save_to: Path | None = None, identity: dict | None = None,
        on_start: Callable[[FitState], None] | None = None, on_best: Callable[[Epoch], None] | None = None,
        on_epoch: Callable[[FitState], None] | None = None, bar=None, state: FitState | None = None,
        ranks: Ranks = ALONE) -> FitState:
    """Train `model` in place for up to `cfg.epochs` epochs, selecting on the validation loss.

    `resume_from`: a state file written by an earlier run with `save_to`; it must carry the same `identity`
    (what may not change between a run and its resumption). `on_start` runs once the state is restored,
    before the first epoch (so a bad state file fails before anything is printed); `on_best` after an epoch
    that improved the validation loss, with the model holding that epoch's weights; `on_epoch` after every
    recorded epoch, once the state file is written. `bar`: a progress bar's context manager (its bar has
    `restart`, `advance`, `note`), entered after `on_start` so nothing is drawn before a resume has loaded.
    `state`: the state to fill in (a caller's subclass can carry its own fields along); a fresh one if None.
    `ranks`: this process among several (torchrun): every rank calls fit() alike and trains its share under
    DDP; only the main rank writes `save_to` (pass callbacks and `bar` on the main rank only).
    """
    optimiser = make_optimiser(model, cfg)
    schedule = make_schedule(optimiser, cfg)
    average = WeightAverage.of(model, cfg.ema_epochs, len(train_set), cfg.batch_size)
    state = FitState() if state is None else state
    if resume_from is not None:
        load_state(resume_from, model, optimiser, schedule, identity or {}, state, average)
    if on_start is not None:
        on_start(state)
    net = ranks.wrap(model)  # what trains (DDP across ranks); `model` itself validates and is saved
    with bar if bar is not None else contextlib.nullcontext() as live:
        for index in range(state.resumed_from, cfg.epochs):
            if state.bad_epochs >= cfg.patience:
                state.stopped_early = True
                break
            _run_epoch(model, net, train_set, val_set, optimiser, schedule, cfg, device, index, state, live,
                       save_to if ranks.main else None, identity or {}, on_best, on_epoch, ranks, average)
            if state.diverged is not None:
                break
    return state


def _run_epoch(model, net, train_set, val_set, optimiser, schedule, cfg, device, index: int, state: FitState, bar,
               save_to: Path | None, identity: dict, on_best, on_epoch, ranks: Ranks,
               average: WeightAverage | None) -> None:
    """Epoch `index` (0-based) of `fit()`: train, validate, and record it, or mark the run diverged. With an
    `average`, it is the average that is validated and handed to `on_best`; the live weights train on."""
    if bar is not None:
        bar.restart(len(train_set), label=f"epoch {index + 1}/{cfg.epochs}")
    lr = optimiser.param_groups[0]["lr"]
    done = train_epoch(net, train_set, optimiser, cfg, device, index,
                       on_batch=bar.advance if bar is not None else None, ranks=ranks, average=average)
    schedule.step()
    with average.applied(model) if average is not None else contextlib.nullcontext():
        val = validate(model, val_set, cfg, device, ranks)
        val_loss = loss_of(val, cfg.attention_reg)
        val_acc, val_frame_acc = accuracies(val)
        epoch = Epoch(index + 1, done.loss, done.accuracy, val_loss, val_acc, val_frame_acc, lr, done.seconds)
        if not (math.isfinite(done.loss) and math.isfinite(val_loss)):
            state.diverged = epoch
            return
        state.history.append(epoch)
        if val_loss < state.best_loss:
            state.best_loss, state.bad_epochs, state.best_epoch = val_loss, 0, epoch.epoch
            if on_best is not None:
                on_best(epoch)
        else:
            state.bad_epochs += 1
    if save_to is not None:
        save_state(save_to, model, optimiser, schedule, state, identity, average)
    if on_epoch is not None:
        on_epoch(state)
    if bar is not None:
        bar.note(f"loss {done.loss:.3f}/{val_loss:.3f}  acc {done.accuracy:.1%}/{val_acc:.1%} (train/val)")


# --- resume state -----------------------------------------------------------------------------------------


def resume_identity(head: HeadConfig, cfg: TrainConfig, extraction: dict) -> dict:
    """What must not change between a run and its resumption (patience, device and how a streamed split is
    read may), as `identity`."""
    keep = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("patience", "device", "loader_workers")}
    return {"head": dataclasses.asdict(head), "train": keep, "weights": extraction.get("weights"),
            "frames": extraction.get("frames"), "layer": extraction.get("layer")}


def same_identity(stored: dict, identity: dict) -> bool:
    """Whether a state file's identity is this run's. A head or train key the file lacks was added since it was
    written: it counts as its value from before it existed (config.BEFORE_THE_KEY), so a run of today's code with
    that setting at its old behaviour resumes, and one that sets it otherwise does not."""
    filled = {key: ({**BEFORE_THE_KEY[key], **value} if key in BEFORE_THE_KEY and isinstance(value, dict) else value)
              for key, value in stored.items()}
    return filled == identity


def save_state(path: Path, model, optimiser, schedule, state: FitState, identity: dict,
               average: WeightAverage | None = None) -> None:
    """Everything a resumed run needs to continue exactly as if it had never stopped, written atomically."""
    import torch

    payload = {
        "format": RESUME_FORMAT, "next_epoch": state.history[-1].epoch, "best_epoch": state.best_epoch,
        "best_loss": state.best_loss, "bad_epochs": state.bad_epochs,
        "model": model.state_dict(), "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(), "history": [dataclasses.asdict(e) for e in state.history],
        "identity": identity, "average": average.state() if average is not None else None,
    }
    with atomic_file(path) as fh:
        torch.save(payload, fh)


def load_state(path: Path, model, optimiser, schedule, identity: dict, state: FitState,
               average: WeightAverage | None = None) -> None:
    """Load a state file into the live objects and `state` (whose `resumed_from`: the epochs done)."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from; train without --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(payload, dict) and payload.get("format") == RESUME_FORMAT
    except Exception:  # noqa: BLE001 - any unreadable file means the same thing to the user
        raise CheckpointError(f"{path}: not a readable training state; train without --resume") from None
    if not isinstance(payload["identity"], dict) or not same_identity(payload["identity"], identity):
        raise CheckpointError(f"{path}: was trained with other head/train settings or another cache; "
                              "train without --resume (or restore those settings)")
    model.load_state_dict(payload["model"])
    optimiser.load_state_dict(payload["optimiser"])
    schedule.load_state_dict(payload["schedule"])
    if average is not None:
        average.load(payload["average"])
    torch.set_rng_state(payload["rng"])
    state.history = [Epoch(**e) for e in payload["history"]]
    state.best_epoch, state.best_loss = payload["best_epoch"], payload["best_loss"]
    state.bad_epochs, state.resumed_from = payload["bad_epochs"], int(payload["next_epoch"])
