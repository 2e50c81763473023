"""The attention head: shapes, the attention equations, the loss, gradients, and that it learns motion."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from pipeline.config import ConfigError, HeadConfig
from pipeline.features.motion import motion_map
from pipeline.head.model import (
    HeadOutput,
    attend,
    attention_regulariser,
    build_head,
    count_parameters,
    head_loss,
    video_probabilities,
)

VARIANTS = list(itertools.product(("convlstm", "lstm", "mean"), ("soft", "none")))
MOTIONS = ("none", "prior")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_head(cell: str, attention: str, in_channels: int = 6, num_classes: int = 4, **kw) -> torch.nn.Module:
    """The head's equations without the motion term unless `motion` says otherwise (it has tests of its own)."""
    cfg = HeadConfig(cell=cell, attention=attention, channels=kw.pop("channels", 8), motion=kw.pop("motion", "none"),
                     appearance=kw.pop("appearance", "none"), **kw)
    return build_head(cfg, in_channels, num_classes)


@pytest.mark.parametrize("motion", MOTIONS)
@pytest.mark.parametrize("cell,attention", VARIANTS)
def test_every_variant_returns_per_frame_logits_and_an_attention_map_per_frame(cell, attention, motion):
    head = small_head(cell, attention, motion=motion)
    x = torch.randn(2, 5, 6, 7, 7)  # (B, T, C, H, W)

    out = head(x)

    assert isinstance(out, HeadOutput)
    assert out.logits.shape == (2, 5, 4)
    assert out.attention.shape == (2, 5, 7, 7)


@pytest.mark.parametrize("motion", MOTIONS)
@pytest.mark.parametrize("cell,attention", VARIANTS)
def test_attention_maps_are_distributions_over_positions(cell, attention, motion):
    head = small_head(cell, attention, motion=motion)

    a = head(torch.randn(3, 4, 6, 5, 6)).attention

    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(dim=(2, 3)), torch.ones(3, 4))


def learnt(head: torch.nn.Module) -> torch.nn.Module:
    """`head` with w_z as after some training (it starts at zero: uniform attention)."""
    torch.nn.init.normal_(head.attention.w_z.weight)
    return head


def test_soft_attention_starts_uniform_so_the_readouts_start_equal():
    x = torch.randn(2, 4, 6, 7, 7)
    a = small_head("convlstm", "soft")(x).attention
    torch.testing.assert_close(a, torch.full_like(a, 1 / 49))


def test_soft_attention_is_not_uniform_while_attention_none_is():
    x = torch.randn(2, 4, 6, 7, 7)

    soft = learnt(small_head("convlstm", "soft"))(x).attention
    none = small_head("convlstm", "none")(x).attention

    assert soft.std(dim=(2, 3)).min() > 0
    torch.testing.assert_close(none, torch.full_like(none, 1 / 49))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("grid", [(7, 7), (14, 14), (3, 5), (1, 1)])
def test_uniform_attention_is_the_identity(dtype, grid):
    p = torch.randn(4, *grid, 8).to(dtype)  # (B, H, W, d)
    constant_scores = torch.full((4, grid[0] * grid[1]), 0.37, dtype=dtype)

    x_att, a, _ = attend(p, constant_scores)

    assert torch.equal(x_att, p)  # bit for bit, not just close
    torch.testing.assert_close(a, torch.full_like(a, 1 / (grid[0] * grid[1])))


def test_attend_weights_positions_by_hw_times_the_softmax():
    p = torch.randn(2, 4, 4, 3)  # (B, H, W, d)
    z = torch.randn(2, 16)

    x_att, a, _ = attend(p, z)

    torch.testing.assert_close(a, torch.softmax(z, dim=1))
    torch.testing.assert_close(x_att, 16 * a.view(2, 4, 4, 1) * p)


def test_attention_regulariser_is_zero_for_uniform_attention_and_positive_otherwise():
    uniform = torch.full((2, 30, 7, 7), 1 / 49)
    peaked = torch.softmax(torch.randn(2, 30, 49) * 3, dim=-1).view(2, 30, 7, 7)

    assert attention_regulariser(uniform).item() == pytest.approx(0.0, abs=1e-9)
    assert attention_regulariser(peaked).item() > 0.1


