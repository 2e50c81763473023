"""Stage `evaluate` and the attention figures: values recomputed by hand, boxes found or given, refusals."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import EvaluateConfig, ExtractConfig, HeadConfig, TrainConfig
from pipeline.features.reader import open_cache
from pipeline.head import checkpoint as ck
from pipeline.head import infer as training
from pipeline.head.batches import open_split
from pipeline.report import attention_quality as aq
from pipeline.report import metrics
from stages import evaluate, extract, train
from tests.cli_helpers import assert_one_line_error, run_cli, run_in_process

EXTRACT = dict(frames=6, image_size=64, layer="conv5_3", batch_size=24, workers=2, timeout=30.0, device="cpu")
GRID = 4  # conv5_3 at 64x64: a 4x4 attention grid


def train_model(project: dict[str, Path], out: Path, head: HeadConfig, epochs: int) -> Path:
    model = out / "head.pt"
    train.run(project["cache"], project["splits"], model, head, TrainConfig(epochs=epochs, batch_size=4, device="cpu"),
              metrics_path=out / "train.json", plots_dir=out / "plots", progress=False)
    return model


def evaluate_in(project: dict[str, Path], model: Path, out: Path, cache: Path | None = None, split: str = "test",
                boxes: Path | None = None) -> dict:
    return evaluate.run(cache or project["cache"], project["splits"], model, out,
                        EvaluateConfig(split=split, device="cpu"), boxes=boxes, plots_dir=out / "plots", progress=False)


def infer_split(project: dict[str, Path], model: Path, split: str = "test") -> tuple[training.Outputs, list[str]]:
    import torch

    with open_cache(project["cache"]) as cache:
        clips = open_split(cache, project["splits"], split)
        return training.infer(ck.load(model).build(), clips, 2, torch.device("cpu")), clips.keys


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def model(tiny_project, tmp_path_factory) -> Path:
    return train_model(tiny_project, tmp_path_factory.mktemp("model"), HeadConfig(channels=8), epochs=2)


@pytest.fixture(scope="module")
def cli_eval(tiny_project, model, tmp_path_factory):
    """`python -m pipeline evaluate CACHE SPLITS MODEL OUT` in a real process; boxes found via the cache."""
    out = tmp_path_factory.mktemp("eval")
    result = run_cli("evaluate", str(tiny_project["cache"]), str(tiny_project["splits"]), str(model), str(out),
                     "--plots", str(out / "plots"), "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr
    return result, out


@pytest.fixture(scope="module")
def unboxed_cache(tiny_project, tmp_path_factory) -> Path:
    """The same videos, extracted the same way, from a dataset root without boxes.json."""
    root = tmp_path_factory.mktemp("unboxed")
    shutil.copytree(tiny_project["videos"], root / "videos", ignore=shutil.ignore_patterns("boxes.json"))
    cache = root / "features.h5"
    extract.run(root / "videos", cache, ExtractConfig(weights="random:0", **EXTRACT), progress=False)
    return cache


@pytest.fixture(scope="module")
def other_cache(tiny_project, tmp_path_factory) -> Path:
    """The same videos through a backbone with other (random:1) weights."""
    cache = tmp_path_factory.mktemp("other") / "features.h5"
    extract.run(tiny_project["videos"], cache, ExtractConfig(weights="random:1", **EXTRACT), progress=False)
    return cache


# --- the CLI's outputs ----------------------------------------------------------------------------------


def test_cli_writes_eval_json_predictions_and_confusion_that_agree(cli_eval, tiny_project, model):
    result, out = cli_eval
    report = json.loads((out / "eval.json").read_text())
    test_keys = (tiny_project["splits"] / "test.txt").read_text().split()
    classes = ["move_left", "move_right", "move_up"]
    assert len(test_keys) == 3 and (report["split"], report["clips"]) == ("test", 3)
    assert report["confusion"]["classes"] == classes
    assert report["chance"] == round(1 / 3, 6)
    assert report["top3_accuracy"] == 1.0  # 3 classes: the true one is always among the top 3
    assert report["entropy"]["uniform"] == round(math.log(GRID * GRID), 6)
    ckpt = ck.load(model)
    assert report["model"] == {"path": str(model), "head": "convlstm/soft/attention/motion-input/appearance-attended",
                               "epoch": ckpt.train["epoch"], "weights": ckpt.extraction["weights"]}

    predictions = read_csv(out / "predictions.csv")
    assert (out / "predictions.csv").read_text().splitlines()[0] == "video,true,predicted,probability"
    assert [row["video"] for row in predictions] == test_keys  # one row per test clip, in the split's order
    for row in predictions:
        assert row["true"] == row["video"].split("/")[0]
        assert row["predicted"] in classes
        assert 1 / 3 <= float(row["probability"]) <= 1.0  # the winner of 3 probabilities summing to 1

    confusion = read_csv(out / "plots" / "confusion.csv")
    assert {"actual", "predicted"} <= set(confusion[0])
    assert [(r["video"], r["actual"], r["predicted"]) for r in confusion] == \
        [(r["video"], r["true"], r["predicted"]) for r in predictions]

    matrix = np.array(report["confusion"]["matrix"])
    expected = np.zeros((3, 3), int)
    for row in confusion:
        expected[classes.index(row["actual"]), classes.index(row["predicted"])] += 1
    np.testing.assert_array_equal(matrix, expected)
    per_class_counts = [sum(k.split("/")[0] == c for k in test_keys) for c in classes]
    assert matrix.sum(axis=1).tolist() == per_class_counts == [1, 1, 1]
    for i, name in enumerate(classes):
        assert report["per_class"][name] == {"clips": per_class_counts[i],
                                             "accuracy": round(matrix[i, i] / per_class_counts[i], 6)}
    right = sum(r["true"] == r["predicted"] for r in predictions)
    assert report["video_accuracy"] == round(right / 3, 6) == round(np.trace(matrix) / 3, 6)

    assert report["attention"]["clips_with_boxes"] == 3
    assert Path(report["attention"]["boxes"]).resolve() == tiny_project["videos"].resolve() / "boxes.json"
    assert "video accuracy" in result.stdout and "attention mass in box" in result.stdout
    assert "pointing accuracy" in result.stdout and "Traceback" not in result.stderr
    assert report["deletion"]["curve"]["k"] == [1, 2, 3, 5, 8] and "deletion curve" in result.stdout


def test_video_prediction_is_the_mean_of_the_per_frame_softmax(cli_eval, tiny_project, model):
    import torch

    _, out = cli_eval
    report = json.loads((out / "eval.json").read_text())
    outputs, keys = infer_split(tiny_project, model)
    probs = torch.softmax(torch.from_numpy(outputs.logits).double(), dim=-1).mean(dim=1).numpy()  # (N, K)
    predicted = probs.argmax(1)
    classes = ck.load(model).classes
    rows = read_csv(out / "predictions.csv")
    assert [r["video"] for r in rows] == keys
    assert [r["predicted"] for r in rows] == [classes[i] for i in predicted]
    np.testing.assert_allclose([float(r["probability"]) for r in rows], probs.max(1), atol=1e-6)
    assert report["video_accuracy"] == round(float((predicted == outputs.labels).mean()), 6)
    assert report["frame_accuracy"] == round(float((outputs.logits.argmax(2) == outputs.labels[:, None]).mean()), 6)
    entropy = -(outputs.attention * np.log(outputs.attention)).sum(axis=(2, 3)).mean()
    assert report["entropy"]["mean"] == pytest.approx(entropy, abs=2e-6)


def test_accuracy_report_votes_with_mean_softmax_not_mean_logits_or_frame_majority():
    """Clip A: mean logits say 1, frames and mean softmax say 0. Clip B: frames say 0, mean softmax says 1."""
    logits = np.array([[[0, 10], [2, 0], [2, 0]],  # softmax means (0.587, 0.413)
                       [[0, 10], [1, 0], [1, 0]]], np.float32)  # softmax means (0.487, 0.513)
    outputs = training.Outputs(logits, np.full((2, 3, 2, 2), 0.25, np.float32), np.array([0, 1]))
    report = metrics.accuracy_report(outputs, ["a", "b"])
    assert report["video_accuracy"] == 1.0  # mean logits or majority vote would give 0.5
    assert report["frame_accuracy"] == 0.5  # A: 2 of 3 frames right, B: 1 of 3
    assert report["top2_accuracy"] == 1.0 and report["chance"] == 0.5
    assert report["confusion"]["matrix"] == [[1, 0], [0, 1]]
    assert report["entropy"] == {"mean": round(math.log(4), 6), "uniform": round(math.log(4), 6), "motion": None}
    peaked = np.zeros((2, 3, 2, 2), np.float32)
    peaked[..., 0, 0] = 1.0  # motion maps given: their entropy is reported beside the attention's
    assert metrics.accuracy_report(outputs, ["a", "b"], peaked)["entropy"]["motion"] == 0.0
    text = metrics.predictions_csv(["a/1", "b/2"], outputs, ["a", "b"])
    p_a = (1 / (1 + math.exp(10)) + 2 * math.exp(2) / (math.exp(2) + 1)) / 3  # mean P(a) over A's frames
    p_b = (1 / (1 + math.exp(-10)) + 2 / (1 + math.exp(1))) / 3  # mean P(b) over B's frames
    assert text.splitlines() == ["video,true,predicted,probability", f"a/1,a,a,{p_a:.6f}", f"b/2,b,b,{p_b:.6f}"]


@pytest.mark.slow  # fast form: tests/test_train.py reproduces the recorded val accuracy from the model
def test_the_val_split_reproduces_the_val_accuracy_train_recorded(tiny_project, model, tmp_path):
    report = evaluate_in(tiny_project, model, tmp_path, split="val")
    ckpt = ck.load(model)
    assert report["split"] == "val" and report["clips"] == ckpt.train["val_clips"] == 3
    assert report["video_accuracy"] == round(ckpt.train["val_accuracy"], 6)
    rows = read_csv(tmp_path / "predictions.csv")
    assert [r["video"] for r in rows] == (tiny_project["splits"] / "val.txt").read_text().split()


# --- attention quality by hand --------------------------------------------------------------------------

# A 2x2 grid over a 100 x 200 (H x W) frame: cells are 50 tall, 100 wide; centres at y 25, 75 and x 50, 150.
H, W = 100.0, 200.0
BOX = np.array([[0.0, 0.0, 150.0, 25.0]])  # x0, y0, x1, y1: all of cell (0,0)'s width, half of (0,1)'s; y: half a row


def test_box_cover_is_the_fraction_of_each_cell_inside_the_box():
    cover = aq.box_cover(BOX, H, W, (2, 2))
    np.testing.assert_allclose(cover, [[[0.5, 0.25], [0.0, 0.0]]])
    # a box reaching past the frame covers only what is inside it
    np.testing.assert_allclose(aq.box_cover(np.array([[-50.0, 40.0, 400.0, 300.0]]), H, W, (2, 2)),
                               [[[0.2, 0.2], [1.0, 1.0]]])
    np.testing.assert_allclose(aq.box_cover(np.array([[0.0, 0.0, 200.0, 100.0]]), H, W, (2, 2)), 1.0)
    np.testing.assert_allclose(aq.box_cover(np.array([[300.0, 0.0, 400.0, 100.0]]), H, W, (2, 2)), 0.0)


def test_centres_in_box_includes_the_edge_and_excludes_the_rest():
    inside = aq.centres_in_box(BOX, H, W, (2, 2))
    assert inside.tolist() == [[[True, True], [False, False]]]  # y centre 25 lies on the box's lower edge
    assert aq.centres_in_box(np.array([[60.0, 30.0, 140.0, 70.0]]), H, W, (2, 2)).tolist() == \
        [[[False, False], [False, False]]]  # a box between the centres holds none



def test_boxes_at_takes_the_cached_frames_and_the_last_box_past_the_end():
    boxes = np.arange(12, dtype=np.float32).reshape(3, 4)  # boxes of frames 0, 1, 2
    assert aq.boxes_at(boxes, np.array([2, 0, 5])).tolist() == [boxes[2].tolist(), boxes[0].tolist(),
                                                                 boxes[2].tolist()]

@pytest.mark.parametrize("cell, mass, pointing", [((0, 0), 0.5, 1.0), ((0, 1), 0.25, 1.0), ((1, 1), 0.0, 0.0),
                                                  ((1, 0), 0.0, 0.0)])
def test_score_clip_of_one_hot_attention(cell, mass, pointing):
    attention = np.zeros((1, 2, 2))
    attention[0][cell] = 1.0
    score = aq.score_clip(attention, BOX, H, W)
    assert score.mass.tolist() == [mass] and score.pointing.tolist() == [pointing]
    assert score.mass_uniform.tolist() == [(150 * 25) / (100 * 200)]  # 0.1875: the box's share of the frame
    assert score.pointing_uniform.tolist() == [0.5]  # 2 of 4 centres inside


@pytest.mark.parametrize("grid, height, width", [((2, 2), 100.0, 200.0), ((7, 7), 240.0, 320.0),
                                                  ((4, 4), 48.0, 64.0), ((3, 5), 37.0, 91.0)])
def test_uniform_attention_mass_is_exactly_the_box_share_of_the_frame(grid, height, width):
    rng = np.random.default_rng(7)
    x = np.sort(rng.uniform(-0.2 * width, 1.2 * width, (9, 2)), axis=1)
    y = np.sort(rng.uniform(-0.2 * height, 1.2 * height, (9, 2)), axis=1)
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    area = (np.clip(x[:, 1], 0, width) - np.clip(x[:, 0], 0, width)) * \
        (np.clip(y[:, 1], 0, height) - np.clip(y[:, 0], 0, height))
    uniform = np.full((9, *grid), 1.0 / (grid[0] * grid[1]))
    score = aq.score_clip(uniform, boxes, height, width)
    np.testing.assert_allclose(score.mass, area / (height * width), rtol=0, atol=1e-12)
    np.testing.assert_allclose(score.mass_uniform, area / (height * width), rtol=0, atol=1e-12)


def test_entropy_of_uniform_is_log_cells_and_of_one_hot_is_zero():
    for h, w in ((2, 2), (4, 4), (7, 7), (3, 5)):
        assert aq.entropy(np.full((h, w), 1 / (h * w))) == pytest.approx(math.log(h * w), rel=1e-12)
    one_hot = np.zeros((2, 3, 4, 4))
    one_hot[..., 1, 2] = 1.0
    np.testing.assert_array_equal(aq.entropy(one_hot), np.zeros((2, 3)))
    half = np.zeros((4, 4))
    half[0, :2] = 0.5
    assert aq.entropy(half) == pytest.approx(math.log(2))


def test_attention_report_scores_the_sampled_frames_of_each_clip():
    """Boxes move between frames: only the frames named by frame_index may be scored."""
    left, right = [0.0, 0.0, 100.0, 100.0], [100.0, 0.0, 200.0, 100.0]
    truth = {"a/1.avi": np.array([left, right, left, right], np.float32), "a/2.avi": np.zeros((0, 4), np.float32)}
    attention = np.zeros((3, 2, 2, 2), np.float32)
    attention[:, :, :, 0] = 0.5  # all attention on the left column
    frame_index = np.array([[0, 2], [1, 3], [0, 9]])  # clip 0 samples left boxes, the unboxed clip 1 is skipped
    report = metrics.attention_report(attention, ["a/1.avi", "a/2.avi", "b/unknown.avi"], truth, frame_index,
                                       np.array([100, 100, 100]), np.array([200, 200, 200]))
    assert {k: report[k] for k in ("clips_with_boxes", "mass_in_box", "mass_in_box_uniform", "mass_ratio", "pointing",
                                   "pointing_uniform")} == {"clips_with_boxes": 1, "mass_in_box": 1.0,
                                                            "mass_in_box_uniform": 0.5, "mass_ratio": 2.0,
                                                            "pointing": 1.0, "pointing_uniform": 0.5}
    assert (report["clips_without_box"], report["frames_without_box"]) == (1, 2)  # a/2.avi: in the file, no box
    # the centre prior on a 2x2 grid of a 200x100 frame is uniform by symmetry; its argmax is the first cell
    assert (report["mass_in_box_centre"], report["pointing_centre"]) == (0.5, 1.0)
    report = metrics.attention_report(attention[:1], ["a/1.avi"], truth, np.array([[1, 3]]), np.array([100]),
                                       np.array([200]))
    assert (report["mass_in_box"], report["pointing"], report["mass_ratio"]) == (0.0, 0.0, 0.0)
    empty = metrics.attention_report(attention, ["x", "y", "z"], truth, frame_index, np.full(3, 100),
                                      np.full(3, 200))
    counts = ("clips_with_boxes", "clips_without_box", "frames_scored", "frames_without_box")
    assert empty["clips_with_boxes"] == 0 and all(v is None for k, v in empty.items() if k not in counts)
    assert (empty["clips_without_box"], empty["frames_without_box"]) == (0, 0)  # x, y, z: not in the file at all
    assert "per_class" not in empty


# --- attention quality end to end -----------------------------------------------------------------------


def by_hand(attention: np.ndarray, boxes: np.ndarray, height: float, width: float) -> tuple[float, float, float, float]:
    """(mass, uniform mass, pointing, uniform pointing) of one clip, cell by cell in plain Python."""
    t, h, w = attention.shape
    mass = uniform = pointing = uniform_pointing = 0.0
    for k in range(t):
        x0, y0, x1, y1 = (float(v) for v in boxes[k])
        best = divmod(int(np.argmax(attention[k])), w)
        for i in range(h):
            for j in range(w):
                top, bottom, left, right = i * height / h, (i + 1) * height / h, j * width / w, (j + 1) * width / w
                overlap = max(0.0, min(right, x1) - max(left, x0)) * max(0.0, min(bottom, y1) - max(top, y0))
                cover = overlap / ((bottom - top) * (right - left))
                centre_in = x0 <= (left + right) / 2 <= x1 and y0 <= (top + bottom) / 2 <= y1
                mass += float(attention[k, i, j]) * cover / t
                uniform += cover / (h * w) / t
                uniform_pointing += centre_in / (h * w) / t
                pointing += (centre_in and (i, j) == best) / t
    return mass, uniform, pointing, uniform_pointing


def test_attention_figures_with_the_datasets_boxes_match_a_hand_computation(cli_eval, tiny_project, model):
    _, out = cli_eval
    figures = json.loads((out / "eval.json").read_text())["attention"]
    boxes = json.loads((tiny_project["videos"] / "boxes.json").read_text())["videos"]
    outputs, keys = infer_split(tiny_project, model)
    with open_cache(tiny_project["cache"]) as cache:
        rows = cache.indices(keys)
        frame_index, heights, widths = cache.frame_index[rows], cache.height[rows], cache.width[rows]
    assert heights.tolist() == [48] * 3 and widths.tolist() == [64] * 3
    scores = [by_hand(outputs.attention[n], np.asarray(boxes[key])[frame_index[n]], 48.0, 64.0)
              for n, key in enumerate(keys)]
    mass, uniform, pointing, uniform_pointing = np.mean(scores, axis=0)
    assert figures["clips_with_boxes"] == 3
    assert figures["mass_in_box"] == pytest.approx(mass, abs=2e-6)
    assert figures["mass_in_box_uniform"] == pytest.approx(uniform, abs=2e-6)
    assert figures["pointing"] == pytest.approx(pointing, abs=2e-6)
    assert figures["pointing_uniform"] == pytest.approx(uniform_pointing, abs=2e-6)
    assert figures["mass_ratio"] == pytest.approx(mass / uniform, rel=1e-4)
    assert 0 < uniform < 1  # the actor fills part of the frame, not none or all of it


@pytest.mark.slow  # fast form: the uniform-attention mass test above, tests/test_head.py's uniform attention
def test_uniform_attention_scores_exactly_its_baseline(tiny_project, tmp_path):
    model = train_model(tiny_project, tmp_path, HeadConfig(channels=8, attention="none"), epochs=1)
    figures = evaluate_in(tiny_project, model, tmp_path / "eval")["attention"]
    assert figures["clips_with_boxes"] == 3
    assert figures["mass_in_box"] == pytest.approx(figures["mass_in_box_uniform"], abs=1e-6)
    assert figures["mass_ratio"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow  # fast form: tests/test_real_boxes.py and tests/test_outputs_stay_put.py pass boxes explicitly
def test_boxes_given_with_a_flag_are_used_for_a_cache_without_them(cli_eval, tiny_project, model, unboxed_cache,
                                                                   tmp_path):
    _, out = cli_eval
    found = json.loads((out / "eval.json").read_text())["attention"]
    given = tiny_project["root"] / "given-boxes.json"
    shutil.copy(tiny_project["videos"] / "boxes.json", given)
    report = evaluate_in(tiny_project, model, tmp_path, cache=unboxed_cache, boxes=given)
    assert Path(report["attention"]["boxes"]).resolve() == given.resolve()
    for key in ("clips_with_boxes", "mass_in_box", "mass_in_box_uniform", "pointing", "pointing_uniform"):
        assert report["attention"][key] == pytest.approx(found[key], abs=1e-5), key


def test_a_dataset_without_boxes_reports_null_attention_figures_and_says_so(tiny_project, model, unboxed_cache,
                                                                            tmp_path):
    result = run_in_process("evaluate", str(unboxed_cache), str(tiny_project["splits"]), str(model), str(tmp_path),
                            "--plots", str(tmp_path / "plots"), "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    looked = report["attention"].pop("looked_for_boxes")
    assert looked and all(p.endswith("boxes.json") for p in looked)
    assert "looked for" in result.stdout and "--boxes" in result.stdout
    assert report["attention"] == {"clips_with_boxes": 0, "mass_in_box": None, "mass_in_box_uniform": None,
                                   "mass_in_box_centre": None, "mass_in_box_motion": None, "mass_ratio": None,
                                   "mass_ratio_centre": None, "mass_ratio_motion": None, "pointing": None,
                                   "pointing_uniform": None, "pointing_centre": None, "pointing_motion": None,
                                   "clips_without_box": 0, "frames_scored": 0, "frames_without_box": 0, "boxes": None}
    assert report["video_accuracy"] is not None and report["entropy"]["mean"] is not None
    assert "no ground-truth boxes" in result.stdout


# --- refusals -------------------------------------------------------------------------------------------


def evaluate_cli(project: dict[str, Path], model: Path, out: Path, *extra: str, cache: Path | None = None):
    return run_in_process("evaluate", str(cache or project["cache"]), str(project["splits"]), str(model), str(out),
                          "--plots", str(out / "plots"), "--device", "cpu", "--no-progress", *extra)


def test_a_model_of_other_extraction_settings_is_refused(tiny_project, model, other_cache, tmp_path):
    result = evaluate_cli(tiny_project, model, tmp_path, cache=other_cache)
    assert_one_line_error(result, "extracted differently", "weights", "random:1")
    assert not (tmp_path / "eval.json").exists()


def broken_checkpoint(kind: str, model: Path, where: Path) -> Path:
    import torch

    path = where / f"{kind.replace(' ', '_')}.pt"
    data = model.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated tail":
        path.write_bytes(data[:-64])
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "text":
        path.write_text("model: head.pt\nepochs: 3\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign dict":
        torch.save({"a": 1}, path)
    elif kind == "plain state_dict":
        torch.save(torch.load(model, weights_only=True)["state_dict"], path)
    elif kind == "foreign list":
        torch.save([torch.zeros(3)], path)
    elif kind == "newer format":
        torch.save(dict(torch.load(model, weights_only=True), format_version=2), path)
    elif kind == "no state_dict":
        payload = torch.load(model, weights_only=True)
        del payload["state_dict"]
        torch.save(payload, path)
    elif kind == "other head":
        payload = torch.load(model, weights_only=True)
        torch.save(dict(payload, head=dict(payload["head"], channels=16)), path)
    elif kind == "reordered classes":
        payload = torch.load(model, weights_only=True)
        torch.save(dict(payload, classes=payload["classes"][::-1]), path)
    elif kind != "missing":
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind, fragment", [
    ("truncated", "not a readable head checkpoint"), ("truncated tail", "not a readable head checkpoint"),
    ("random bytes", "not a readable head checkpoint"), ("text", "not a readable head checkpoint"),
    ("empty", "not a readable head checkpoint"), ("missing", "no such checkpoint"),
    ("foreign dict", "not a head checkpoint of this pipeline"),
    ("plain state_dict", "not a head checkpoint of this pipeline"),
    ("foreign list", "not a head checkpoint of this pipeline"), ("newer format", "format_version 2"),
    ("no state_dict", "incomplete head checkpoint"), ("other head", "do not fit its head config"),
    ("reordered classes", "classes other than the model's"),
])
def test_a_corrupt_or_foreign_checkpoint_is_refused(tiny_project, model, tmp_path, kind, fragment):
    path = broken_checkpoint(kind, model, tmp_path)
    result = evaluate_cli(tiny_project, path, tmp_path / "out")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out" / "eval.json").exists()


@pytest.mark.parametrize("field, value", [("state_dict", [1, 2]), ("feature_shape", [6]),
                                          ("head", {"channels": "8"}), ("classes", [1, 2, 3]),
                                          ("head", {"kernel": 2})])  # well typed, but build_head refuses it
def test_a_checkpoint_with_ill_typed_fields_is_refused(tiny_project, model, tmp_path, field, value):
    import torch

    payload = torch.load(model, weights_only=True)
    payload[field] = dict(payload[field], **value) if isinstance(value, dict) else value
    torch.save(payload, tmp_path / "odd.pt")
    assert_one_line_error(evaluate_cli(tiny_project, tmp_path / "odd.pt", tmp_path / "out"), "odd.pt")


@pytest.mark.parametrize("case, fragment", [
    ("missing", "no such boxes file"), ("not json", "not a valid boxes file"),
    ("wrong format", "not a valid boxes file"), ("not a list of boxes", "are not a list of [x0, y0, x1, y1]"),
    ("binary", "not a valid boxes file"),
])
def test_a_bad_boxes_file_is_refused(tiny_project, model, tmp_path, case, fragment):
    path = tmp_path / "boxes.json"
    if case == "not json":
        path.write_text("{videos: ")
    elif case == "wrong format":
        path.write_text(json.dumps({"format": 99, "videos": {}}))
    elif case == "not a list of boxes":
        path.write_text(json.dumps({"format": 1, "videos": {"move_left/clip_000.avi": [[1, 2, 3]]}}))
    elif case == "binary":
        path.write_bytes(b"\xff\xfe\x00\x81" * 10)
    result = evaluate_cli(tiny_project, model, tmp_path / "out", "--boxes", str(path))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out" / "eval.json").exists()


@pytest.mark.parametrize("extra, fragment", [(["--split", "dev"], "evaluate.split = 'dev': must be one of"),
                                             (["--batch-size", "0"], "evaluate.batch_size")])
def test_bad_options_are_refused(tiny_project, model, tmp_path, extra, fragment):
    assert_one_line_error(evaluate_cli(tiny_project, model, tmp_path, *extra), fragment)


def test_a_refusal_in_a_real_process_has_no_traceback(tiny_project, model, other_cache, tmp_path):
    result = run_cli("evaluate", str(other_cache), str(tiny_project["splits"]), str(model), str(tmp_path),
                     "--plots", str(tmp_path / "plots"), "--device", "cpu", "--no-progress")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the model was trained on features extracted differently")
