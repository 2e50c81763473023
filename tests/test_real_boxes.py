"""Real boxes end to end: annotation files written in UCF101-24's and JHMDB's own formats for a tiny generated
dataset, imported with `boxes import`, then read by evaluate and render as they read boxes.json: frames without
a box skipped and counted, a clip annotated only in its middle scored there only, two actors as a union, and the
motion map scored beside the attention."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import EvaluateConfig, HeadConfig, RenderConfig
from pipeline.features.reader import open_cache
from pipeline.report import attention_quality as aq
from pipeline.video.boxes import read_boxes_file, read_dense
from tests.cli_helpers import assert_one_line_error, run_cli, run_in_process
from tests.test_boxes_format import write_final_annots
from tests.test_evaluate import by_hand, train_model

SCALE = 5.0  # the tiny clips are 64 x 48; the annotations are written at UCF101-24's and JHMDB's 320 x 240
H, W = 48.0, 64.0
MIDDLE = (4, 8)  # clip A's tube: frames 4..7 of its 12 (the cache samples 1, 3, 5, 7, 9, 11: 5 and 7 are boxed)


def evaluate_in(project: dict[str, Path], model: Path, out: Path, boxes: Path | None = None) -> dict:
    """evaluate on the test split without the deletion test (not what these tests are about, and the slow part)."""
    from stages import evaluate

    return evaluate.run(project["cache"], project["splits"], model, out, EvaluateConfig(deletion_draws=0, device="cpu"),
                        boxes=boxes, plots_dir=out / "plots", progress=False)


def xywh(box: np.ndarray) -> list[int]:
    """A synthetic [x0, y0, x1, y1] box at 64 x 48 as UCF101-24 writes one: int x, y, w, h at 320 x 240."""
    x0, y0, x1, y1 = (float(v) * SCALE for v in box)
    return [round(x0), round(y0), round(x1 - x0), round(y1 - y0)]


def xyxy(row: list[int]) -> np.ndarray:
    """What the importer makes of such a row, back at 64 x 48."""
    x, y, w, h = row
    return np.array([x, y, x + w, y + h], np.float64) / SCALE


@pytest.fixture(scope="module")
def model(tiny_project, tmp_path_factory) -> Path:
    return train_model(tiny_project, tmp_path_factory.mktemp("model"), HeadConfig(channels=8), epochs=2)


@pytest.fixture(scope="module")
def annotated(tiny_project, tmp_path_factory) -> dict:
    """pyannot.pkl and finalAnnots.mat for the 3 test clips: A boxed in its middle only, B with two overlapping
    actors on every frame, C listed without any box; and one annotated video the dataset does not have."""
    root = tmp_path_factory.mktemp("annotations")
    a, b, c = (tiny_project["splits"] / "test.txt").read_text().split()
    truth = read_dense(tiny_project["videos"] / "boxes.json")  # the actor's box, every frame
    actor = {key: [xywh(box) for box in truth[key]] for key in (a, b)}
    second = [[x + w // 2, y, w, h] for x, y, w, h in actor[b]]  # half a box to the right: they overlap
    name = {key: key.rsplit(".", 1)[0] for key in (a, b, c)}  # "move_left/clip_001": no extension, as UCF's
    sf, ef = MIDDLE
    pkl = {name[a]: {"numf": 12, "label": 0, "annotations": [
               {"sf": sf, "ef": ef, "label": 0, "boxes": np.array(actor[a][sf:ef], np.int64)}]},
           name[b]: {"numf": 12, "label": 1, "annotations": [
               {"sf": 0, "ef": 12, "label": 1, "boxes": np.array(actor[b], np.int64)},
               {"sf": 0, "ef": 12, "label": 1, "boxes": np.array(second, np.int64)}]},
           name[c]: {"numf": 12, "label": 2, "annotations": []},
           "move_up/v_not_in_the_dataset": {"numf": 12, "label": 2, "annotations": [
               {"sf": 0, "ef": 1, "label": 2, "boxes": np.array([[1, 2, 3, 4]], np.int64)}]}}
    (root / "pyannot.pkl").write_bytes(pickle.dumps(pkl, protocol=2))
    write_final_annots(root / "finalAnnots.mat", {
        name[a]: [(sf + 1, actor[a][sf:ef], 1)], name[b]: [(1, actor[b], 2), (1, second, 2)], name[c]: [],
        "move_up/v_not_in_the_dataset": [(1, [[1, 2, 3, 4]], 3)]}, frames=12)
    expected = {a: {f: [xyxy(actor[a][f])] for f in range(sf, ef)},
                b: {f: [xyxy(actor[b][f]), xyxy(second[f])] for f in range(12)}}
    return {"root": root, "keys": (a, b, c), "expected": expected}


@pytest.fixture(scope="module")
def imported(annotated, tiny_project) -> tuple:
    """`python -m pipeline boxes import ucf24-pkl ...` as a user types it."""
    out = annotated["root"] / "ucf24-boxes.json"
    result = run_cli("boxes", "import", "ucf24-pkl", str(annotated["root"] / "pyannot.pkl"), str(out),
                     "--videos", str(tiny_project["videos"]))
    assert result.returncode == 0, result.stderr
    return result, out


@pytest.fixture(scope="module")
def evaluated(imported, tiny_project, model, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval-ucf24")
    return evaluate_in(tiny_project, model, out, boxes=imported[1]), out


def hand_union(attention: np.ndarray, boxes: list[np.ndarray]) -> tuple[float, float]:
    """(mass, pointing) of one frame's map against two boxes, cell by cell: inclusion-exclusion, plain Python."""
    h, w = attention.shape
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
    ix0, iy0, ix1, iy1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    best = divmod(int(np.argmax(attention)), w)
    mass = pointing = 0.0

    def overlap(x0, y0, x1, y1, left, top, right, bottom):
        return max(0.0, min(right, x1) - max(left, x0)) * max(0.0, min(bottom, y1) - max(top, y0))

    for i in range(h):
        for j in range(w):
            cell = (j * W / w, i * H / h, (j + 1) * W / w, (i + 1) * H / h)
            union = (overlap(ax0, ay0, ax1, ay1, *cell) + overlap(bx0, by0, bx1, by1, *cell)
                     - overlap(ix0, iy0, ix1, iy1, *cell))
            mass += float(attention[i, j]) * union / ((W / w) * (H / h))
            cx, cy = (cell[0] + cell[2]) / 2, (cell[1] + cell[3]) / 2
            inside = any(x0 <= cx <= x1 and y0 <= cy <= y1 for x0, y0, x1, y1 in boxes)
            pointing += float(inside and (i, j) == best)
    return mass, pointing