def test_head_loss_is_frame_cross_entropy_plus_weighted_regulariser():
    logits = torch.randn(2, 3, 4)
    attention = torch.softmax(torch.randn(2, 3, 25), dim=-1).view(2, 3, 5, 5)
    labels = torch.tensor([1, 3])

    total, parts = head_loss(HeadOutput(logits, attention), labels, attention_reg=0.5)

    frame_labels = torch.tensor([1, 1, 1, 3, 3, 3])
    ce = torch.nn.functional.cross_entropy(logits.reshape(6, 4), frame_labels)
    torch.testing.assert_close(parts["cross_entropy"], ce)
    torch.testing.assert_close(total, ce + 0.5 * attention_regulariser(attention))


def test_video_probabilities_are_the_mean_of_per_frame_softmax():
    logits = torch.randn(2, 5, 4)

    probs = video_probabilities(logits)

    assert probs.shape == (2, 4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(probs[1], torch.softmax(logits[1], dim=-1).mean(dim=0))


@pytest.mark.parametrize("cell", ["convlstm", "lstm"])
def test_gradients_match_finite_differences_in_float64(cell):
    head = small_head(cell, "soft", in_channels=3, num_classes=2, channels=2, dropout=0.0).double().eval()
    names, values = zip(*[(n, p.detach().clone().requires_grad_()) for n, p in head.named_parameters()])
    x = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)  # (B, T, C, H, W)

    def run(x, *params):
        out = functional_call(head, dict(zip(names, params)), (x,))
        return out.logits, out.attention

    assert torch.autograd.gradcheck(run, (x, *values), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("cell,attention", VARIANTS)
def test_each_variant_trains_one_step_with_finite_loss_and_moving_parameters(cell, attention):
    head = small_head(cell, attention)
    x, labels = torch.randn(4, 5, 6, 7, 7), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in head.parameters()]
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-2)

    loss, _ = head_loss(head(x), labels, attention_reg=1e-3)
    loss.backward()
    optimiser.step()

    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, head.parameters()))


def test_half_precision_features_give_float32_logits():
    head = small_head("convlstm", "soft")

    out = head(torch.randn(2, 3, 6, 7, 7).half())

    assert out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()


def test_bf16_autocast_runs_and_keeps_the_cell_state_in_float32():
    head = small_head("convlstm", "soft")

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(2, 3, 6, 7, 7))
        loss, _ = head_loss(out, torch.tensor([0, 1]), attention_reg=1e-3)
    loss.backward()

    assert torch.isfinite(loss)
    torch.testing.assert_close(out.attention.float().sum(dim=(2, 3)), torch.ones(2, 3), atol=1e-2, rtol=0)


def test_default_head_parameter_count_follows_the_equations():
    c, k, classes = 512, 3, 8
    d = HeadConfig().channels

    head = build_head(HeadConfig().for_train_split(clips_a_class=100), c, classes)  # a large split: no appearance

    p = d + 1  # P_t's channels: d, and log(1 + D_t) (head.motion: input, the default)
    w_p = c * d  # P_t = W_p * X_t (no bias)
    attention = (p * d + d) + d * d + d  # W_xa with b_a, W_ha, w_z
    init = p * 2 * d * k * k + 2 * d  # H_0, C_0 = tanh(conv(mean_t P_t))
    cell = (p + d) * 4 * d * k * k + 4 * d  # [W_x W_h] kxk to i, f, o, g, with b
    classifier = d * classes + classes  # W_c, b_c
    beta = 1  # the motion prior's weight
    assert count_parameters(head) == w_p + attention + init + cell + classifier + beta


@pytest.mark.parametrize(
    "change,message",
    [({"cell": "gru"}, "head.cell"), ({"attention": "hard"}, "head.attention"), ({"kernel": 2}, "odd"),
     ({"dropout": 1.0}, "dropout")],
)
def test_unusable_head_settings_are_reported_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_head(HeadConfig(appearance="none", **change), 512, 8)
    assert "\n" not in str(err.value)


# --- it learns what it is for: motion needs memory ---------------------------------------------------------

DIRECTIONS = 4  # right, left, down, up


def moving_blob_clips(n: int, generator: torch.Generator, frames: int = 5, size: int = 7, channels: int = 3):
    """A bright blob crossing a size x size grid, one cell per frame; the class is its direction.

    Every frame alone shows one blob somewhere, so without memory the class cannot be told.
    """
    labels = torch.arange(n) % DIRECTIONS
    x = 0.1 * torch.randn(n, frames, channels, size, size, generator=generator)  # (B, T, C, H, W)
    start = torch.randint(0, size - frames + 1, (n,), generator=generator)
    across = torch.randint(0, size, (n,), generator=generator)
    for i in range(n):
        for t in range(frames):
            along = start[i] + t if labels[i] in (0, 2) else size - 1 - start[i] - t
            row, col = (across[i], along) if labels[i] < 2 else (along, across[i])
            x[i, t, 0, row, col] += 1.0
    return x, labels


