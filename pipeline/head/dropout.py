"""Dropout a clip at a time: the head's masks as a function of the clip, not of its batch or rank.

Training on N ranks must be the training on one (pipeline/head/ranks.py): a batch's mask drawn from one
generator depends on which clips share the batch, so each clip's mask is drawn from a generator seeded by
the clip's own seed (`noise`, pipeline/head/fit.py `clip_noise`).
"""
from __future__ import annotations

import torch
from torch import nn


class ClipDropout(nn.Module):
    """Dropout (x (B, ...) -> x * mask / (1 - p) in training, identity in eval) whose mask for clip i is drawn
    from a generator seeded by `noise[i]` when `noise` is given.

    Why per clip: training on N ranks must be the training on one (pipeline/head/ranks.py), and a batch's
    mask drawn from one generator depends on which clips share the batch; seeded by the clip, a clip gets
    the same mask whichever rank and batch it lands in. `salt` keeps two dropouts of one clip apart.
    Without `noise` (a caller outside fit()) the mask comes from torch's global generator.
    """

    def __init__(self, p: float, salt: int):
        super().__init__()
        self.p, self.salt = p, salt

    def mask_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """The shape of one clip's mask: every element of the clip."""
        return tuple(x.shape[1:])

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = self.mask_shape(x)
        if noise is None:
            u = torch.rand(x.shape[0], *shape, device=x.device)
        else:  # (B,) int64 seeds
            seeds = [(int(s) * 2 + self.salt) % 2**63 for s in noise.tolist()]
            u = torch.stack([torch.rand(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(x.device)
        return x * ((u >= self.p).to(x.dtype) / (1.0 - self.p))


class FeatureDropout(ClipDropout):
    """Training-time dropout of whole input channels: one mask per clip, shared by all frames and positions.

    The cached VGG features are 512 sparse channels; a head fitted on a few hundred clips otherwise learns
    the clips by heart from a handful of them (on the embedded set: 100% train, ~55% val accuracy; with
    p = 0.5, ~95% val). Sharing the mask over t keeps the motion between frames intact. Identity in eval.
    """

    def __init__(self, p: float):
        super().__init__(p, salt=0)

    def mask_shape(self, x: torch.Tensor) -> tuple[int, ...]:  # x (B, T, C, H, W) -> (1, C, 1, 1)
        return (1, x.shape[2], 1, 1)
