"""Where a clip moves, from its cached feature cubes alone: a class-agnostic motion map on the feature grid.

Why from the features: VideoLSTM drove its attention with optical flow; the cached pool5 cubes already
change where the picture changes, so a map of that change costs no extra decoding, no flow network and no
new cache field, and works on every cache ever written. DESIGN.md ("Motion-guided attention"):

    D_t  = |X_t - X_{t-1}|_2 over the C channels, per cell          (D_0 = D_1: the first frame has no past)
    M_t  = max(D_t - median over the frame's cells of D_t, 0)       (the median takes out most camera motion)
    M~_t = M_t / mean_cells(M_t) + floor, normalised to sum 1       (a frame with no motion left: uniform)

M~_t is a distribution over the h x w cells, like an attention map: the head adds beta * log M~_t to its
attention logits (pipeline/head/model.py), and evaluate reports M~_t itself beside uniform and the centre
prior, the map a frame difference gives for free. The floor keeps a still cell possible (log 0 would forbid
it): with floor 0.1 a cell without motion weighs 0.1 against 1.1 for a cell of average motion.
"""
from __future__ import annotations

FLOOR = 0.1


def motion_map(x: "torch.Tensor", floor: float = FLOOR) -> "torch.Tensor":  # noqa: F821
    """M~_t of every frame: x (B, T, C, h, w) of any float dtype -> (B, T, h, w) float32, each frame summing to 1."""
    import torch

    b, t, _, h, w = x.shape
    if t < 2:  # no frame pair: nothing moves
        return x.new_full((b, t, h, w), 1.0 / (h * w), dtype=torch.float32)
    x = x.float()
    d = (x[:, 1:] - x[:, :-1]).pow(2).sum(dim=2).sqrt()  # (B, T-1, h, w)
    d = torch.cat([d[:, :1], d], dim=1)  # (B, T, h, w): D_0 = D_1
    cells = d.flatten(2)  # (B, T, h*w)
    m = (cells - cells.median(dim=2, keepdim=True).values).clamp_min(0.0)  # (B, T, h*w)
    mean = m.mean(dim=2, keepdim=True)
    m = torch.where(mean > 0, m / mean.clamp_min(1e-12), torch.ones_like(m)) + floor
    return (m / m.sum(dim=2, keepdim=True)).view(b, t, h, w)
