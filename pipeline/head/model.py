"""The attention head (stage two), written so docs/DESIGN.md's equations ("The head") can be checked line by line.

Input X_t in R^{C x H x W}, t = 1..T; d = head.channels, k = head.kernel.

    P_t  = W_p * X_t                                       1x1 conv, C -> d            w_p
    P_t := [P_t, log(1 + D_t)]                             motion: input only (d + 1)
    Z_t  = w_z * tanh(W_xa * P_t + W_ha * H_{t-1} + b_a)   1x1 convs -> 1 channel      SoftAttention
           + beta * log M~_t                                motion: prior | input       beta
    A_t  = softmax of Z_t over the H*W positions                                       attend()
    X~_t = (H*W) * A_t (.) P_t                             uniform A_t: X~_t == P_t    attend()
    i, f, o, g = sigm, sigm, sigm, tanh(W_x * X~_t + W_h * H_{t-1} + b)   kxk, same    ConvLSTMCell
    C_t  = f (.) C_{t-1} + i (.) g,   H_t = o (.) tanh(C_t)                            lstm_update()
    H_0, C_0 = tanh(conv(mean_t P_t))                                                  StateInit
    r_t  = sum_i A_{t,i} H_{t,i}                           readout: attention          ConvLSTMHead.readout
         = mean_i((H*W) A_{t,i} H_{t,i})                   (the (H*W) A_t attend() computes; uniform: avgpool)
    y_t  = W_c dropout(r_t) + b_c                          per-frame logits            w_c
           + W_g dropout(LN(sum_i A_{t,i} X_{t,i}))        appearance: attended        Appearance

`ConvLSTMHead.forward` computes them in this order, one line each, shapes in comments; `LSTMHead.forward` the
same with a vector state, `MeanHead.forward` the baseline; `RecurrentHead` builds the layers both share.
Training only, before W_p: FeatureDropout (whole channels of X, one mask per clip; pipeline/head/dropout.py).

M~_t is the clip's motion map from its own features (pipeline/features/motion.py); beta is a learned scalar,
starting at 1, with a learning rate of its own (train.motion_lr); with `motion: input` P_t also carries
log(1 + D_t), the raw change of each cell. Why motion guides the attention, and why the readout goes through
A_t: docs/DESIGN.md, "The head". `motion: none` is the head without either, bit for bit.

Variants (HeadConfig):
  cell      convlstm  the equations above;
            lstm      Sharma et al.: the LSTM input is the attention-weighted sum over positions,
                      avgpool(X~_t) = sum_i A_{t,i} P_{t,i}, fed to a vector LSTM of d units; attention
                      sees P_t and h_{t-1} broadcast over the positions; h_0, c_0 from the mean feature;
            mean      no temporal memory: y_t = W_c dropout(avgpool(X_t)) + b_c, uniform attention
                      (the `attention` setting does not apply to it).
  attention soft      Z_t as above;
            none      Z_t = 0, so A_t = 1/(H*W) everywhere and X~_t == P_t exactly.
  motion    input     the prior, and log(1 + D_t) as one more channel of P_t (the default);
            prior     + beta * log M~_t on Z_t (convlstm and lstm, soft attention only);
            none      no motion term: the first head.
  appearance none     (the default);
            attended  + W_g dropout(LN(sum_i A_ti X_ti)) on y_t: the frame's appearance read through A_t;
            mean      the same with mean_i X_ti, past the attention (to measure against).
  heads     n         n heads of these settings read as one (HeadEnsemble: mean probability, mean map).
  readout   attention r_t = sum_i A_{t,i} H_{t,i} (the default);
            mean      r_t = avgpool(H_t), the first design. Only the ConvLSTM has a spatial state to read:
                      the setting does not apply to lstm (which reads h_t) or mean.

Layout: inside the heads a feature map is (B, H, W, channels). A 1x1 conv is then an nn.Linear on the last
axis, which runs as one matrix product; on 7x7 maps that is several times faster than mkldnn's 1x1
convolution, and the kxk convolutions read the same memory as channels_last (see `conv_hwc`).

Loss (head_loss): mean_t CE(y_t, label) + lambda sum_i (1 - sum_t A_ti HW/T)^2 (0 for uniform attention);
video prediction (video_probabilities): the mean over t of the per-frame softmax."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import HeadConfig, check
from pipeline.features.motion import Motion, clip_motion
from pipeline.head.dropout import ClipDropout, FeatureDropout


class HeadOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, K) per-frame logits y_t
    attention: torch.Tensor  # (B, T, H, W) attention maps A_t, each sums to 1
    members: torch.Tensor | None = None  # (M, B, T, K) each head's own logits, for a HeadEnsemble in training


def conv_hwc(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply `conv` to a (B, H, W, C) map; the permuted view is channels_last, so nothing is copied."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C) -> (B, H, W, C')


def conv2d_hwc(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    """A kxk, same-padding nn.Conv2d for `conv_hwc`; its weight is stored channels_last like its input,
    else the convolution would copy the weight into that layout on every call (forward and backward)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    return conv.to(memory_format=torch.channels_last)