def test_the_import_command_says_how_many_matched_and_writes_format_2(imported, annotated):
    result, out = imported
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "3 of 4 annotated videos matched videos under" in lines[0], result.stdout
    assert "unmatched: move_up/v_not_in_the_dataset" in lines[0] and "Traceback" not in result.stderr
    data = json.loads(out.read_text())
    a, b, c = annotated["keys"]
    assert data["format"] == 2 and set(data["videos"]) == {a, b, c}
    assert data["videos"][a]["size"] == [320, 240] and data["videos"][c]["frames"] == {}
    boxes = read_boxes_file(out)
    for key, frames in annotated["expected"].items():
        assert sorted(boxes[key].frames) == sorted(frames)
        for f, expected in frames.items():
            np.testing.assert_allclose(boxes[key].at([f], H, W)[0], expected, atol=1e-4)


def test_finalannots_mat_imports_the_same_boxes_as_the_pickle(imported, annotated, tiny_project, tmp_path):
    result = run_in_process("boxes", "import", "ucf24-mat", str(annotated["root"] / "finalAnnots.mat"),
                            str(tmp_path / "mat.json"), "--videos", str(tiny_project["videos"]))
    assert result.exit_code == 0, result.output
    assert "3 of 4 annotated videos matched" in result.stdout
    assert json.loads((tmp_path / "mat.json").read_text()) == json.loads(imported[1].read_text())


