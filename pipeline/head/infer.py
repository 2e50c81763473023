"""What a head says about a set of clips, and how good that is: inference, its loss and its accuracies.

Validation inside `fit()`, evaluation, rendering and the benches all read the head through `infer()`, so
every number they report comes from the same eval-mode, no-gradient pass over the same batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.head.batches import ClipSet
from pipeline.head.runtime import autocast


@dataclass
class Outputs:
    """What the head says about a set of clips, in the set's order, as float32 numpy arrays."""

    logits: np.ndarray  # (N, T, K)
    attention: np.ndarray  # (N, T, h, w)
    labels: np.ndarray  # (N,)

    @property
    def probabilities(self) -> np.ndarray:
        """Video-level class probabilities (N, K) float32: the head's `video_probabilities` (mean over t of the
        per-frame softmax)."""
        import torch

        from pipeline.head.model import video_probabilities

        return video_probabilities(torch.from_numpy(self.logits)).numpy()


def infer(model, clips: ClipSet, batch_size: int, device, on_batch: Callable[[int], None] | None = None,
          keep: np.ndarray | None = None, rows: np.ndarray | None = None) -> Outputs:
    """Run `model` (eval mode, no gradients) over every clip of `clips` (or the positions `rows` of it, in
    that order: one rank's share).

    `keep` (N, T, h, w) in the set's order multiplies each feature cell (all channels) before the head: the
    deletion test zeroes cells of X this way, the attention itself left to the model.
    """
    import torch

    model.eval()
    logits, maps = [], []
    with torch.inference_mode():
        for batch in clips.batches(batch_size, rows):
            x = batch.features.to(device, non_blocking=True)
            motion = None
            if keep is not None:
                kept = torch.from_numpy(keep[batch.rows]).to(x.device)  # (B, T, h, w)
                # the motion map stays the unmodified clip's (zeroed cells would read as motion); a deleted
                # cell's energy goes with its features
                motion = model.motion_of(x) if getattr(model, "uses_motion", False) else None
                motion = motion.kept(kept) if motion is not None else None
                x = x * kept.to(x.dtype)[:, :, None]  # (B, T, 1, h, w)
            with autocast(device):
                out = model(x, motion=motion)
            logits.append(out.logits.float().cpu().numpy())
            maps.append(out.attention.float().cpu().numpy())
            if on_batch is not None:
                on_batch(len(batch.rows))
    t, _, h, w = clips.cache.feature_shape
    return Outputs(np.concatenate(logits) if logits else np.zeros((0, t, 0), np.float32),
                   np.concatenate(maps) if maps else np.zeros((0, t, h, w), np.float32),
                   clips.labels.numpy() if rows is None else clips.labels.numpy()[rows])


def infer_clip(model, features, device) -> tuple[np.ndarray, np.ndarray]:
    """`infer` for one clip at a time (predict's files, watch's windows): float16 features (T, C, h, w) ->
    (video probabilities (K,), attention (T, h, w)), float32 numpy, with `model` already in eval mode."""
    import torch

    from pipeline.head.model import video_probabilities

    with torch.inference_mode(), autocast(device):
        out = model(features.unsqueeze(0).to(device))  # (1, T, C, h, w) in
    return video_probabilities(out.logits)[0].float().cpu().numpy(), out.attention[0].float().cpu().numpy()


def top_classes(probabilities: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable (class, probability) of one clip's video probabilities (K,), best first; ties in
    class order."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(classes[i], float(probabilities[i])) for i in order]


def interleave(parts: list[Outputs]) -> Outputs:
    """The outputs of a whole set from its ranks' shares (rank r held positions r, r + N, ...: Ranks.share)."""
    if len(parts) == 1:
        return parts[0]
    n = sum(len(p.labels) for p in parts)
    whole = [np.empty((n, *getattr(parts[0], name).shape[1:]), getattr(parts[0], name).dtype)  # rank 0 has the most
             for name in ("logits", "attention", "labels")]
    for r, part in enumerate(parts):
        if not len(part.labels):  # fewer clips than ranks: nothing here (and its logits have no class axis)
            continue
        for out, name in zip(whole, ("logits", "attention", "labels")):
            out[r::len(parts)] = getattr(part, name)
    return Outputs(*whole)


def loss_of(outputs: Outputs, attention_reg: float) -> float:
    """The training loss (per-frame cross-entropy + attention regulariser) of finished outputs."""
    import torch

    from pipeline.head.model import HeadOutput, head_loss

    if len(outputs.labels) == 0:
        return math.nan
    out = HeadOutput(torch.from_numpy(outputs.logits), torch.from_numpy(outputs.attention))
    total, _ = head_loss(out, torch.from_numpy(outputs.labels).long(), attention_reg)
    return float(total)


def is_correct(scores, labels):
    """Whether the top class of each clip's (or frame's) scores is its label; an accuracy is the mean of this.

    scores (N, K) video probabilities (`Outputs.probabilities`, model.video_probabilities) or (N, T, K)
    per-frame logits, labels (N,) -> (N,) or (N, T) bool. numpy arrays or torch tensors alike (the trainer
    counts on the device, the reports in numpy), so every accuracy the project reports is this one rule.
    """
    return scores.argmax(-1) == labels.reshape(-1, *[1] * (scores.ndim - 2))


def accuracies(outputs: Outputs) -> tuple[float, float]:
    """(video accuracy, per-frame accuracy) of `outputs`."""
    if len(outputs.labels) == 0:
        return math.nan, math.nan
    video = float(is_correct(outputs.probabilities, outputs.labels).mean())
    frame = float(is_correct(outputs.logits, outputs.labels).mean())
    return video, frame