def features_hwc(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, C, H, W) of any float dtype -> (B, T, H, W, C) in `dtype`, contiguous, in one copy."""
    return x.permute(0, 1, 3, 4, 2).to(dtype, memory_format=torch.contiguous_format)


# --- attention -------------------------------------------------------------------------------------------


class SoftAttention(nn.Module):
    """Z_t = w_z * tanh(W_xa * P_t + W_ha * H_{t-1} + b_a), with 1x1 convs: one score per position.

    W_xa * P_t + b_a does not depend on the recurrent state, so `input_term` computes it for all frames at
    once, outside the recurrence. H_{t-1} is (B, H, W, d) for the ConvLSTM or (B, 1, 1, d) for the vector
    LSTM, where it broadcasts over the positions.

    w_z starts at zero, so training starts from uniform attention (where the attention readout is avgpool):
    the ConvLSTM learns what to carry before the attention learns where to look. From a random w_z one
    seed in three locked its attention beside the actor (embedded set, seed 1: 1.9x the uniform mass in
    the box, 87.5% accuracy; from zero: 8.3x, 98.4%; docs/BENCHMARKS.md).
    """

    def __init__(self, channels: int, in_channels: int):
        super().__init__()
        self.w_xa = nn.Linear(in_channels, channels)  # its bias is b_a; in_channels: d, or d + 1 with motion: input
        self.w_ha = nn.Linear(channels, channels, bias=False)
        self.w_z = nn.Linear(channels, 1, bias=False)  # a bias would cancel in the softmax
        nn.init.zeros_(self.w_z.weight)  # uniform attention at the start; gradients still reach w_z

    def input_term(self, p: torch.Tensor) -> torch.Tensor:
        return self.w_xa(p)  # (..., H, W, d) -> (..., H, W, d)

    def forward(self, p_term: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        z = self.w_z(torch.tanh(p_term + self.w_ha(h_prev)))  # (B, H, W, 1)
        return z.flatten(1)  # (B, H*W)


class UniformAttention(nn.Module):
    """Z_t = 0: every position scores the same, so A_t = 1/(H*W) (attention: none)."""

    def input_term(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def forward(self, p_term: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = p_term.shape
        return p_term.new_zeros(b, h * w)  # (B, H*W)


def attend(p: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A_t = softmax of Z_t over positions and X~_t = (H*W) * A_t (.) P_t; returns (X~_t, A_t, (H*W) * A_t).

    p: (B, H, W, d), z: (B, H*W). The softmax is written out as e / sum(e) with e = exp(Z - max Z) so that
    (H*W) * A_t is computed as e * (H*W / sum(e)): for constant scores e = 1 and sum(e) = H*W exactly, so
    uniform attention multiplies P_t by exactly 1 and X~_t == P_t bit for bit.
    """
    b, h, w, _ = p.shape
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # the softmax in at least float32
    e = torch.exp(z - z.amax(dim=1, keepdim=True).detach())  # (B, H*W); the shift cancels, so no gradient
    total = e.sum(dim=1, keepdim=True)  # (B, 1)
    a = e / total  # (B, H*W), sums to 1
    # (H*W) * A_t; not `h * w / total`, which multiplies by a rounded 1/total (49 * (1/49) != 1 in float64)
    scale = e * (torch.full_like(total, h * w) / total)  # (B, H*W)
    scale = scale.view(b, h, w, 1).to(p.dtype)
    return p * scale, a, scale


def make_attention(kind: str, channels: int, in_channels: int) -> nn.Module:
    return SoftAttention(channels, in_channels) if kind == "soft" else UniformAttention()


