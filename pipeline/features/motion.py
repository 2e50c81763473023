"""Where a clip moves, from its cached feature cubes alone: a class-agnostic motion map on the feature grid.

Why from the features: VideoLSTM drove its attention with optical flow; the cached pool5 cubes already
change where the picture changes, so a map of that change costs no extra decoding, no flow network and no
new cache field, and works on every cache ever written. docs/DESIGN.md ("The head", motion):

    D_t  = |X_t - X_{t-1}|_2 over the C channels, per cell          (D_0 = D_1: the first frame has no past)
    M_t  = max(D_t - median over the frame's cells of D_t, 0)       (the median takes out most camera motion)
    M~_t = M_t / mean_cells(M_t) + floor, normalised to sum 1       (a frame with no motion left: uniform)

M~_t is a distribution over the h x w cells, like an attention map: the head adds beta * log M~_t to its
attention logits (pipeline/head/model.py), and evaluate reports M~_t itself beside uniform and the centre
prior, the map a frame difference gives for free. With `head.motion: input` the head also takes log(1 + D_t),
the raw amount of change at each cell, as one more channel of its projected input P_t: how much moves, which
the normalised map leaves out. The floor keeps a still cell possible (log 0 would forbid
it): with floor 0.1 a cell without motion weighs 0.1 against 1.1 for a cell of average motion.
"""
from __future__ import annotations

from typing import NamedTuple

FLOOR = 0.1


class Motion(NamedTuple):
    """What the head takes from a clip's motion: where (the map, for the attention) and how much (the energy)."""

    map: "torch.Tensor"  # noqa: F821  (B, T, h, w) M~_t, each frame summing to 1
    energy: "torch.Tensor"  # noqa: F821  (B, T, h, w) D_t, the raw change of each cell

    def kept(self, keep: "torch.Tensor") -> "Motion":  # noqa: F821
        """The deletion test's view (keep (B, T, h, w), 0 at deleted cells): a deleted cell loses its energy
        with its features, while the map stays the unmodified clip's (zeroed cells are no motion)."""
        return Motion(self.map, self.energy * keep.to(self.energy.dtype))


def motion_energy(x: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """D_t of every frame: x (B, T, C, h, w) of any float dtype -> (B, T, h, w) float32 (D_0 = D_1; zeros for T = 1)."""
    import torch

    b, t, _, h, w = x.shape
    if t < 2:  # no frame pair: nothing moves
        return x.new_zeros((b, t, h, w), dtype=torch.float32)
    x = x.float()
    d = (x[:, 1:] - x[:, :-1]).pow(2).sum(dim=2).sqrt()  # (B, T-1, h, w)
    return torch.cat([d[:, :1], d], dim=1)  # (B, T, h, w)


def map_of(energy: "torch.Tensor", floor: float = FLOOR) -> "torch.Tensor":  # noqa: F821
    """M~_t from D_t (B, T, h, w): median taken out, normalised to mean 1, floored, normalised to sum 1."""
    import torch

    b, t, h, w = energy.shape
    cells = energy.flatten(2)  # (B, T, h*w)
    m = (cells - cells.median(dim=2, keepdim=True).values).clamp_min(0.0)  # (B, T, h*w)
    mean = m.mean(dim=2, keepdim=True)
    m = torch.where(mean > 0, m / mean.clamp_min(1e-12), torch.ones_like(m)) + floor
    return (m / m.sum(dim=2, keepdim=True)).view(b, t, h, w)


def motion_map(x: "torch.Tensor", floor: float = FLOOR) -> "torch.Tensor":  # noqa: F821
    """M~_t of every frame: x (B, T, C, h, w) of any float dtype -> (B, T, h, w) float32, each frame summing to 1."""
    return map_of(motion_energy(x), floor)


def clip_motion(x: "torch.Tensor") -> Motion:  # noqa: F821
    """Map and energy of clips x (B, T, C, h, w), from one pass over the features."""
    energy = motion_energy(x)
    return Motion(map_of(energy), energy)
