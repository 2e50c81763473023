"""Small real datasets: several heads read as one, the appearance term, temporal jitter, the moving average of the
weights and the linear probe."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import HeadConfig, TrainConfig
from pipeline.head import checkpoint as ck
from pipeline.head.fit import jitter_frames
from pipeline.head.model import HeadEnsemble, build_head, head_loss, video_probabilities
from pipeline.report.probe import FALLBACK_C, linear_probe


def clips(b: int = 3, t: int = 6, c: int = 16, size: int = 5) -> torch.Tensor:
    return torch.randn(b, t, c, size, size, generator=torch.Generator().manual_seed(1)).abs()


# --- several heads, read as one ---------------------------------------------------------------------------


def test_an_ensemble_reads_as_the_mean_of_its_members_probabilities_and_maps():
    torch.manual_seed(0)
    head = build_head(HeadConfig(appearance="none", channels=8, heads=3), 16, 4).eval()
    x = clips()
    with torch.no_grad():
        out = head(x)
        members = [m(x) for m in head.members]
    assert isinstance(head, HeadEnsemble) and len(head.members) == 3
    mean = torch.stack([video_probabilities(o.logits) for o in members]).mean(dim=0)
    torch.testing.assert_close(video_probabilities(out.logits), mean)
    torch.testing.assert_close(out.attention, torch.stack([o.attention for o in members]).mean(dim=0))
    torch.testing.assert_close(out.attention.sum(dim=(2, 3)), torch.ones(3, 6))
    assert not torch.equal(members[0].logits, members[1].logits)  # drawn from other initial weights


def test_the_first_member_is_the_single_head_of_the_same_seed():
    torch.manual_seed(5)
    one = build_head(HeadConfig(appearance="none", channels=8), 16, 4)
    torch.manual_seed(5)
    three = build_head(HeadConfig(appearance="none", channels=8, heads=3), 16, 4)
    for (name, a), (_, b) in zip(one.state_dict().items(), three.members[0].state_dict().items()):
        assert torch.equal(a, b), name


def test_each_member_learns_from_its_own_loss_with_its_own_dropout_masks():
    torch.manual_seed(0)
    head = build_head(HeadConfig(appearance="none", channels=8, heads=2), 16, 4).train()
    x, labels, noise = clips(), torch.tensor([0, 1, 2]), torch.tensor([11, 12, 13])
    out = head(x, noise)
    assert out.members.shape == (2, 3, 6, 4)
    loss, _ = head_loss(out, labels, 0.0)
    each = [torch.nn.functional.cross_entropy(m.reshape(-1, 4), labels.repeat_interleave(6)) for m in out.members]
    torch.testing.assert_close(loss, torch.stack(each).mean())
    same_masks = [m(x, noise).logits for m in head.members]  # member 1 with member 0's masks differs from its own
    assert not torch.equal(same_masks[1], out.members[1])
    torch.testing.assert_close(same_masks[0], out.members[0])


def test_an_ensemble_checkpoint_holds_every_member_and_rebuilds_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    cfg = HeadConfig(channels=8, heads=3, appearance="attended")
    head = build_head(cfg, 16, 4).eval()
    ck.save(tmp_path / "h.pt", ck.Checkpoint(head.state_dict(), cfg, ["a", "b", "c", "d"], [6, 16, 5, 5], {}))
    loaded = ck.load(tmp_path / "h.pt")
    assert loaded.head == cfg and any(k.startswith("members.2.") for k in loaded.state_dict)
    x = clips()
    with torch.no_grad():
        assert torch.equal(loaded.build()(x).logits, head(x).logits)


def test_a_checkpoint_from_before_these_keys_loads_as_one_head_without_appearance(tmp_path):
    import dataclasses

    head = build_head(HeadConfig(appearance="none", channels=8), 16, 4)
    old = {k: v for k, v in dataclasses.asdict(HeadConfig(channels=8)).items() if k not in ("heads", "appearance")}
    payload = {"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION, "state_dict": head.state_dict(),
               "head": old, "classes": ["a", "b", "c", "d"], "feature_shape": [6, 16, 5, 5], "extraction": {}}
    torch.save(payload, tmp_path / "old.pt")
    loaded = ck.load(tmp_path / "old.pt")
    assert (loaded.head.heads, loaded.head.appearance) == (1, "none")
    assert not isinstance(loaded.build(), HeadEnsemble)


# --- the appearance term ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["attended", "mean"])
def test_the_appearance_term_starts_at_zero_so_the_head_starts_as_it_was(kind):
    torch.manual_seed(3)
    plain = build_head(HeadConfig(appearance="none", channels=8), 16, 4).eval()
    torch.manual_seed(3)
    with_term = build_head(HeadConfig(channels=8, appearance=kind), 16, 4).eval()
    x = clips()
    with torch.no_grad():
        assert torch.equal(plain(x).logits, with_term(x).logits)
        assert torch.equal(plain(x).attention, with_term(x).attention)


def test_the_attended_appearance_is_the_features_weighted_by_the_map():
    """y_t gains W_g LN(sum_i A_ti X_ti): with a one-hot map it is the attended cell's features, nothing else."""
    torch.manual_seed(0)
    head = build_head(HeadConfig(channels=8, appearance="attended"), 16, 4).eval()
    torch.nn.init.normal_(head.appearance.w_g.weight)
    x = clips(b=1)  # (1, T, C, h, w)
    maps = torch.zeros(1, 6, 25)
    maps[:, :, 7] = 1.0  # every frame looks at cell 7 (row 1, column 2)
    term = head.appearance(x.permute(0, 1, 3, 4, 2), maps, None)
    expected = head.appearance.w_g(head.appearance.norm(x[:, :, :, 1, 2]))
    torch.testing.assert_close(term, expected)