def test_evaluate_skips_and_counts_frames_without_a_box_and_scores_the_middle_and_the_union(
        evaluated, annotated, tiny_project):
    report, out = evaluated
    att = report["attention"]
    a, b, c = annotated["keys"]
    with np.load(out / "attention.npz", allow_pickle=False) as maps:
        keys, attention, frame_index = list(maps["video"]), maps["attention"], maps["frame_index"]
    assert keys == [a, b, c] and frame_index[0].tolist() == [1, 3, 5, 7, 9, 11]
    sampled_a = [t for t, f in enumerate(frame_index[0]) if MIDDLE[0] <= f < MIDDLE[1]]  # 5 and 7
    assert len(sampled_a) == 2
    assert (att["clips_with_boxes"], att["clips_without_box"]) == (2, 1)  # C is listed, but has no box
    assert att["frames_scored"] == 2 + 6 and att["frames_without_box"] == 4 + 6
    expected = annotated["expected"]
    # A: only its middle frames are scored, against the one actor there
    boxes_a = np.stack([expected[a][int(frame_index[0][t])][0] for t in sampled_a])
    mass_a, _, pointing_a, _ = by_hand(attention[0][sampled_a], boxes_a, H, W)
    # B: every frame, against the union of its two overlapping actors
    union = [hand_union(attention[1][t], expected[b][int(frame_index[1][t])]) for t in range(6)]
    mass_b, pointing_b = np.mean(union, axis=0)
    assert att["mass_in_box"] == pytest.approx((mass_a + mass_b) / 2, abs=2e-5)
    assert att["pointing"] == pytest.approx((pointing_a + pointing_b) / 2, abs=2e-5)
    assert att["per_class"][a.split("/")[0]]["frames_scored"] == 2


def test_the_motion_map_is_scored_exactly_like_the_attention(evaluated, annotated, tiny_project):
    import torch

    from pipeline.features.motion import motion_map

    report, out = evaluated
    att = report["attention"]
    a, b, _ = annotated["keys"]
    with open_cache(tiny_project["cache"]) as cache:
        rows = cache.indices([a, b])
        motion = motion_map(torch.from_numpy(cache.load(rows))).numpy()  # (2, T, h, w)
        frame_index = cache.frame_index[rows]
    boxes = read_boxes_file(annotated["root"] / "ucf24-boxes.json")
    scores = [aq.score_clip(motion[n], boxes[key].at(frame_index[n], H, W), H, W) for n, key in enumerate((a, b))]
    assert att["mass_in_box_motion"] == pytest.approx(np.mean([s.mass.mean() for s in scores]), abs=2e-5)
    assert att["pointing_motion"] == pytest.approx(np.mean([s.pointing.mean() for s in scores]), abs=2e-5)
    assert att["mass_ratio_motion"] == pytest.approx(att["mass_in_box_motion"] / att["mass_in_box_uniform"], rel=1e-4)
    for key in ("mass_in_box_motion", "pointing_motion"):
        assert 0.0 <= att[key] <= 1.0
        assert all(key in entry for entry in att["per_class"].values())


def test_on_the_synthetic_set_the_motion_map_beats_uniform_and_the_table_shows_it(tiny_project, model, tmp_path,
                                                                                   capsys, monkeypatch):
    """The dataset's own boxes.json (format 1, found through the cache) and the motion baseline in the table."""
    from pipeline.report.tables import print_report

    monkeypatch.setenv("COLUMNS", "250")  # one row a figure: rich wraps at the terminal's width
    report = evaluate_in(tiny_project, model, tmp_path)
    att = report["attention"]
    assert att["frames_without_box"] == 0 and att["frames_scored"] == 3 * 6 and att["clips_without_box"] == 0
    assert att["mass_ratio_motion"] > 1.0 and att["mass_in_box_motion"] > att["mass_in_box_uniform"]
    assert att["pointing_motion"] > att["pointing_uniform"]
    print_report(report)
    shown = capsys.readouterr().out
    assert f"{att['mass_in_box_motion']:.1%} motion map (x{att['mass_ratio_motion']:.2f})" in shown
    assert "have no box" not in shown  # every frame of the synthetic set has one