def training_accuracy(cell: str, steps: int) -> float:
    """Fit the head to 64 moving-blob clips; the video accuracy on those same clips."""
    x, labels = moving_blob_clips(64, torch.Generator().manual_seed(1))
    head = build_head(HeadConfig(appearance="none", cell=cell, attention="soft", channels=8, dropout=0.0), 3,
                      DIRECTIONS)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss, _ = head_loss(head(x), labels, attention_reg=1e-3)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        predicted = video_probabilities(head.eval()(x).logits).argmax(dim=1)
    return (predicted == labels).float().mean().item()


@pytest.mark.slow
def test_convlstm_head_can_fit_motion_direction_which_the_mean_baseline_cannot():
    convlstm = training_accuracy("convlstm", steps=150)
    mean = training_accuracy("mean", steps=150)

    assert convlstm >= 0.95
    assert mean <= 1 / DIRECTIONS + 0.2


# --- the readout through the attention (head.readout) -------------------------------------------------


def twin_heads(attention: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same ConvLSTM weights, read out through the attention and by avgpool."""
    through = small_head("convlstm", attention, dropout=0.0, readout="attention")
    pooled = small_head("convlstm", attention, dropout=0.0, readout="mean")
    pooled.load_state_dict(through.state_dict())
    return through.eval(), pooled.eval()


@pytest.mark.parametrize("attention", ["none", "soft"])
def test_with_uniform_attention_the_attention_readout_is_avgpool_bit_for_bit(attention):
    through, pooled = twin_heads(attention)
    if attention == "soft":  # the general code path, scores made constant: no special case for uniform
        torch.nn.init.zeros_(through.attention.w_z.weight)
        pooled.load_state_dict(through.state_dict())
    x = torch.randn(2, 4, 6, 7, 7)
    assert torch.equal(through(x).logits, pooled(x).logits)


def test_the_attention_readout_is_the_attention_weighted_sum_of_the_state():
    head = small_head("convlstm", "soft", readout="attention")
    h = torch.randn(3, 7, 7, 8)  # (B, H, W, d)
    a = torch.softmax(torch.randn(3, 49), dim=1)
    scale = (49 * a).view(3, 7, 7, 1)
    expected = (a.view(3, 7, 7, 1) * h).sum(dim=(1, 2))  # r_t = sum_i A_ti H_ti
    torch.testing.assert_close(head.readout(h, scale), expected)


def test_with_soft_attention_the_two_readouts_differ():
    through, pooled = twin_heads("soft")
    learnt(through)
    pooled.load_state_dict(through.state_dict())
    x = torch.randn(2, 4, 6, 7, 7)
    assert not torch.allclose(through(x).logits, pooled(x).logits)


@pytest.mark.slow  # fast form: test_gradients_match_finite_differences_in_float64[convlstm] (the default readout)
@pytest.mark.parametrize("readout", ["attention", "mean"])
def test_gradients_of_the_convlstm_head_check_numerically(readout):
    head = small_head("convlstm", "soft", in_channels=3, num_classes=2, channels=2, dropout=0.0, readout=readout)
    head = learnt(head).double().eval()
    x = torch.randn(1, 3, 3, 3, 2, dtype=torch.float64, requires_grad=True)  # (B, T, C, H, W)
    names = [n for n, _ in head.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in head.named_parameters())

    def logits(x_in, *values):
        return functional_call(head, dict(zip(names, values)), (x_in,)).logits

    assert torch.autograd.gradcheck(logits, (x, *params), eps=1e-6, atol=1e-5)


def test_readout_does_not_apply_to_the_vector_lstm_or_the_mean_baseline():
    x = torch.randn(2, 4, 6, 7, 7)
    for cell in ("lstm", "mean"):
        a = small_head(cell, "soft", dropout=0.0, readout="attention").eval()
        b = small_head(cell, "soft", dropout=0.0, readout="mean").eval()
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(x).logits, b(x).logits)


def test_the_default_head_reads_through_the_attention_without_the_regulariser():
    from pipeline.config import TrainConfig

    assert HeadConfig().readout == "attention" and TrainConfig().attention_reg == 0.0
    assert small_head("convlstm", "soft").read_through_attention


def test_a_checkpoint_saved_before_readout_existed_loads_as_the_mean_readout(tmp_path):
    from pipeline.head import checkpoint as ck

    head = HeadConfig(cell="convlstm", attention="soft", channels=8, readout="mean", appearance="none")
    model = build_head(head, 6, 4).eval()
    old = ck.Checkpoint(model.state_dict(), head, ["a", "b", "c", "d"], [4, 6, 7, 7], {"weights": "random:0"},
                        {}, {"epoch": 1})
    path = ck.save(tmp_path / "old.pt", old)
    payload = torch.load(path, weights_only=True)
    del payload["head"]["readout"]  # as every checkpoint written before the key existed
    torch.save(payload, path)
    loaded = ck.load(path)
    assert loaded.head.readout == "mean"
    x = torch.randn(2, 4, 6, 7, 7)
    assert torch.equal(loaded.build()(x).logits, model(x).logits)


# --- motion-guided attention (head.motion) ---------------------------------------------------------------

REFERENCE = Path(__file__).parent / "data" / "head_before_motion.pt"


def assert_matches_stored(actual: torch.Tensor, stored: torch.Tensor) -> None:
    """A reference stored on one machine, compared on another: float32 kernels differ in their last bits by
    CPU (oneDNN picks AVX2, AVX-512 or AVX-512 BF16 paths, summing in another order), so a stored output is
    compared within a tolerance a few hundred times float32's rounding; exact equality is kept for two paths
    computed on one machine (the tests above)."""
    torch.testing.assert_close(actual, stored, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", ["convlstm", "lstm"])
def test_motion_none_is_the_head_before_motion_existed_bit_for_bit(cell):
    """tests/data/head_before_motion.pt: weights, input and outputs saved by the code before head.motion
    (commit 1c5220f), eval and train mode (per-clip dropout seeds 5, 6)."""
    ref = torch.load(REFERENCE, weights_only=True)[cell]
    head = build_head(HeadConfig(appearance="none", cell=cell, channels=8, motion="none"), 16, 3)
    head.load_state_dict(ref["state_dict"])  # strict: no parameter added or renamed
    head.eval()
    with torch.no_grad():
        out = head(ref["x"])
    assert_matches_stored(out.logits, ref["logits"])
    assert_matches_stored(out.attention, ref["attention"])
    head.train()
    assert_matches_stored(head(ref["x"], torch.tensor([5, 6])).logits.detach(), ref["train_logits"])


def moving_patch(t: int = 6, c: int = 4, size: int = 7) -> torch.Tensor:
    """(1, T, C, h, w) features: a static textured background, a bright patch moving one cell right a frame."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, c, size, size, generator=g).repeat(1, t, 1, 1, 1)
    for k in range(t):
        x[0, k, :, 3, k] += 5.0
    return x


def test_the_motion_map_sits_where_the_features_change_and_ignores_global_change():
    x = moving_patch()
    m = motion_map(x)  # (1, T, h, w)
    assert m.shape == (1, 6, 7, 7)
    assert torch.allclose(m.sum(dim=(2, 3)), torch.ones(1, 6))
    for k in range(1, 6):  # the patch left cell k-1 and entered cell k: both changed, nothing else did
        top = set(m[0, k].flatten().topk(2).indices.tolist())
        assert top == {3 * 7 + k - 1, 3 * 7 + k}
    assert torch.equal(m[0, 0], m[0, 1])  # the first frame has no past: it takes the second's map
    # the whole picture changing alike (a camera gain, a cut) leaves nothing above the median: uniform
    flicker = torch.rand(1, 1, 4, 7, 7).repeat(1, 4, 1, 1, 1) * torch.arange(1.0, 5.0).view(1, 4, 1, 1, 1)
    assert torch.allclose(motion_map(flicker[..., :1, :1].expand(1, 4, 4, 7, 7).contiguous()),
                          torch.full((1, 4, 7, 7), 1 / 49))
    assert torch.allclose(motion_map(x[:, :1]), torch.full((1, 1, 7, 7), 1 / 49))  # one frame: nothing moves


def test_the_motion_prior_adds_beta_log_m_to_the_attention_logits():
    """With beta = 0 the prior head is the plain head; with beta = 1 and w_z = 0 its maps are M~_t itself."""
    x = moving_patch()
    plain = build_head(HeadConfig(appearance="none", channels=8, motion="none"), 4, 3).eval()
    guided = build_head(HeadConfig(appearance="none", channels=8, motion="prior"), 4, 3).eval()
    assert set(dict(guided.named_parameters())) - set(dict(plain.named_parameters())) == {"beta"}
    assert float(guided.beta.detach()) == 1.0
    with torch.no_grad():
        assert torch.allclose(guided(x).attention, motion_map(x), atol=1e-6)  # w_z starts at zero
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        guided.load_state_dict({**plain.state_dict(), "beta": torch.zeros(())})
        assert torch.allclose(guided(x).logits, plain(x).logits, atol=1e-6)


def test_attention_none_stays_uniform_with_the_motion_prior_and_the_label_says_which_head():
    x = moving_patch()
    head = build_head(HeadConfig(appearance="none", channels=8, attention="none", motion="prior"), 4, 3).eval()
    assert not head.uses_motion and not hasattr(head, "beta")
    assert torch.equal(head(x).attention, torch.full((1, 6, 7, 7), 1 / 49))
    assert HeadConfig(motion="prior").label == "convlstm/soft/attention/motion-prior"
    assert HeadConfig(motion="none").label == "convlstm/soft/attention"
    assert HeadConfig(attention="none", motion="prior").label == "convlstm/none/attention"


def test_beta_learns_at_its_own_rate_without_weight_decay():
    from pipeline.config import TrainConfig
    from pipeline.head.fit import make_optimiser

    head = build_head(HeadConfig(appearance="none", channels=8, motion="prior"), 4, 3)
    groups = make_optimiser(head, TrainConfig(lr=1e-3, motion_lr=0.05)).param_groups
    (beta_group,) = [g for g in groups if any(p is head.beta for p in g["params"])]
    assert beta_group["lr"] == 0.05 and beta_group["weight_decay"] == 0.0 and len(beta_group["params"]) == 1
    assert sum(len(g["params"]) for g in groups) == len(list(head.parameters()))


def test_a_checkpoint_from_before_head_motion_loads_as_the_head_it_was_trained_as(tmp_path):
    """A checkpoint written before the key existed has no `motion` (nor, older still, `readout`): it loads
    as the head it was trained as, not as today's default, and gives the outputs it gave then."""
    import dataclasses

    from pipeline.head import checkpoint as ck

    ref = torch.load(REFERENCE, weights_only=True)["convlstm"]
    head = {k: v for k, v in dataclasses.asdict(HeadConfig(channels=8, appearance="none")).items() if k != "motion"}
    payload = {"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION, "state_dict": ref["state_dict"],
               "head": head, "classes": ["a", "b", "c"], "feature_shape": [4, 16, 7, 7], "extraction": {}}
    torch.save(payload, tmp_path / "old.pt")

    loaded = ck.load(tmp_path / "old.pt")

    assert loaded.head.motion == "none" and HeadConfig().motion == "input"
    with torch.no_grad():
        assert_matches_stored(loaded.build()(ref["x"]).logits, ref["logits"])


def test_motion_input_gives_p_t_the_cells_own_motion_energy_as_one_more_channel():
    """head.motion: input = the prior + log(1 + D_t) appended to P_t: the cell, the state and the attention's
    input term take d + 1 channels; the same clip with more motion gives other logits."""
    from pipeline.features.motion import motion_energy

    d = 8
    prior = build_head(HeadConfig(appearance="none", channels=d, motion="prior"), 4, 3)
    guided = build_head(HeadConfig(appearance="none", channels=d, motion="input"), 4, 3).eval()
    extra = count_parameters(guided) - count_parameters(prior)
    k = HeadConfig().kernel
    assert extra == d + 2 * d * k * k + 4 * d * k * k  # W_xa, the state init and the cell: one more input channel
    x = moving_patch()
    assert torch.allclose(guided(x).attention, motion_map(x), atol=1e-6)  # w_z starts at zero: the prior alone
    faster = x.clone()
    faster[0, :, :, 3] *= 2.0  # the same place moves, twice as much
    assert torch.equal(motion_map(x).argmax(), motion_map(faster).argmax())
    assert not torch.allclose(motion_energy(x), motion_energy(faster))
    with torch.no_grad():
        assert not torch.allclose(guided(x).logits, guided(faster).logits)


def test_the_deletion_test_keeps_the_unmodified_map_and_deletes_the_energy_with_the_cells():
    from pipeline.features.motion import clip_motion

    motion = clip_motion(moving_patch())
    keep = torch.ones(1, 6, 7, 7)
    keep[:, :, 3, :] = 0.0  # the patch's row deleted in every frame
    kept = motion.kept(keep)
    assert torch.equal(kept.map, motion.map)
    assert torch.equal(kept.energy[:, :, 3], torch.zeros(1, 6, 7))
    assert torch.equal(kept.energy[:, :, 2], motion.energy[:, :, 2])