def test_with_the_attended_appearance_deleting_unattended_cells_changes_nothing_it_reads():
    """Faithfulness by construction: the term reads only where A_t is; cells with no mass do not reach y_t."""
    torch.manual_seed(0)
    head = build_head(HeadConfig(channels=8, appearance="attended"), 16, 4).eval()
    torch.nn.init.normal_(head.appearance.w_g.weight)
    x = clips(b=1)
    maps = torch.zeros(1, 6, 25)
    maps[:, :, 7] = 1.0
    emptied = x.clone()
    emptied[:, :, :, 0, 0] = 0.0  # a cell the map does not look at
    hwc = [v.permute(0, 1, 3, 4, 2) for v in (x, emptied)]
    assert torch.equal(head.appearance(hwc[0], maps, None), head.appearance(hwc[1], maps, None))


def test_auto_appearance_is_attended_below_the_threshold_and_none_from_it():
    from pipeline.config import APPEARANCE_AUTO_BELOW

    auto = HeadConfig()
    assert auto.appearance == "auto"
    assert auto.for_train_split(15).appearance == "attended"
    assert auto.for_train_split(APPEARANCE_AUTO_BELOW - 0.5).appearance == "attended"
    assert auto.for_train_split(APPEARANCE_AUTO_BELOW).appearance == "none"
    for chosen in ("none", "attended", "mean"):  # a value the user set is kept whatever the split
        assert HeadConfig(appearance=chosen).for_train_split(15).appearance == chosen
        assert HeadConfig(appearance=chosen).for_train_split(500).appearance == chosen
    with pytest.raises(ValueError, match="resolved from the train split"):
        build_head(auto, 16, 4)


def test_train_resolves_auto_from_its_split_says_so_and_the_checkpoint_holds_the_head_it_built(tiny_project, tmp_path):
    """Typed as a user would: the code default (auto) on the tiny project's 2 train clips a class builds the
    attended head and says why; `--appearance none` and a params file's `none` are kept."""
    from tests.cli_helpers import run_in_process

    args = [str(tiny_project["cache"]), str(tiny_project["splits"])]
    auto = run_in_process("train", *args, str(tmp_path / "auto" / "h.pt"), "--channels", "4", "--epochs", "1",
                          "--device", "cpu")
    assert auto.exit_code == 0, auto.output
    assert "head.appearance auto: attended (the train split has fewer than 50 clips a class)" in auto.output
    assert ck.load(tmp_path / "auto" / "h.pt").head.appearance == "attended"
    params = tmp_path / "params.yaml"
    params.write_text("head:\n  appearance: none\n  channels: 4\ntrain:\n  epochs: 1\n  lr: 3e-4\n")
    from typer.testing import CliRunner

    from pipeline.__main__ import app

    flag = run_in_process("train", *args, str(tmp_path / "flag" / "h.pt"), "--device", "cpu", "--appearance", "none",
                          "--channels", "4", "--epochs", "1")
    written = CliRunner().invoke(app, ["train", *args, str(tmp_path / "params" / "h.pt"), "--device", "cpu",
                                       "--params", str(params)], env={"COLUMNS": "250"})
    for name, kept in (("flag", flag), ("params", written)):
        assert kept.exit_code == 0, kept.output
        assert "head.appearance auto" not in kept.output
        assert ck.load(tmp_path / name / "h.pt").head.appearance == "none"