class Appearance(nn.Module):
    """y_t += W_g dropout(LN(a_t)), a_t = sum_i A_{t,i} X_{t,i} (attended: read through the map, so the deletion
    test still measures it) or mean_i X_{t,i} (mean: past the map). A linear path for the clip's appearance,
    where it decides the class (docs/DESIGN.md, "Small real datasets"); W_g starts at zero.
    """

    def __init__(self, kind: str, in_channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.attended = kind == "attended"
        self.norm = nn.LayerNorm(in_channels)
        self.dropout = ClipDropout(dropout, salt=2)
        self.w_g = nn.Linear(in_channels, num_classes, bias=False)  # b_c is the head's one bias
        nn.init.zeros_(self.w_g.weight)

    def forward(self, x: torch.Tensor, maps: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, H, W, C) the features as the head saw them, maps (B, T, H*W) A_t -> (B, T, K)."""
        if self.attended:
            a = torch.einsum("bti,btic->btc", maps.to(x.dtype), x.flatten(2, 3))  # sum_i A_ti X_ti: (B, T, C)
        else:
            a = x.mean(dim=(2, 3))  # mean_i X_ti: (B, T, C)
        return self.w_g(self.dropout(self.norm(a), noise))  # (B, T, K)


# --- recurrent cells -------------------------------------------------------------------------------------


def lstm_update(gates: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """i, f, o, g = sigm, sigm, sigm, tanh(gates); C_t = f (.) C_{t-1} + i (.) g; H_t = o (.) tanh(C_t).

    gates: (..., 4d), channels last, in the order i, f, o, g.
    """
    d = gates.shape[-1] // 4
    i, f, o = torch.sigmoid(gates[..., : 3 * d]).chunk(3, dim=-1)
    g = torch.tanh(gates[..., 3 * d :])
    c = f * c_prev + i * g
    h = o * torch.tanh(c)
    return h, c


class ConvLSTMCell(nn.Module):
    """ConvLSTM step. W_x * X~_t + W_h * H_{t-1} + b is one kxk conv over concat([X~_t, H_{t-1}])."""

    def __init__(self, in_channels: int, channels: int, kernel: int):
        super().__init__()
        self.w = conv2d_hwc(in_channels + channels, 4 * channels, kernel)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h_prev, c_prev = state  # (B, H, W, d) each
        gates = conv_hwc(self.w, torch.cat([x, h_prev], dim=-1))  # (B, H, W, 4d)
        return lstm_update(gates, c_prev)


class LSTMCell(nn.Module):
    """Vector LSTM step. W_x x_t + W_h h_{t-1} + b is one linear map of concat([x_t, h_{t-1}])."""

    def __init__(self, in_features: int, features: int):
        super().__init__()
        self.w = nn.Linear(in_features + features, 4 * features)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h_prev, c_prev = state  # (B, d) each
        gates = self.w(torch.cat([x, h_prev], dim=-1))  # (B, 4d)
        return lstm_update(gates, c_prev)


class StateInit(nn.Module):
    """H_0, C_0 = tanh(conv(mean_t P_t)): one kxk conv to 2d channels (a linear map for the vector LSTM)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear):
        super().__init__()
        self.w = layer

    def forward(self, p_mean: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        out = conv_hwc(self.w, p_mean) if isinstance(self.w, nn.Conv2d) else self.w(p_mean)
        h0, c0 = torch.tanh(out).chunk(2, dim=-1)  # (B, H, W, d) or (B, d) each
        return h0, c0.to(dtype)  # C accumulates over T steps: keep it in the input's precision under autocast


# --- heads -----------------------------------------------------------------------------------------------


class RecurrentHead(nn.Module):
    """The layers both attention heads share, under docs/DESIGN.md's names; each head writes out its own forward.

    ConvLSTMHead keeps a (B, H, W, d) state and reads out through the attention; LSTMHead keeps a (B, d) vector,
    feeds it avgpool(X~_t) and shows h_{t-1} to the attention broadcast over the positions. Both build their
    state initialiser and cell before calling this (their weights are drawn first, so a seed gives the head it
    always gave); the order the layers are registered in here is the order of the checkpoints' state_dicts.
    """

    def __init__(self, cfg: HeadConfig, in_channels: int, num_classes: int, *, init_state: StateInit,
                 cell: nn.Module):
        super().__init__()
        self.uses_motion = cfg.uses_motion  # attention none stays uniform
        if self.uses_motion:
            self.beta = nn.Parameter(torch.ones(()))  # weight of log M~_t in Z_t: the prior at face value to start
        self.motion_channel = cfg.motion_channels == 1  # P_t gets log(1 + D_t) as one more channel
        self.feature_dropout = FeatureDropout(cfg.feature_dropout)
        self.w_p = nn.Linear(in_channels, cfg.channels, bias=False)  # 1x1 conv
        self.attention = make_attention(cfg.attention, cfg.channels, cfg.channels + cfg.motion_channels)
        self.init_state = init_state
        self.cell = cell
        self.dropout = ClipDropout(cfg.dropout, salt=1)
        self.w_c = nn.Linear(cfg.channels, num_classes)
        # registered last, so the layers above draw the weights they always drew for a seed
        self.appearance = Appearance(cfg.appearance, in_channels, num_classes, cfg.dropout) \
            if cfg.uses_appearance else None

    def inputs(self, x: torch.Tensor, noise: torch.Tensor | None, motion: Motion | None):
        """The equations both heads start with, all frames at once: P_t from X_t (with the motion channel), its
        attention term and log M~_t. x (B, T, C, H, W) -> X_t as the head sees it (B, T, H, W, C), P (B, T, H, W,
        d[+1]), W_xa * P_t + b_a (B, T, H, W, d), log M~_t as T x (B, H*W) (None without motion guidance)."""
        log_m = None
        if self.uses_motion:  # M~_t and D_t of the clip as it came, before any dropout: (B, T, H, W) each
            motion = motion if motion is not None else self.motion_of(x)
            log_m = torch.log(motion.map.float()).flatten(2).unbind(1)  # log M~_t: T x (B, H*W)
        x = features_hwc(self.feature_dropout(x, noise), self.w_p.weight.dtype)  # X_t: (B, T, H, W, C)
        p = self.w_p(x)  # P_t = W_p * X_t: (B, T, H, W, d)
        if self.motion_channel:  # P_t := [P_t, log(1 + D_t)]: (B, T, H, W, d + 1)
            p = torch.cat([p, torch.log1p(motion.energy).to(p.dtype).unsqueeze(-1)], dim=-1)
        p_term = self.attention.input_term(p)  # W_xa * P_t + b_a: (B, T, H, W, d)
        return x, p, p_term, log_m

    def outputs(self, x: torch.Tensor, r: torch.Tensor, maps: list[torch.Tensor], noise: torch.Tensor | None,
                size: tuple[int, int]) -> HeadOutput:
        """y_t = W_c dropout(r_t) + b_c (+ W_g dropout(LN(a_t)) with an appearance term) and the maps:
        x (B, T, H, W, C), r (B, T, d), maps T x (B, H*W) -> logits (B, T, K), attention (B, T, H, W)."""
        a = torch.stack(maps, dim=1)  # A_t: (B, T, H*W)
        logits = self.w_c(self.dropout(r, noise))  # y_t = W_c dropout(r_t) + b_c: (B, T, K)
        if self.appearance is not None:
            logits = logits + self.appearance(x, a, noise)  # + W_g dropout(LN(a_t)): (B, T, K)
        return HeadOutput(logits, a.view(*a.shape[:2], *size))

    def motion_of(self, x: torch.Tensor) -> Motion | None:
        """M~_t and D_t of the clips x (B, T, C, H, W), (B, T, H, W) each; None for a head without motion."""
        return clip_motion(x) if self.uses_motion else None


class ConvLSTMHead(RecurrentHead):
    """Soft-attention ConvLSTM (after VideoLSTM): the equations at the top of this module, in `forward`."""

    def __init__(self, cfg: HeadConfig, in_channels: int, num_classes: int):
        p_channels = cfg.channels + cfg.motion_channels  # of P_t
        super().__init__(cfg, in_channels, num_classes,
                         init_state=StateInit(conv2d_hwc(p_channels, 2 * cfg.channels, cfg.kernel)),
                         cell=ConvLSTMCell(p_channels, cfg.channels, cfg.kernel))
        self.read_through_attention = cfg.readout == "attention"

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None, motion: Motion | None = None) -> HeadOutput:
        """x (B, T, C, H, W); `noise` (B,) int64: each clip's dropout seed in training (see ClipDropout);
        `motion`: the clips's Motion when it comes from elsewhere (the deletion test keeps the unmodified
        clip's map), else it is computed from x before any dropout."""
        x, p, p_term, log_m = self.inputs(x, noise, motion)  # X_t, P_t, W_xa * P_t + b_a, log M~_t
        h, c = self.init_state(p.mean(dim=1), x.dtype)  # H_0, C_0 = tanh(conv(mean_t P_t)): (B, H, W, d) each
        readouts, maps = [], []
        for step, (p_t, p_term_t) in enumerate(zip(p.unbind(1), p_term.unbind(1))):  # unbind: one gradient copy
            z = self.attention(p_term_t, h)  # Z_t = w_z * tanh(W_xa * P_t + W_ha * H_{t-1} + b_a): (B, H*W)
            if self.uses_motion:
                z = z.float() + self.beta * log_m[step]  # Z_t += beta * log M~_t, in float32 like the softmax
            x_att, a, scale = attend(p_t, z)  # A_t = softmax(Z_t): (B, H*W); X~_t = (H*W) A_t (.) P_t: (B, H, W, d)
            h, c = self.cell(x_att, (h, c))  # i, f, o, g; C_t = f (.) C_{t-1} + i (.) g; H_t = o (.) tanh(C_t)
            readouts.append(self.readout(h, scale))  # r_t = sum_i A_{t,i} H_{t,i} (readout mean: avgpool H_t): (B, d)
            maps.append(a)
        return self.outputs(x, torch.stack(readouts, dim=1), maps, noise, x.shape[2:4])  # y_t, A_t

    def readout(self, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """r_t (B, d) from H_t (B, H, W, d) and (H*W) A_t (B, H, W, 1), as `attend` returns it."""
        if self.read_through_attention:
            return (scale * h).mean(dim=(1, 2))  # mean_i((H*W) A_{t,i} H_{t,i}) = sum_i A_{t,i} H_{t,i}
        return h.mean(dim=(1, 2))  # avgpool(H_t): readout mean, the first design


class LSTMHead(RecurrentHead):
    """Sharma et al.: attention-weighted sum over positions -> vector LSTM of d units."""

    def __init__(self, cfg: HeadConfig, in_channels: int, num_classes: int):
        p_channels = cfg.channels + cfg.motion_channels  # of P_t
        super().__init__(cfg, in_channels, num_classes, init_state=StateInit(nn.Linear(p_channels, 2 * cfg.channels)),
                         cell=LSTMCell(p_channels, cfg.channels))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None, motion: Motion | None = None) -> HeadOutput:
        """As ConvLSTMHead.forward, with a vector state: x (B, T, C, H, W), `noise` (B,), `motion`."""
        x, p, p_term, log_m = self.inputs(x, noise, motion)  # X_t, P_t, W_xa * P_t + b_a, log M~_t
        h, c = self.init_state(p.mean(dim=(1, 2, 3)), x.dtype)  # h_0, c_0 = tanh(W mean over t and i of P_t): (B, d)
        readouts, maps = [], []
        for step, (p_t, p_term_t) in enumerate(zip(p.unbind(1), p_term.unbind(1))):  # unbind: one gradient copy
            z = self.attention(p_term_t, h[:, None, None, :])  # Z_t, h_{t-1} broadcast over the positions: (B, H*W)
            if self.uses_motion:
                z = z.float() + self.beta * log_m[step]  # Z_t += beta * log M~_t, in float32 like the softmax
            x_att, a, _ = attend(p_t, z)  # A_t = softmax(Z_t): (B, H*W); X~_t = (H*W) A_t (.) P_t: (B, H, W, d)
            h, c = self.cell(x_att.mean(dim=(1, 2)), (h, c))  # LSTM on avgpool(X~_t) = sum_i A_{t,i} P_{t,i}
            readouts.append(h)  # r_t = h_t: a vector state has no positions to weight (head.readout does not apply)
            maps.append(a)
        return self.outputs(x, torch.stack(readouts, dim=1), maps, noise, x.shape[2:4])  # y_t, A_t


