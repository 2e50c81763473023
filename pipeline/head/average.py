"""An exponential moving average of the head's weights (`train.ema_epochs`), for a result that does not hang on
the seed.

On a few hundred clips the weights after any one epoch carry that epoch's batches (and the early stopping on a
small val split picks one of those noisy points); the average over the last few epochs' steps is a flatter,
steadier solution (Polyak averaging; Izmailov et al. 2018's SWA is the same idea with equal weights). What is
validated, selected and saved is the average; what the optimiser steps is the live model, so the average
never feeds back into training. The decay is set from epochs, not steps, so one setting means the same on a
dataset of 100 clips and of 10,000: d = 1 - 1 / (ema_epochs x steps per epoch), warmed up as
min(d, (1 + t) / (10 + t)) so the first steps do not drag the random initial weights along.
"""
from __future__ import annotations

import contextlib
import math


class WeightAverage:
    """The average of `model`'s floating-point state; integer buffers are copied as they are."""

    def __init__(self, model, ema_epochs: float, steps_per_epoch: int):
        self.decay = 1.0 - 1.0 / max(ema_epochs * max(steps_per_epoch, 1), 1.0)
        self.steps = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @staticmethod
    def of(model, ema_epochs: float, train_clips: int, batch_size: int) -> "WeightAverage | None":
        """The average `train.ema_epochs` asks for, or None when it is 0 (off)."""
        if ema_epochs <= 0:
            return None
        return WeightAverage(model, ema_epochs, math.ceil(train_clips / max(batch_size, 1)))

    def update(self, model) -> None:
        """Fold in the weights after one optimiser step."""
        import torch

        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            for name, value in _module(model).state_dict().items():
                kept = self.shadow[name]
                if kept.is_floating_point():
                    kept.lerp_(value.detach().to(kept.dtype), 1.0 - d)
                else:
                    kept.copy_(value)

    @contextlib.contextmanager
    def applied(self, model):
        """`model` holds the average inside the block, its own weights again after it."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(live)

    def state(self) -> dict:
        return {"steps": self.steps, "shadow": self.shadow}

    def load(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


def _module(model):
    """The module under a DDP wrapper (its state_dict's names carry a `module.` prefix)."""
    return getattr(model, "module", model)