def test_train_on_a_split_at_the_threshold_resolves_auto_to_none_and_says_so(tiny_project, tmp_path, monkeypatch):
    """The other side of the threshold, on the tiny project's 2 train clips a class with the threshold at 2."""
    from pipeline import config
    from stages import train
    from tests.cli_helpers import run_in_process

    monkeypatch.setattr(config, "APPEARANCE_AUTO_BELOW", 2)
    monkeypatch.setattr(train, "APPEARANCE_AUTO_BELOW", 2)
    result = run_in_process("train", str(tiny_project["cache"]), str(tiny_project["splits"]), str(tmp_path / "h.pt"),
                            "--channels", "4", "--epochs", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "head.appearance auto: none (the train split has at least 2 clips a class)" in result.output
    assert ck.load(tmp_path / "h.pt").head.label == "convlstm/soft/attention/motion-input"


# --- temporal jitter ---------------------------------------------------------------------------------------


def test_jitter_gives_each_clip_a_window_of_consecutive_frames_drawn_from_its_seed():
    x = torch.arange(2 * 10, dtype=torch.float32).view(2, 10, 1, 1, 1)  # frame numbers as features
    noise = torch.tensor([3, 8])
    out = jitter_frames(x, 0.2, noise)  # windows of 8 of the 10 frames: offsets 3 % 3 = 0 and 8 % 3 = 2
    assert out.shape == (2, 8, 1, 1, 1)
    assert out[0].flatten().tolist() == list(range(0, 8))
    assert out[1].flatten().tolist() == list(range(12, 20))
    assert torch.equal(jitter_frames(x, 0.2, noise), out)  # the same seeds, the same windows
    assert jitter_frames(x, 0.0, noise) is x  # no jitter: every frame


def test_training_with_jitter_is_reproducible_and_differs_from_training_without(tiny_project, tmp_path):
    from stages import train

    def trained(name: str, jitter: float) -> dict:
        out = tmp_path / name
        train.run(tiny_project["cache"], tiny_project["splits"], out / "h.pt", HeadConfig(channels=4, heads=2),
                  TrainConfig(epochs=2, batch_size=4, device="cpu", jitter=jitter), progress=False)
        return torch.load(out / "h.pt", weights_only=True)["state_dict"]

    a, b, plain = trained("a", 0.3), trained("b", 0.3), trained("c", 0.0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], plain[k]) for k in a)


# --- the moving average of the weights ----------------------------------------------------------------------


