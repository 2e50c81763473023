"""Attention measured two ways (localisation beside a centre prior, deletion beside random deletion), with
bootstrap intervals, and drawn on one honest scale."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.report import attention_quality as aq
from pipeline.report import bootstrap
from pipeline.report import faithfulness
from pipeline.report import overlay


def test_the_centre_prior_is_a_gaussian_at_the_centre_with_sigma_a_quarter_of_the_short_side():
    prior = aq.centre_prior(120.0, 160.0, (7, 7))
    assert prior.shape == (7, 7) and prior.sum() == pytest.approx(1.0)
    assert np.unravel_index(prior.argmax(), prior.shape) == (3, 3)
    sigma = 120.0 / 4
    dy = 120.0 / 7  # one cell up from the centre
    assert prior[2, 3] / prior[3, 3] == pytest.approx(np.exp(-dy ** 2 / (2 * sigma ** 2)))


def test_a_box_at_the_centre_is_found_by_the_centre_prior_and_one_in_a_corner_is_not():
    attention = np.full((1, 7, 7), 1 / 49)
    centre = aq.score_clip(attention, np.array([[60.0, 40.0, 100.0, 80.0]]), 120.0, 160.0)
    corner = aq.score_clip(attention, np.array([[0.0, 0.0, 30.0, 20.0]]), 120.0, 160.0)
    assert centre.pointing_centre[0] == 1.0 and corner.pointing_centre[0] == 0.0
    assert centre.mass_centre[0] > 2 * centre.mass_uniform[0]
    assert corner.mass_centre[0] < corner.mass_uniform[0]


def test_top_cells_deletes_exactly_the_k_most_attended_cells_of_every_frame():
    rng = np.random.default_rng(0)
    attention = rng.random((3, 4, 5, 5))
    keep = faithfulness.top_cells(attention, 3)
    assert ((1 - keep).reshape(3, 4, -1).sum(axis=2) == 3).all()
    deleted_min = np.where(keep == 0, attention, np.inf).reshape(3, 4, -1).min(axis=2)
    kept_max = np.where(keep == 1, attention, -np.inf).reshape(3, 4, -1).max(axis=2)
    assert (deleted_min > kept_max).all()
    random = faithfulness.random_cells(attention.shape, 3, rng)
    assert ((1 - random).reshape(3, 4, -1).sum(axis=2) == 3).all()


def test_deletion_test_reports_top_k_beside_random_k():
    """A fake head whose true-class probability is the attention mass left: deleting the top cells costs more."""
    rng = np.random.default_rng(1)
    n, t = 6, 4
    attention = rng.dirichlet(np.full(16, 0.3), size=(n, t)).reshape(n, t, 4, 4)
    labels = np.arange(n) % 2

    def run(keep):
        left = np.ones(n) if keep is None else (attention * keep).sum(axis=(2, 3)).mean(axis=1)
        probs = np.zeros((n, 2))
        probs[np.arange(n), labels] = 0.5 + 0.5 * left
        probs[np.arange(n), 1 - labels] = 0.5 - 0.5 * left
        return probs

    report = faithfulness.deletion_test(run, attention, labels, draws=25, seed=0, ks=(1, 3, 5))
    assert report["unmodified"] == {"video_accuracy": 1.0, "true_probability": 1.0}
    assert report["random_draws"] == 25 and set(report["k"]) == {"1", "3", "5"}
    for row in report["k"].values():
        assert row["top"]["true_probability"] < row["random"]["true_probability"]
        assert row["probability_drop_vs_random"] > 0 and row["random"]["true_probability_std"] > 0
    json.dumps(report, allow_nan=False)  # goes into eval.json as it is


def test_bootstrap_interval_brackets_the_statistic_and_is_reproducible():
    values = np.r_[np.ones(48), np.zeros(16)]  # 75% right of 64 clips
    lo, hi = bootstrap.interval(values, np.mean)
    assert lo < 0.75 < hi and hi - lo == pytest.approx(0.21, abs=0.05)  # about +-1.96 sqrt(.75 .25 / 64)
    assert bootstrap.interval(values, np.mean) == [lo, hi]
    assert bootstrap.interval(values[:1], np.mean) is None


def test_the_colour_scale_is_fixed_a_flat_map_shows_the_uniform_colour_and_nothing_is_stretched():
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    flat = np.full((4, 4), 1 / 16)
    nearly_flat = flat * (1 + 0.05 * np.random.default_rng(0).standard_normal((4, 4)))
    nearly_flat /= nearly_flat.sum()
    sharp = np.full((4, 4), 0.2 / 15)
    sharp[1, 2] = 0.8
    out = overlay.blend(frames, np.stack([flat, nearly_flat, sharp]), alpha=1.0).astype(int)
    uniform_colour = overlay.jet(np.float32(overlay.UNIFORM_ON_SCALE)).astype(int)
    assert (np.abs(out[0] - uniform_colour) <= 1).all()
    assert np.abs(out[1] - uniform_colour).max() < 40  # min-max stretching made this span blue to red
    hot = out[2, 12, 20]  # inside cell (1, 2)
    assert hot[0] > 200 and hot[2] < 60  # 12.8x the uniform share: red
    again = overlay.blend(frames[:1], sharp[None], alpha=1.0)  # the same map alone: the same colours
    np.testing.assert_array_equal(again[0], out[2])


def test_boxes_are_outlined_on_the_overlay():
    images = np.zeros((2, 20, 30, 3), np.uint8)
    boxed = overlay.draw_boxes(images, np.array([[5.0, 4.0, 15.0, 12.0], [0.0, 0.0, 30.0, 20.0]]))
    assert (boxed[0, 4, 5:15] == overlay.BOX_COLOUR).all() and (boxed[0, 4:12, 14] == overlay.BOX_COLOUR).all()
    assert (boxed[0, 8, 8] == 0).all()  # inside stays as it was
    assert (boxed[1, 19, :] == overlay.BOX_COLOUR).all()  # a box to the frame edge is clipped to it
    assert (images == 0).all()  # a copy


def test_evaluate_writes_localisation_per_class_deletion_and_the_maps(tiny_project, tmp_path):
    from pipeline.config import EvaluateConfig, HeadConfig, TrainConfig
    from stages import evaluate, train

    model = tmp_path / "head.pt"
    train.run(tiny_project["cache"], tiny_project["splits"], model, HeadConfig(channels=8),
              TrainConfig(epochs=1, batch_size=4, device="cpu"), metrics_path=tmp_path / "train.json",
              plots_dir=tmp_path / "plots", progress=False)
    report = evaluate.run(tiny_project["cache"], tiny_project["splits"], model, tmp_path / "m",
                          EvaluateConfig(deletion_draws=3), plots_dir=tmp_path / "pe", device="cpu", progress=False)
    att = report["attention"]
    assert att["clips_with_boxes"] == report["clips"]
    for key in ("mass_in_box_centre", "mass_ratio_centre", "pointing_centre", "mass_ratio_ci", "pointing_ci"):
        assert key in att
    assert set(att["per_class"]) <= {"move_left", "move_right", "move_up"} and att["per_class"]
    assert report["deletion"]["random_draws"] == 3 and set(report["deletion"]["k"]) == {"1", "3", "5"}
    assert report["video_accuracy_ci"] is None or len(report["video_accuracy_ci"]) == 2
    with np.load(tmp_path / "m" / evaluate.MAPS_FILE, allow_pickle=False) as maps:
        keys = [line.split(",")[0] for line in (tmp_path / "m" / "predictions.csv").read_text().splitlines()[1:]]
        assert list(maps["video"]) == keys
        assert maps["attention"].shape == (len(keys), 6, 4, 4) and maps["frame_index"].shape == (len(keys), 6)
        np.testing.assert_allclose(maps["attention"].sum(axis=(2, 3)), 1.0, atol=1e-5)
    none = evaluate.run(tiny_project["cache"], tiny_project["splits"], model, tmp_path / "n",
                        EvaluateConfig(deletion_draws=0), plots_dir=tmp_path / "pn", device="cpu", progress=False)
    assert none["deletion"] is None