def test_jhmdb_joints_import_and_score_like_the_datasets_own_boxes(tiny_project, model, tmp_path):
    """Joints spanning each actor box exactly (margin 0) at 320 x 240: the same figures as boxes.json gives."""
    from scipy.io import savemat

    truth = read_dense(tiny_project["videos"] / "boxes.json")
    keys = (tiny_project["splits"] / "test.txt").read_text().split()
    for key in keys:
        boxes = truth[key].astype(np.float64) * SCALE  # (12, 4)
        pos = np.empty((2, 15, len(boxes)))
        pos[0] = boxes[:, 0] + np.linspace(0, 1, 15)[:, None] * (boxes[:, 2] - boxes[:, 0])
        pos[1] = boxes[:, 1] + np.linspace(1, 0, 15)[:, None] * (boxes[:, 3] - boxes[:, 1])
        folder = tmp_path / "joint_positions" / key.rsplit(".", 1)[0]
        folder.mkdir(parents=True)
        savemat(str(folder / "joint_positions.mat"), {"pos_img": pos, "pos_world": pos / 100, "scale": np.ones(12)})
    result = run_in_process("boxes", "import", "jhmdb", str(tmp_path / "joint_positions"), str(tmp_path / "j.json"),
                            "--videos", str(tiny_project["videos"]), "--margin", "0")
    assert result.exit_code == 0, result.output
    assert "3 of 3 annotated videos matched" in result.stdout
    joints = evaluate_in(tiny_project, model, tmp_path / "j", boxes=tmp_path / "j.json")["attention"]
    own = evaluate_in(tiny_project, model, tmp_path / "own")["attention"]  # boxes.json, format 1
    for key in ("clips_with_boxes", "frames_scored", "mass_in_box", "mass_in_box_uniform", "mass_in_box_motion",
                "pointing", "pointing_uniform", "pointing_motion", "mass_in_box_centre"):
        assert joints[key] == pytest.approx(own[key], abs=2e-4), key


@pytest.mark.parametrize("kind, content, fragment", [
    ("ucf24-pkl", b"garbage, not a pickle", "the pickle is malformed"),
    ("ucf24-mat", b"garbage, not MATLAB", "not a MATLAB file"),
    ("ucf24-avi", b"", "unknown annotation kind"),
])
def test_a_bad_annotation_file_is_exit_2_and_one_line(kind, content, fragment, tiny_project, tmp_path):
    source = tmp_path / "annotations.bin"
    source.write_bytes(content)
    result = run_in_process("boxes", "import", kind, str(source), str(tmp_path / "out.json"),
                            "--videos", str(tiny_project["videos"]))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out.json").exists()


def test_names_that_match_no_video_are_one_line_not_an_empty_file(annotated, tmp_path):
    (tmp_path / "other" / "walk").mkdir(parents=True)
    (tmp_path / "other" / "walk" / "x.avi").write_bytes(b"")
    result = run_in_process("boxes", "import", "ucf24-pkl", str(annotated["root"] / "pyannot.pkl"),
                            str(tmp_path / "out.json"), "--videos", str(tmp_path / "other"))
    assert_one_line_error(result, "none of the 4 annotated videos", "--videos")
    assert not (tmp_path / "out.json").exists()


def test_evaluate_with_a_bad_boxes_file_is_exit_2_and_one_line(tiny_project, model, tmp_path):
    bad = tmp_path / "boxes.json"
    bad.write_text('{"format": 2, "videos": {"a.avi": {"frames": {"0": [[3, 2, 1, 4]]}}}}')
    result = run_in_process("evaluate", str(tiny_project["cache"]), str(tiny_project["splits"]), str(model),
                            str(tmp_path / "out"), "--plots", str(tmp_path / "plots"), "--boxes", str(bad),
                            "--device", "cpu", "--no-progress")
    assert_one_line_error(result, str(bad), "x1 < x0")


def test_render_outlines_every_box_of_a_frame_and_none_where_there_is_none(imported, annotated, tiny_project, model,
                                                                           tmp_path, monkeypatch):
    from pipeline.report import overlay
    from stages import render

    drawn = {}
    real = overlay.render_clip

    def spy(out_dir, name, frames, attention, *args, boxes=None, **kwargs):
        drawn[name] = boxes
        return real(out_dir, name, frames, attention, *args, boxes=boxes, **kwargs)

    monkeypatch.setattr(overlay, "render_clip", spy)
    a, b, c = annotated["keys"]
    summary = render.run(tiny_project["cache"], model, tmp_path / "report", RenderConfig(strip_frames=3, device="cpu"),
                         splits_dir=tiny_project["splits"], metrics_dir=tmp_path / "none",
                         train_plots=tmp_path / "none", clips=[a, b, c], progress=False,
                         boxes=imported[1])
    assert len(summary.rendered) == 3, summary.skipped
    assert [len(k) for k in drawn[a]] == [0, 0, 1, 1, 0, 0]  # frames 5 and 7 only
    assert [len(k) for k in drawn[b]] == [2] * 6 and [len(k) for k in drawn[c]] == [0] * 6
    np.testing.assert_allclose(drawn[a][2], annotated["expected"][a][5], atol=1e-4)  # at the clip's 64 x 48
