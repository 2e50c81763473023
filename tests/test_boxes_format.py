"""The boxes file (format 2: sparse, several actors; format 1 still read), the importers' readers on files written
in each dataset's own format, and the measures' handling of frames without a box and of several boxes."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from pipeline.report import attention_quality as aq
from pipeline.report import metrics, overlay
from pipeline.video import annotations as an
from pipeline.video.boxes import BoxesError, VideoBoxes, boxes_json, read_boxes_file, read_dense, write_boxes_file
from pipeline.video.synthetic import write_boxes

# --- the file ------------------------------------------------------------------------------------------------


def test_format_2_round_trips_sparse_frames_several_boxes_and_the_size(tmp_path):
    videos = {"a/x.avi": VideoBoxes({3: np.array([[1, 2, 30, 40], [5, 6, 7, 8.25]], np.float32),
                                     9: np.array([[0, 0, 320, 240]], np.float32)}, (320.0, 240.0)),
              "b/y.mp4": VideoBoxes({0: np.array([[1.5, 2.5, 3.5, 4.5]], np.float32)})}
    path = write_boxes_file(tmp_path / "b.json", videos)
    data = json.loads(path.read_text())
    assert data["format"] == 2 and data["videos"]["a/x.avi"]["size"] == [320, 240]
    assert set(data["videos"]["a/x.avi"]["frames"]) == {"3", "9"} and "size" not in data["videos"]["b/y.mp4"]
    back = read_boxes_file(path)
    assert back.keys() == videos.keys()
    for key, vb in videos.items():
        assert back[key].size == vb.size and back[key].frames.keys() == vb.frames.keys()
        for f, boxes in vb.frames.items():
            np.testing.assert_array_equal(back[key].frames[f], boxes)
    # at(): no box where none is listed; scaled from the annotated 320x240 to a 64x48 clip
    at = back["a/x.avi"].at(np.array([0, 3, 9, 12]), 48.0, 64.0)
    assert [len(b) for b in at] == [0, 2, 1, 0]
    np.testing.assert_allclose(at[2], [[0, 0, 64, 48]])
    np.testing.assert_allclose(at[1][0], [0.2, 0.4, 6, 8])
    assert [len(b) for b in back["b/y.mp4"].at(np.array([0, 1]), 48.0, 64.0)] == [1, 0]


def test_format_1_still_reads_one_box_a_frame_the_last_past_the_end(tmp_path):
    boxes = {"move_left/clip_000.avi": np.arange(12, dtype=np.float32).reshape(3, 4)}
    path = write_boxes(tmp_path, boxes)
    assert json.loads(path.read_text())["format"] == 1
    np.testing.assert_array_equal(read_dense(path)["move_left/clip_000.avi"], boxes["move_left/clip_000.avi"])
    vb = read_boxes_file(path)["move_left/clip_000.avi"]
    assert vb.size is None and len(vb) == 3
    at = vb.at(np.array([2, 0, 5]), 48.0, 64.0)  # not scaled: format 1 is in the video's own pixels
    assert [b.tolist() for b in at] == [[boxes["move_left/clip_000.avi"][i].tolist()] for i in (2, 0, 2)]


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not JSON"),
    ('[1, 2]', "JSON object"),
    ('{"format": 3, "videos": {}}', "format 3"),
    ('{"format": 2, "videos": []}', "mapping"),
    ('{"format": 2, "videos": {"a.avi": [[1, 2, 3, 4]]}}', "video 'a.avi'"),
    ('{"format": 2, "videos": {"a.avi": {"frames": {"x": [[1, 2, 3, 4]]}}}}', "frame 'x'"),
    ('{"format": 2, "videos": {"a.avi": {"frames": {"-1": [[1, 2, 3, 4]]}}}}', "frame '-1'"),
    ('{"format": 2, "videos": {"a.avi": {"frames": {"0": [[1, 2, 3]]}}}}', "[x0, y0, x1, y1]"),
    ('{"format": 2, "videos": {"a.avi": {"frames": {"0": [[1, 2, "3", 4]]}}}}', "[x0, y0, x1, y1]"),
    ('{"format": 2, "videos": {"a.avi": {"frames": {"0": [[5, 2, 3, 4]]}}}}', "x1 < x0"),
    ('{"format": 2, "videos": {"a.avi": {"size": [320], "frames": {}}}}', "size"),
    ('{"format": 2, "videos": {"a.avi": {"size": [0, 240], "frames": {}}}}', "size"),
    ('{"format": 1, "videos": {"a.avi": [1, 2]}}', "[x0, y0, x1, y1]"),
])
def test_a_bad_boxes_file_is_one_line_naming_the_file_and_the_fault(tmp_path, text, fragment):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(BoxesError) as info:
        read_boxes_file(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and fragment in message, message
    assert isinstance(info.value, ValueError)  # the callers' contract: a ValueError, shown as a user error


def test_an_empty_frame_list_is_no_box_and_the_json_is_compact():
    text = boxes_json({"a.avi": VideoBoxes({2: np.zeros((0, 4), np.float32), 4: np.array([[1, 1, 2, 2]])})})
    assert " " not in text and json.loads(text)["videos"]["a.avi"]["frames"] == {"4": [[1.0, 1.0, 2.0, 2.0]]}


# --- the measures ----------------------------------------------------------------------------------------------

H, W = 100.0, 200.0  # a 2x2 grid: cells 50 tall, 100 wide


def test_union_cover_counts_a_shared_cell_once():
    two = [np.array([[0.0, 0.0, 150.0, 25.0], [100.0, 0.0, 200.0, 50.0]])]  # overlap x 100..150, y 0..25
    np.testing.assert_allclose(aq.union_cover(two, H, W, (2, 2)), [[[0.5, 1.0], [0.0, 0.0]]])
    same = [np.array([[0.0, 0.0, 150.0, 25.0]] * 3)]
    np.testing.assert_allclose(aq.union_cover(same, H, W, (2, 2)), aq.box_cover(same[0][:1], H, W, (2, 2)))
    rng = np.random.default_rng(3)
    for _ in range(20):  # inclusion-exclusion on two random boxes, cell by cell
        a, b = (np.array([x, y, x + rng.uniform(0, 120), y + rng.uniform(0, 60)])
                for x, y in rng.uniform([-20, -10], [220, 110], (2, 2)))
        both = np.array([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
        both[2:] = np.maximum(both[2:], both[:2])
        expected = sum(aq.box_cover(x[None], H, W, (3, 5)) for x in (a, b)) - aq.box_cover(both[None], H, W, (3, 5))
        np.testing.assert_allclose(aq.union_cover([np.stack([a, b])], H, W, (3, 5)), expected, atol=1e-12)


def test_score_clip_skips_frames_without_a_box_and_points_into_any_box():
    attention = np.zeros((3, 2, 2))
    attention[:, 1, 1] = 1.0  # all on the bottom-right cell (centre x 150, y 75)
    boxes = [np.zeros((0, 4)), np.array([[0.0, 0.0, 100.0, 50.0], [120.0, 60.0, 200.0, 100.0]]),
             np.array([[0.0, 0.0, 100.0, 50.0]])]
    motion = np.full((3, 2, 2), 0.25)
    score = aq.score_clip(attention, boxes, H, W, motion)
    assert score.frames_without_box == 1 and score.frames_scored == 2
    assert score.pointing.tolist() == [1.0, 0.0]  # in the second box of frame 1; in no box of frame 2
    np.testing.assert_allclose(score.mass, [0.8 * 0.8, 0.0])  # cell (1,1): 80 x 40 of its 100 x 50
    np.testing.assert_allclose(score.mass_motion, score.mass_uniform)  # a uniform motion map is uniform
    empty = aq.score_clip(attention, [np.zeros((0, 4))] * 3, H, W, motion)
    assert empty.frames_scored == 0 and empty.frames_without_box == 3


def test_attention_report_counts_frames_and_clips_without_a_box_and_scores_the_motion_map():
    left = np.array([[0.0, 0.0, 100.0, 100.0]], np.float32)
    truth = {"a/1.avi": VideoBoxes({1: left, 3: left}),  # boxes in the middle of the clip only
             "a/2.avi": VideoBoxes({7: left}),  # none at its sampled frames
             "b/3.avi": VideoBoxes.dense(np.repeat(left, 4, axis=0))}  # format 1: every frame
    attention = np.zeros((4, 4, 2, 2), np.float32)
    attention[..., 0] = 0.5  # on the left column
    motion = np.zeros((4, 4, 2, 2), np.float32)
    motion[..., 1] = 0.5  # on the right column
    frame_index = np.array([[0, 1, 2, 3]] * 4)
    report = metrics.attention_report(attention, ["a/1.avi", "a/2.avi", "b/3.avi", "c/unknown.avi"], truth,
                                      frame_index, np.full(4, 100), np.full(4, 200), np.array([0, 0, 1, 2]),
                                      ["a", "b", "c"], motion=motion)
    assert {k: report[k] for k in ("clips_with_boxes", "clips_without_box", "frames_scored", "frames_without_box")} \
        == {"clips_with_boxes": 2, "clips_without_box": 1, "frames_scored": 2 + 4, "frames_without_box": 2 + 4}
    assert (report["mass_in_box"], report["mass_in_box_uniform"], report["mass_ratio"]) == (1.0, 0.5, 2.0)
    assert (report["mass_in_box_motion"], report["mass_ratio_motion"], report["pointing_motion"]) == (0.0, 0.0, 0.0)
    assert report["per_class"]["a"]["frames_without_box"] == 6 and report["per_class"]["a"]["clips_without_box"] == 1
    assert set(report["per_class"]) == {"a", "b"} and report["per_class"]["b"]["mass_in_box_motion"] == 0.0
    without = metrics.attention_report(attention, ["a/1.avi"], truth, frame_index[:1], np.full(1, 100),
                                       np.full(1, 200))
    assert without["mass_in_box"] == 1.0 and without["mass_in_box_motion"] is None  # no maps given: no baseline


def test_draw_boxes_outlines_every_box_of_a_frame_and_nothing_where_there_is_none():
    images = np.zeros((3, 20, 30, 3), np.uint8)
    boxes = [np.zeros((0, 4)), np.array([[2.0, 2.0, 8.0, 8.0], [15.0, 10.0, 25.0, 18.0]]), np.array([[0, 0, 30, 20.0]])]
    out = overlay.draw_boxes(images, boxes)
    assert (out[0] == 0).all()
    assert (out[1, 2, 2:8] == overlay.BOX_COLOUR).all() and (out[1, 10, 15:25] == overlay.BOX_COLOUR).all()
    assert (out[1, 5, 5] == 0).all() and (out[2, 19, :] == overlay.BOX_COLOUR).all()


# --- the importers' readers --------------------------------------------------------------------------------------


def ucf_tubes(*tubes: tuple[int, list[list[int]], int]) -> np.ndarray:
    """A MATLAB 1 x K struct array of tubes as finalAnnots.mat has them (fields ef, sf, class, boxes; 1-based)."""
    arr = np.zeros((1, len(tubes)), dtype=[("ef", "O"), ("sf", "O"), ("class", "O"), ("boxes", "O")])
    for i, (sf, boxes, label) in enumerate(tubes):
        arr[0, i] = (np.array([[sf + len(boxes) - 1]], np.uint16), np.array([[sf]], np.uint16),
                     np.array([[label]], np.uint8), np.array(boxes, np.uint16))
    return arr


def write_final_annots(path, videos: dict[str, list[tuple[int, list[list[int]], int]]], frames: int = 20) -> None:
    """finalAnnots.mat: a 1 x N struct array `annot` (num_imgs, name, tubes), as scipy.io.savemat writes it."""
    from scipy.io import savemat

    annot = np.zeros((1, len(videos)), dtype=[("num_imgs", "O"), ("name", "O"), ("tubes", "O")])
    for i, (name, tubes) in enumerate(videos.items()):
        annot[0, i] = (np.array([[frames]], np.uint16), np.array([name]), ucf_tubes(*tubes))
    savemat(str(path), {"annot": annot})


def test_ucf24_pkl_and_mat_give_the_same_boxes(tmp_path):
    box, other = [10, 20, 30, 40], [100, 50, 20, 60]  # x, y, w, h in 320 x 240
    pkl = {"Basketball/v_Basketball_g01_c01": {"numf": 20, "label": 0, "annotations": [
               {"sf": 4, "ef": 7, "label": 0, "boxes": np.array([box] * 3, np.int64)}]},
           "Fencing/v_Fencing_g01_c01": {"numf": 20, "label": 6, "annotations": [
               {"sf": 0, "ef": 2, "label": 6, "boxes": np.array([box] * 2, np.int16)},
               {"sf": 1, "ef": 3, "label": 6, "boxes": np.array([other] * 2, np.int16)}]},
           "Fencing/v_Fencing_g02_c01": {"numf": 20, "label": 6, "annotations": []}}
    (tmp_path / "pyannot.pkl").write_bytes(pickle.dumps(pkl, protocol=2))  # protocol 2, as Python 2 wrote it
    write_final_annots(tmp_path / "finalAnnots.mat", {
        "Basketball/v_Basketball_g01_c01": [(5, [box] * 3, 1)],  # MATLAB: sf 1-based
        "Fencing/v_Fencing_g01_c01": [(1, [box] * 2, 7), (2, [other] * 2, 7)],
        "Fencing/v_Fencing_g02_c01": []})
    from_pkl = an.read_ucf24_pkl(tmp_path / "pyannot.pkl")
    from_mat = an.read_ucf24_mat(tmp_path / "finalAnnots.mat")
    for read in (from_pkl, from_mat):
        assert set(read) == set(pkl)
        assert list(read["Basketball/v_Basketball_g01_c01"].frames) == [4, 5, 6]  # only the middle of the video
        fencing = read["Fencing/v_Fencing_g01_c01"]
        assert {f: len(b) for f, b in fencing.frames.items()} == {0: 1, 1: 2, 2: 1}  # two actors in frame 1
        np.testing.assert_array_equal(fencing.frames[1], [[10, 20, 40, 60], [100, 50, 120, 110]])
        assert len(read["Fencing/v_Fencing_g02_c01"]) == 0 and fencing.size == (320.0, 240.0)


def test_the_pickle_reader_runs_no_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)

    path = tmp_path / "pyannot.pkl"
    path.write_bytes(pickle.dumps({"a/b": {"annotations": [Exploit()]}}, protocol=2))
    with pytest.raises(BoxesError, match="refusing to load it") as info:
        an.read_ucf24_pkl(path)
    assert str(info.value).startswith(str(path)) and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content, fragment", [
    (b"not a pickle at all", "the pickle is malformed"),
    (pickle.dumps([1, 2, 3]), "expected a mapping"),
    (pickle.dumps({"a/b": {"numf": 3}}), "no 'annotations' list"),
    (pickle.dumps({"a/b": {"annotations": [{"sf": 0, "boxes": np.ones((2, 3))}]}}), "rows of x, y, w, h"),
    (pickle.dumps({"a/b": {"annotations": [{"sf": 0, "boxes": np.array([[1, 1, -2, 2]])}]}}), "negative"),
])
def test_a_bad_pickle_is_one_line_naming_it(tmp_path, content, fragment):
    path = tmp_path / "pyannot.pkl"
    path.write_bytes(content)
    with pytest.raises(BoxesError) as info:
        an.read_ucf24_pkl(path)
    assert str(info.value).startswith(str(path)) and fragment in str(info.value) and "\n" not in str(info.value)


def test_a_bad_mat_file_is_one_line_naming_it(tmp_path):
    from scipy.io import savemat

    (tmp_path / "text.mat").write_text("annot = 3")
    savemat(str(tmp_path / "other.mat"), {"videos": np.zeros(3)})
    for name, fragment in (("text.mat", "not a MATLAB file"), ("other.mat", "no 'annot'"), ("gone.mat", "no such")):
        with pytest.raises(BoxesError, match=fragment) as info:
            an.read_ucf24_mat(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name))


def test_jhmdb_boxes_are_the_joints_extent_with_a_margin_clipped_to_the_frame(tmp_path):
    from scipy.io import savemat

    pos = np.zeros((2, 15, 3))
    pos[0] = np.linspace(100, 200, 15)[:, None]  # x from 100 to 200
    pos[1] = np.linspace(50, 150, 15)[:, None]  # y from 50 to 150
    pos[0, 0, 2] = 315.0  # frame 2 reaches the right edge: x1 = 315 + 0.1 * 215 -> clipped to 320
    pos[:, :, 1] = np.nan  # frame 1 has no joints: no box
    (tmp_path / "brush_hair" / "clip_a").mkdir(parents=True)
    savemat(str(tmp_path / "brush_hair" / "clip_a" / "joint_positions.mat"), {"pos_img": pos, "scale": np.ones(3)})
    read = an.read_jhmdb(tmp_path)
    vb = read["brush_hair/clip_a"]
    assert list(vb.frames) == [0, 2] and vb.size == (320.0, 240.0)
    np.testing.assert_allclose(vb.frames[0], [[90, 40, 210, 160]])
    assert vb.frames[2][0, 2] == 320.0
    (tmp_path / "empty").mkdir()
    with pytest.raises(BoxesError, match="no <class>/<clip>/joint_positions.mat"):
        an.read_jhmdb(tmp_path / "empty")


def test_names_match_keys_by_path_then_by_stem_and_say_what_did_not():
    named = {n: VideoBoxes() for n in ("Basketball/v_a", "Other/v_b", "Fencing/v_c", "Fencing/v_d")}
    keys = ["Basketball/v_a.avi", "Basketball/v_a.mp4", "Renamed/v_b.avi", "Fencing/v_c.mkv"]
    matched, unmatched = an.match_keys(named, keys, ".avi")
    assert sorted(matched) == ["Basketball/v_a.avi", "Fencing/v_c.mkv", "Renamed/v_b.avi"]
    assert unmatched == ["Fencing/v_d"]
    matched, unmatched = an.match_keys(named, keys, None)  # two files of v_a: no guess without --ext
    assert "Basketball/v_a" in unmatched and "Renamed/v_b.avi" in matched
    assert sorted(an.match_keys(named, None, ".avi")[0]) == sorted(n + ".avi" for n in named)