def test_the_weight_average_follows_the_steps_with_its_warm_up_and_is_applied_only_inside_the_block():
    from pipeline.head.average import WeightAverage

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage.of(model, ema_epochs=2.0, train_clips=40, batch_size=8)  # 5 steps an epoch
    assert average.decay == pytest.approx(0.9)
    assert WeightAverage.of(model, 0.0, 40, 8) is None  # off
    expected = 0.0
    for step in range(1, 30):
        with torch.no_grad():
            model.weight.fill_(float(step))
        average.update(model)
        d = min(0.9, (1 + step) / (10 + step))  # warm-up: the first steps follow the weights closely
        expected = d * expected + (1 - d) * step
    assert average.shadow["weight"][0, 0].item() == pytest.approx(expected, rel=1e-5)
    with average.applied(model):
        assert model.weight[0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert model.weight[0, 0].item() == 29.0  # the live weights again after the block


def test_training_with_the_average_saves_it_and_a_resumed_run_equals_one_straight_through(tiny_project, tmp_path,
                                                                                        monkeypatch):
    from pipeline.head import fit as fitting
    from stages import train

    head, cfg = HeadConfig(channels=4), TrainConfig(epochs=3, batch_size=4, device="cpu", ema_epochs=1.0)

    def trained(name: str, config: TrainConfig, resume: bool = False) -> dict:
        out = tmp_path / name / "h.pt"
        train.run(tiny_project["cache"], tiny_project["splits"], out, head, config, progress=False, resume=resume)
        return torch.load(out, weights_only=True)["state_dict"]

    straight, plain = trained("a", cfg), trained("plain", TrainConfig(epochs=3, batch_size=4, device="cpu"))
    assert any(not torch.equal(straight[k], plain[k]) for k in straight)  # the average is what is saved
    real_epoch = fitting.train_epoch

    def interrupted(model, clips, optimiser, config, device, epoch, on_batch=None, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(model, clips, optimiser, config, device, epoch, on_batch, **kwargs)

    monkeypatch.setattr(fitting, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trained("b", cfg)
    monkeypatch.setattr(fitting, "train_epoch", real_epoch)
    resumed = trained("b", cfg, resume=True)  # the average resumes with the weights
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# --- the linear probe ----------------------------------------------------------------------------------------


def separable(n: int, seed: int, shift: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 10))
    x[np.arange(n), y] += shift  # class k: feature k raised
    return x, y


def test_the_probe_separates_what_a_linear_map_separates_and_chooses_c_on_val():
    report = linear_probe(separable(60, 0), separable(30, 1), separable(30, 2))
    assert report["video_accuracy"] >= 0.95 and report["chosen_on"] == "val"
    assert report["C"] in [10.0 ** e for e in range(-4, 3)] and report["train_clips"] == 60


def test_without_val_clips_the_probe_takes_c_1_and_says_so():
    empty = (np.zeros((0, 10)), np.zeros(0, int))
    report = linear_probe(separable(60, 0), empty, separable(30, 2))
    assert report["C"] == FALLBACK_C and report["val_accuracy"] is None and "no val" in report["chosen_on"]


def test_evaluate_reports_the_probe_beside_the_head(tiny_project, tmp_path):
    from pipeline.config import EvaluateConfig
    from stages import evaluate, train

    train.run(tiny_project["cache"], tiny_project["splits"], tmp_path / "h.pt", HeadConfig(channels=4),
              TrainConfig(epochs=1, batch_size=4, device="cpu"), progress=False)
    report = evaluate.run(tiny_project["cache"], tiny_project["splits"], tmp_path / "h.pt", tmp_path / "eval",
                          EvaluateConfig(deletion_draws=0, device="cpu"), progress=False)
    probe = json.loads((tmp_path / "eval" / "eval.json").read_text())["baselines"]["linear_probe"]
    assert probe == report["baselines"]["linear_probe"]
    assert probe["train_clips"] == 6 and probe["features"] == 512 and 0.0 <= probe["video_accuracy"] <= 1.0


# --- an ensemble checkpoint downstream ---------------------------------------------------------------------


def test_an_ensemble_with_appearance_predicts_renders_and_watches_like_one_head(tiny_project, tmp_path):
    """predict, render and watch read whatever the checkpoint holds: here two heads with the appearance term,
    trained with jitter, typed as a user would (CLI, progress bar on)."""
    from tests.cli_helpers import run_in_process

    model = tmp_path / "m" / "head.pt"
    trained = run_in_process("train", str(tiny_project["cache"]), str(tiny_project["splits"]), str(model),
                             "--heads", "2", "--appearance", "attended", "--jitter", "0.3", "--channels", "4",
                             "--epochs", "2", "--device", "cpu")
    assert trained.exit_code == 0, trained.output
    assert ck.load(model).head.label == "convlstm/soft/attention/motion-input/appearance-attended x2"
    clip = sorted(tiny_project["videos"].glob("*/*.avi"))[0]
    predicted = run_in_process("predict", str(clip), "--model", str(model), "--device", "cpu")
    assert predicted.exit_code == 0 and "Traceback" not in predicted.output, predicted.output
    evaluated = run_in_process("evaluate", str(tiny_project["cache"]), str(tiny_project["splits"]), str(model),
                               str(tmp_path / "m"), "--device", "cpu")
    assert evaluated.exit_code == 0 and "linear probe" in evaluated.output, evaluated.output
    rendered = run_in_process("render", str(tiny_project["cache"]), str(model), str(tmp_path / "r"),
                              "--splits", str(tiny_project["splits"]), "--device", "cpu", "--per-class", "1")
    assert rendered.exit_code == 0 and (tmp_path / "r" / "index.html").exists(), rendered.output
    assert "linear probe" in (tmp_path / "r" / "index.html").read_text()
    watched = run_in_process("watch", str(clip), "--model", str(model), "--device", "cpu",
                             "--events", str(tmp_path / "events.jsonl"))
    assert watched.exit_code == 0 and "Traceback" not in watched.output, watched.output