class MeanHead(nn.Module):
    """No temporal memory: y_t = W_c dropout(avgpool(X_t)) + b_c, with uniform attention."""

    def __init__(self, cfg: HeadConfig, in_channels: int, num_classes: int):
        super().__init__()
        self.feature_dropout = FeatureDropout(cfg.feature_dropout)
        self.dropout = ClipDropout(cfg.dropout, salt=1)
        self.w_c = nn.Linear(in_channels, num_classes)

    uses_motion = False  # no attention to guide

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None, motion: Motion | None = None) -> HeadOutput:
        b, t, _, h, w = x.shape  # (B, T, C, H, W)
        dtype = self.w_c.weight.dtype
        pooled = self.feature_dropout(x, noise).mean(dim=(3, 4), dtype=dtype)  # avgpool(X_t): (B, T, C)
        logits = self.w_c(self.dropout(pooled, noise))  # (B, T, K)
        attention = torch.full((b, t, h, w), 1.0 / (h * w), dtype=dtype, device=x.device)
        return HeadOutput(logits, attention)


class HeadEnsemble(nn.Module):
    """Several heads of one config read as one: the mean of their video probabilities and of their maps. Each
    member has its own initial weights, dropout masks and loss (`head_loss` reads `HeadOutput.members`); the
    motion map is computed once (docs/DESIGN.md, "Small real datasets").
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.uses_motion = getattr(members[0], "uses_motion", False)

    def motion_of(self, x: torch.Tensor) -> Motion | None:
        return self.members[0].motion_of(x) if self.uses_motion else None

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None, motion: Motion | None = None) -> HeadOutput:
        """x (B, T, C, H, W) -> per-frame logits log(mean_m softmax(y_mt)) (B, T, K), so that their softmax is
        the members' mean probability; A_t the mean of the members' maps (B, T, H, W); and each member's logits."""
        motion = motion if motion is not None else self.motion_of(x)
        outs = [m(x, None if noise is None else noise ^ (j * MEMBER_SALT), motion)  # each its own dropout masks
                for j, m in enumerate(self.members)]
        member_logits = torch.stack([o.logits.float() for o in outs])  # (M, B, T, K)
        mean_p = torch.softmax(member_logits, dim=-1).mean(dim=0)  # (B, T, K)
        logits = torch.log(mean_p.clamp_min(torch.finfo(mean_p.dtype).tiny))
        attention = torch.stack([o.attention for o in outs]).mean(dim=0)  # (B, T, H, W), still sums to 1
        return HeadOutput(logits, attention, member_logits)


