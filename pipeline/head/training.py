"""How the head is fitted and applied: device choice, seeding, optimiser, schedule, one epoch, inference.

The stage (`stages/train.py`) decides what to run and what to write; this module only knows torch.
On CUDA the head runs under bf16 autocast (no loss scaling needed); on the CPU it runs in float32,
which is both exact and, on CPUs without bf16 units, the fastest.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.head.batches import ClipSet
from pipeline.config import DEVICES, ConfigError, TrainConfig

def pick_device(name: str) -> "torch.device":  # noqa: F821
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got '{name}'")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Same seed, same run: torch's generators seeded, deterministic kernels asked for."""
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def autocast(device: "torch.device"):  # noqa: F821
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimiser(model, cfg: TrainConfig):
    """AdamW; biases and other 1-d parameters are not decayed."""
    import torch

    decay = [p for p in model.parameters() if p.ndim > 1]
    plain = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
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


def train_epoch(model, clips: ClipSet, optimiser, cfg: TrainConfig, device, epoch: int,
                on_batch: Callable[[int], None] | None = None) -> EpochResult:
    """One pass over `clips` in a seeded random order (seed, epoch), updating `model` in place."""
    import time

    import torch

    from pipeline.head.model import head_loss, video_probabilities

    start = time.perf_counter()
    model.train()
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)).numpy()
    total = correct = frame_correct = frames = 0.0
    for batch in clips.batches(cfg.batch_size, order):
        x = batch.features.to(device, non_blocking=True)
        y = batch.labels.to(device)
        with autocast(device):
            out = model(x)
            loss, _ = head_loss(out, y, cfg.attention_reg)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            n = len(y)
            total += float(loss) * n
            correct += float((video_probabilities(out.logits).argmax(1) == y).sum())
            frame_correct += float((out.logits.argmax(2) == y[:, None]).sum())
            frames += out.logits.shape[0] * out.logits.shape[1]
        if on_batch is not None:
            on_batch(len(y))
    n = max(len(clips), 1)
    return EpochResult(total / n, correct / n, frame_correct / max(frames, 1), time.perf_counter() - start)


@dataclass
class Outputs:
    """What the head says about a set of clips, in the set's order, as float32 numpy arrays."""

    logits: np.ndarray  # (N, T, K)
    attention: np.ndarray  # (N, T, h, w)
    labels: np.ndarray  # (N,)

    @property
    def probabilities(self) -> np.ndarray:
        """Video-level class probabilities (N, K): mean over t of the per-frame softmax."""
        z = self.logits - self.logits.max(axis=2, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=2, keepdims=True)).mean(axis=1)


def infer(model, clips: ClipSet, batch_size: int, device, on_batch: Callable[[int], None] | None = None,
          keep: np.ndarray | None = None) -> Outputs:
    """Run `model` (eval mode, no gradients) over every clip of `clips`.

    `keep` (N, T, h, w) in the set's order multiplies each feature cell (all channels) before the head: the
    deletion test zeroes cells of X this way, the attention itself left to the model.
    """
    import torch

    model.eval()
    logits, maps = [], []
    with torch.inference_mode():
        for batch in clips.batches(batch_size):
            x = batch.features
            if keep is not None:
                x = x * torch.from_numpy(keep[batch.rows]).to(x.dtype)[:, :, None]  # (B, T, 1, h, w)
            with autocast(device):
                out = model(x.to(device, non_blocking=True))
            logits.append(out.logits.float().cpu().numpy())
            maps.append(out.attention.float().cpu().numpy())
            if on_batch is not None:
                on_batch(len(batch.rows))
    t, _, h, w = clips.cache.feature_shape
    return Outputs(np.concatenate(logits) if logits else np.zeros((0, t, 0), np.float32),
                   np.concatenate(maps) if maps else np.zeros((0, t, h, w), np.float32),
                   clips.labels.numpy())


def loss_of(outputs: Outputs, attention_reg: float) -> float:
    """The training loss (per-frame cross-entropy + attention regulariser) of finished outputs."""
    import torch

    from pipeline.head.model import HeadOutput, head_loss

    if len(outputs.labels) == 0:
        return math.nan
    out = HeadOutput(torch.from_numpy(outputs.logits), torch.from_numpy(outputs.attention))
    total, _ = head_loss(out, torch.from_numpy(outputs.labels).long(), attention_reg)
    return float(total)


def accuracies(outputs: Outputs) -> tuple[float, float]:
    """(video accuracy, per-frame accuracy) of `outputs`."""
    if len(outputs.labels) == 0:
        return math.nan, math.nan
    video = float((outputs.probabilities.argmax(1) == outputs.labels).mean())
    frame = float((outputs.logits.argmax(2) == outputs.labels[:, None]).mean())
    return video, frame
