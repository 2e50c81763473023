"""Attention measured two ways (localisation beside a centre prior, deletion beside random deletion), with
bootstrap intervals, and drawn on one honest scale."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.report import attention_quality as aq
from pipeline.report import bootstrap, faithfulness, overlay


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

    curved = faithfulness.deletion_test(run, attention, labels, draws=5, seed=0)  # the default: the whole curve
    assert curved["curve"]["k"] == [1, 2, 3, 5, 8] and set(curved["k"]) == {"1", "3", "5"}
    for k, row in curved["k"].items():  # the table's rows: as before, and the curve's points at those k
        assert set(row) == {"top", "random", "probability_drop_vs_random"}
        assert set(row["top"]) == {"video_accuracy", "true_probability"}
        assert set(row["random"]) == {"video_accuracy", "video_accuracy_std", "true_probability",
                                      "true_probability_std"}
        i = curved["curve"]["k"].index(int(k))
        assert row["top"]["true_probability"] == curved["curve"]["top_probability"][i]
        assert row["random"]["true_probability"] == curved["curve"]["random_probability"][i]
    json.dumps(curved, allow_nan=False)


@pytest.mark.parametrize("side, last", [(7, 25), (14, 98), (4, 8), (3, 5)])
def test_the_curve_runs_from_one_cell_to_half_the_grid_and_keeps_the_table_k(side, last):
    ks = faithfulness.curve_ks(side * side)
    assert ks[0] == 1 and ks[-1] == last and last >= side * side / 2 and last < side * side
    assert list(ks) == sorted(set(ks)) and set(faithfulness.K) <= set(ks)
    assert all(b <= 2 * a for a, b in zip(ks, ks[1:]))  # no stretch of the curve left without a point
    assert faithfulness.passes(side * side, 20) == len(ks) * 21
    assert faithfulness.curve_ks(49) == (1, 2, 3, 5, 9, 15, 25)


def test_the_area_between_the_curves_is_the_trapezoid_mean_gap_over_the_fraction_deleted():
    """A fake head losing 0.15 of the true class per deleted attended cell (the frame's 3 most attended) and
    0.01 per other deleted cell: the curve, the area and the drop ratios recomputed by hand."""
    n, t = 2, 3
    attention = np.random.default_rng(2).random((n, t, 4, 4))
    attended = faithfulness.top_cells(attention, 3) == 0
    labels = np.zeros(n, np.int64)
    random_runs: dict[int, list[float]] = {}  # cells deleted per frame -> true-class p of each random deletion

    def run(keep):
        p = 0.9
        if keep is not None:
            gone = keep == 0
            p -= 0.15 * (gone & attended).sum(axis=(2, 3)).mean() + 0.01 * (gone & ~attended).sum(axis=(2, 3)).mean()
            k = int(gone[0, 0].sum())
            if not np.array_equal(keep, faithfulness.top_cells(attention, k)):
                random_runs.setdefault(k, []).append(p)
        return np.tile([p, 1 - p], (n, 1))

    calls = []
    report = faithfulness.deletion_test(run, attention, labels, draws=4, seed=3, on_pass=lambda: calls.append(1))
    assert len(calls) == faithfulness.passes(16, 4)  # evaluate's progress bar counts these
    curve = report["curve"]
    ks = [1, 2, 3, 5, 8]
    top = [0.75, 0.6, 0.45, 0.43, 0.40]  # min(k, 3) attended cells at 0.15, the rest at 0.01
    random = [np.mean(random_runs[k]) for k in ks]
    assert curve["k"] == ks and curve["cells"] == 16 and all(len(random_runs[k]) == 4 for k in ks)
    assert curve["top_probability"] == pytest.approx(top) and curve["random_probability"] == pytest.approx(random)
    assert curve["top_accuracy"] == [1.0, 1.0, 0.0, 0.0, 0.0]  # the true class wins while p > 0.5

    def mean(values):  # over the fraction deleted, 1/16 to 8/16, by the trapezoid rule: the same over k = 1..8
        return sum((values[i] + values[i + 1]) / 2 * (ks[i + 1] - ks[i]) / 16 for i in range(4)) / ((8 - 1) / 16)

    gap = [r - s for r, s in zip(random, top)]
    assert report["area_between"]["probability"] == pytest.approx(mean(gap), abs=1e-6)
    accuracy_gap = [float(np.mean([p > 0.5 for p in random_runs[k]])) - a for k, a in zip(ks, curve["top_accuracy"])]
    assert report["area_between"]["accuracy"] == pytest.approx(mean(accuracy_gap), abs=1e-6)
    assert report["drop_ratio"]["5"] == pytest.approx((0.9 - 0.43) / (0.9 - random[3]), abs=1e-5)
    assert report["drop_ratio"]["curve"] == pytest.approx((0.9 - mean(top)) / (0.9 - mean(random)), abs=1e-5)
    assert curve["probability_drop_ratio"][ks.index(5)] == report["drop_ratio"]["5"]
    assert faithfulness.curve_mean([1, 3, 5], [0.0, 2.0, 4.0]) == pytest.approx(2.0)  # a line: its midpoint
    assert faithfulness.curve_mean([5], [0.3]) is None and faithfulness.drop_ratio(0.9, 0.5, 0.95) is None
    assert faithfulness.drop_ratio(0.9, 0.5, 0.899, error=0.001) is None  # a random drop within the noise
    assert faithfulness.drop_ratio(0.9, 0.5, 0.899, error=0.0001) == pytest.approx(400.0)


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
                          EvaluateConfig(deletion_draws=3, device="cpu"), plots_dir=tmp_path / "pe", progress=False)
    att = report["attention"]
    assert att["clips_with_boxes"] == report["clips"]
    for key in ("mass_in_box_centre", "mass_ratio_centre", "pointing_centre", "mass_ratio_ci", "pointing_ci"):
        assert key in att
    assert set(att["per_class"]) <= {"move_left", "move_right", "move_up"} and att["per_class"]
    assert report["deletion"]["random_draws"] == 3 and set(report["deletion"]["k"]) == {"1", "3", "5"}
    curve = json.loads((tmp_path / "m" / "eval.json").read_text())["deletion"]["curve"]
    assert curve["k"] == [1, 2, 3, 5, 8] and curve["cells"] == 16  # 4x4 grid: to half the cells
    assert all(len(curve[key]) == 5 for key in curve if key not in ("k", "cells"))
    assert report["deletion"]["area_between"]["probability"] is not None and "curve" in report["deletion"]["drop_ratio"]
    assert report["video_accuracy_ci"] is None or len(report["video_accuracy_ci"]) == 2
    with np.load(tmp_path / "m" / evaluate.MAPS_FILE, allow_pickle=False) as maps:
        keys = [line.split(",")[0] for line in (tmp_path / "m" / "predictions.csv").read_text().splitlines()[1:]]
        assert list(maps["video"]) == keys
        assert maps["attention"].shape == (len(keys), 6, 4, 4) and maps["frame_index"].shape == (len(keys), 6)
        np.testing.assert_allclose(maps["attention"].sum(axis=(2, 3)), 1.0, atol=1e-5)
    none = evaluate.run(tiny_project["cache"], tiny_project["splits"], model, tmp_path / "n",
                        EvaluateConfig(deletion_draws=0, device="cpu"), plots_dir=tmp_path / "pn", progress=False)
    assert none["deletion"] is None