MEMBER_SALT = 0x5DEECE66D  # member j's dropout seeds: the clip's XOR j times this (member 0: the clip's own)
HEADS = {"convlstm": ConvLSTMHead, "lstm": LSTMHead, "mean": MeanHead}


def build_head(cfg: HeadConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The head that `cfg` names, for C = in_channels input channels and K = num_classes classes: one head, or a
    HeadEnsemble of `cfg.heads` of them (drawn one after the other, so the first is the single head of a seed)."""
    cfg = check(cfg)
    if cfg.appearance == "auto":  # a programming error, not a user's: stages/train.py resolves it from the split
        raise ValueError("head.appearance auto is resolved from the train split (HeadConfig.for_train_split) "
                         "before a head is built")
    members = [HEADS[cfg.cell](cfg, in_channels, num_classes) for _ in range(cfg.heads)]
    return members[0] if cfg.heads == 1 else HeadEnsemble(members)


# --- loss and prediction ---------------------------------------------------------------------------------


def attention_regulariser(attention: torch.Tensor) -> torch.Tensor:
    """sum_i (1 - sum_t A_{t,i} * HW/T)^2, averaged over the batch; 0 when every A_t is uniform.

    attention: (B, T, H, W). Sharma et al.'s term pushes the model to look at every position at some
    time; the HW/T factor scales it so uniform attention, the neutral case, costs nothing.
    """
    b, t, h, w = attention.shape
    coverage = attention.float().sum(dim=1).flatten(1) * (h * w / t)  # (B, H*W)
    return ((1.0 - coverage) ** 2).sum(dim=1).mean()


def head_loss(out: HeadOutput, labels: torch.Tensor,
              attention_reg: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over t (and the batch) of CE(y_t, label) + attention_reg * attention_regulariser.

    Returns (total, parts); parts holds the two terms, detached, for logging.
    """
    b, t, k = out.logits.shape
    if out.members is not None:  # an ensemble in training: each member's own cross-entropy, averaged
        m = out.members.shape[0]
        ce = F.cross_entropy(out.members.reshape(m * b * t, k), labels.repeat_interleave(t).repeat(m))
    else:
        ce = F.cross_entropy(out.logits.float().reshape(b * t, k), labels.repeat_interleave(t))
    reg = attention_regulariser(out.attention)
    total = ce + attention_reg * reg
    return total, {"cross_entropy": ce.detach(), "attention_reg": reg.detach()}


def video_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Video prediction: the mean over t of the per-frame softmax, (B, T, K) -> (B, K) float32.

    The project's one definition: training, validation, evaluate, render and predict all call it (numpy
    outputs through `infer.Outputs.probabilities`); accuracy is `infer.is_correct` of its result.
    """
    return torch.softmax(logits.float(), dim=-1).mean(dim=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
