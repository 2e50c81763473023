"""The embedded default dataset: motion-defined classes, real encoded files, per-frame actor boxes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.config import SynthConfig
from pipeline.encode import Encoding
from pipeline.synthetic import (BOXES_FILE, CLASSES, MOTIONS, SYNTH_ENCODINGS, actor_path, clip_rng,
                                generate_clip, generate_dataset, read_boxes)
from stages import synth as stage

TINY = SynthConfig(seed=3, clips_per_class=4, frames=12, width=64, height=48)


def decode(path: Path) -> np.ndarray:
    """All frames (T, H, W, 3) of a file, decoded in order (exact whatever the codec)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def red_dominant(pixels: np.ndarray) -> np.ndarray:
    """The actor's characteristic colour: both its halves (orange, magenta) have red well above green and blue."""
    pixels = pixels.astype(np.int16)
    return pixels[..., 0] - np.maximum(pixels[..., 1], pixels[..., 2]) > 50


def disc_mask(box: np.ndarray, height: int, width: int, shrink: float) -> np.ndarray:
    """Pixels (H, W) whose centres lie within `shrink` times the radius of the disc the box encloses."""
    x0, y0, x1, y1 = box
    y, x = np.mgrid[0:height, 0:width] + 0.5
    return np.hypot(x - (x0 + x1) / 2, y - (y0 + y1) / 2) < shrink * (x1 - x0) / 2


def outside_box(box: np.ndarray, height: int, width: int, pad: float = 1.0) -> np.ndarray:
    x0, y0, x1, y1 = box
    y, x = np.mgrid[0:height, 0:width] + 0.5
    return (x < x0 - pad) | (x > x1 + pad) | (y < y0 - pad) | (y > y1 + pad)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("synth") / "videos"
    return root, generate_dataset(root, TINY)


# --- classes -------------------------------------------------------------------------------------------

def test_there_are_at_least_six_classes_each_one_motion():
    assert len(CLASSES) >= 6
    assert {"move_left", "move_right", "move_up", "move_down", "grow", "shrink"} <= set(CLASSES)
    assert len(set(MOTIONS.values())) == len(CLASSES)  # no two classes share a motion


@pytest.mark.parametrize("cls_name, axis, sign", [
    ("move_left", 0, -1), ("move_right", 0, 1), ("move_up", 1, -1), ("move_down", 1, 1),
])
def test_move_classes_carry_the_box_centre_the_named_way(cls_name, axis, sign):
    for index in range(5):
        _, boxes = generate_clip(cls_name, clip_rng(0, cls_name, index), 12, 48, 64)
        centre = (boxes[:, [0, 1]] + boxes[:, [2, 3]]) / 2  # (T, 2)
        travel = centre[-1] - centre[0]
        extent = (64, 48)[axis]
        assert sign * travel[axis] > 0.2 * extent
        assert abs(travel[1 - axis]) < 1e-3
        assert np.all(sign * np.diff(centre[:, axis]) > 0)


@pytest.mark.parametrize("cls_name, sign", [("grow", 1), ("shrink", -1)])
def test_grow_and_shrink_change_the_box_size_steadily(cls_name, sign):
    for index in range(5):
        _, boxes = generate_clip(cls_name, clip_rng(0, cls_name, index), 12, 48, 64)
        size = boxes[:, 2] - boxes[:, 0]
        assert np.all(sign * np.diff(size) > 0)
        assert max(size[0], size[-1]) > 1.3 * min(size[0], size[-1])


@pytest.mark.parametrize("cls_name, sign", [("rotate_cw", 1), ("rotate_ccw", -1)])
def test_rotate_classes_turn_the_actor_the_named_way_on_screen(cls_name, sign):
    frames, boxes = generate_clip(cls_name, clip_rng(0, cls_name, 0), 12, 96, 128, distractors=False, noise=False)
    turns = []
    for image, box in zip(frames, boxes):
        orange = (image[..., 0] > 150) & (image[..., 1] > 70) & (image[..., 2] < 50)  # the orange half
        y, x = np.nonzero(orange)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        turns.append(math.atan2(y.mean() + 0.5 - cy, x.mean() + 0.5 - cx))  # y points down: clockwise is +
    steps = np.diff(np.unwrap(turns))
    assert np.all(sign * steps > 0)
    assert sign * (np.unwrap(turns)[-1] - turns[0]) > math.pi * 0.9


def test_position_and_size_alone_do_not_tell_opposite_motions_apart():
    def mean_path(cls_name: str) -> np.ndarray:
        paths = [actor_path(MOTIONS[cls_name], clip_rng(0, cls_name, i), 12, 120, 160) for i in range(200)]
        return np.mean(paths, axis=(0, 1))  # mean cx, cy, radius over clips and frames

    left, right = mean_path("move_left"), mean_path("move_right")
    grow, shrink = mean_path("grow"), mean_path("shrink")
    assert abs(left[0] - right[0]) < 0.05 * 160
    assert abs(grow[2] - shrink[2]) < 0.05 * grow[2]


def test_start_position_and_size_vary_between_clips_of_a_class():
    starts = np.array([generate_clip("move_right", clip_rng(0, "move_right", i), 12, 48, 64)[1][0] for i in range(8)])
    assert starts[:, 0].std() > 2 and starts[:, 1].std() > 2
    assert (starts[:, 2] - starts[:, 0]).std() > 0.5


def test_the_actor_is_a_quarter_to_a_third_of_the_short_side():
    for cls_name in CLASSES:
        _, boxes = generate_clip(cls_name, clip_rng(0, cls_name, 0), 12, 120, 160)
        size = boxes[:, 2] - boxes[:, 0]
        assert 0.19 * 120 < size.mean() < 0.4 * 120


# --- boxes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls_name", CLASSES)
def test_the_actor_is_at_its_box_and_nowhere_else(cls_name):
    frames, boxes = generate_clip(cls_name, clip_rng(1, cls_name, 0), 12, 48, 64)
    for image, box in zip(frames, boxes):
        assert red_dominant(image)[disc_mask(box, 48, 64, 0.8)].mean() > 0.95
        assert red_dominant(image)[outside_box(box, 48, 64)].mean() == 0.0


def test_a_clean_render_is_the_same_clip_without_clutter():
    noisy_frames, noisy_boxes = generate_clip("grow", clip_rng(0, "grow", 2), 12, 48, 64)
    clean_frames, clean_boxes = generate_clip("grow", clip_rng(0, "grow", 2), 12, 48, 64,
                                              distractors=False, noise=False)
    np.testing.assert_array_equal(noisy_boxes, clean_boxes)
    inside = disc_mask(clean_boxes[0], 48, 64, 0.8)
    assert np.abs(noisy_frames[0][inside].astype(int) - clean_frames[0][inside]).max() <= 1


def test_boxes_file_has_one_box_per_frame_inside_the_frame(dataset):
    root, _ = dataset
    boxes = read_boxes(root)
    videos = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*") if p.is_file())
    assert sorted(boxes) == videos
    for value in boxes.values():
        assert value.shape == (TINY.frames, 4) and value.dtype == np.float32
        assert np.all(value[:, :2] >= 0) and np.all(value[:, 2] <= TINY.width) and np.all(value[:, 3] <= TINY.height)
        assert np.all(value[:, 2:] > value[:, :2])


def test_stored_boxes_match_the_actor_in_the_decoded_frames(dataset):
    root, _ = dataset
    boxes = read_boxes(root)
    for key in ("move_left/clip_000.avi", "grow/clip_001.mp4", "rotate_cw/clip_003.mkv"):
        for image, box in zip(decode(root / key), boxes[key]):  # lossy 64x48: allow some bleeding
            assert red_dominant(image)[disc_mask(box, TINY.height, TINY.width, 0.6)].mean() > 0.8
            assert red_dominant(image)[outside_box(box, TINY.height, TINY.width)].mean() < 0.01


def test_read_boxes_of_a_folder_without_them_is_empty(tmp_path):
    assert read_boxes(tmp_path) == {}


@pytest.mark.parametrize("text", [
    "{not json", '{"format": 99, "videos": {}}', '{"format": 1, "videos": {"a/b.avi": [1, 2]}}',
])
def test_read_boxes_of_a_malformed_file_is_a_clear_error(tmp_path, text):
    (tmp_path / BOXES_FILE).write_text(text)
    with pytest.raises(ValueError, match="boxes"):
        read_boxes(tmp_path)


# --- files ---------------------------------------------------------------------------------------------

def test_one_folder_per_class_with_the_asked_number_of_clips(dataset):
    root, summary = dataset
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(CLASSES)
    assert summary.counts == {c: TINY.clips_per_class for c in CLASSES}
    assert summary.files == len(CLASSES) * TINY.clips_per_class
    for cls_name in CLASSES:
        assert len(list((root / cls_name).iterdir())) == TINY.clips_per_class


def test_every_file_decodes_with_decord_to_the_asked_frames_and_size(dataset):
    import decord

    root, _ = dataset
    for key in read_boxes(root):
        reader = decord.VideoReader(str(root / key))
        frames = [reader[i].asnumpy() for i in range(len(reader))]  # in order: exact on B-frame streams
        assert len(frames) == TINY.frames, key
        assert frames[0].shape == (TINY.height, TINY.width, 3), key


def test_encodings_include_the_hard_decoding_cases():
    hard = {Encoding("mpeg4", "avi", 2), Encoding("libx264", "mp4", 2), Encoding("libx264", "avi", 0)}
    assert hard <= set(SYNTH_ENCODINGS)
    assert any(e.codec == "mpeg4" and e.container == "mkv" for e in SYNTH_ENCODINGS)


def codec_name(path: Path) -> str:
    with av.open(str(path)) as container:
        return container.streams.video[0].codec_context.name


def test_mpeg4_avi_files_really_hold_b_frames(dataset):
    root, _ = dataset
    mpeg4_avi = next(p for p in sorted(root.glob("*/*.avi")) if codec_name(p) == "mpeg4")
    with av.open(str(mpeg4_avi)) as container:
        kinds = {av.video.frame.PictureType(int(frame.pict_type)) for frame in container.decode(video=0)}
    assert av.video.frame.PictureType.B in kinds


def test_codecs_are_spread_evenly_so_they_never_hint_at_the_class(dataset):
    _, summary = dataset
    assert len({tuple(sorted(c.items())) for c in summary.codecs.values()}) == 1
    assert len(summary.codecs["grow"]) == len(SYNTH_ENCODINGS)


# --- determinism ---------------------------------------------------------------------------------------

def test_the_same_seed_gives_the_same_boxes_and_pixels(tmp_path, dataset):
    root, _ = dataset
    again = tmp_path / "again"
    generate_dataset(again, TINY, classes=["move_up", "rotate_ccw"])
    assert read_boxes(again).keys() == {k for k in read_boxes(root) if k.startswith(("move_up/", "rotate_ccw/"))}
    for key, boxes in read_boxes(again).items():
        np.testing.assert_array_equal(boxes, read_boxes(root)[key])
        np.testing.assert_array_equal(decode(again / key), decode(root / key))


def test_another_seed_gives_other_clips(tmp_path, dataset):
    root, _ = dataset
    generate_dataset(tmp_path, SynthConfig(seed=4, clips_per_class=1, frames=12, width=64, height=48), classes=["grow"])
    assert not np.array_equal(read_boxes(tmp_path)["grow/clip_000.avi"], read_boxes(root)["grow/clip_000.avi"])


@pytest.mark.parametrize("cfg, classes, message", [
    (SynthConfig(width=63), None, "even"),
    (SynthConfig(frames=1), None, "frames"),
    (SynthConfig(), ["jump"], "classes"),
])
def test_unusable_settings_are_a_one_line_error(tmp_path, cfg, classes, message):
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path, cfg, classes=classes)


# --- the stage -----------------------------------------------------------------------------------------

SMALL = SynthConfig(seed=0, clips_per_class=1, frames=4, width=32, height=32)
TWO = ["move_left", "grow"]


def test_stage_writes_the_dataset_and_its_settings(tmp_path):
    summary = stage.run(tmp_path / "videos", SMALL, classes=TWO)
    manifest = json.loads((tmp_path / "videos" / stage.MANIFEST).read_text())
    assert manifest["settings"]["config"] == vars(SMALL)
    assert summary.counts == {"move_left": 1, "grow": 1} and not summary.reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["videos"]  # no temporary folder left beside it


def test_stage_rerun_with_the_same_settings_is_a_no_op(tmp_path):
    stage.run(tmp_path / "videos", SMALL, classes=TWO)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "videos").rglob("*")}
    summary = stage.run(tmp_path / "videos", SMALL, classes=TWO)
    assert summary.reused and summary.counts == {"move_left": 1, "grow": 1}
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "videos").rglob("*")} == before


def test_stage_refuses_to_replace_a_different_dataset_without_overwrite(tmp_path):
    stage.run(tmp_path / "videos", SMALL, classes=TWO)
    with pytest.raises(ValueError, match="--overwrite"):
        stage.run(tmp_path / "videos", SynthConfig(seed=1, clips_per_class=1, frames=4, width=32, height=32),
                  classes=TWO)


def test_stage_refuses_to_write_over_other_files(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--overwrite"):
        stage.run(tmp_path / "videos", SMALL, classes=TWO)
    assert (tmp_path / "videos" / "notes.txt").read_text() == "mine"


def test_stage_overwrite_replaces_a_different_dataset(tmp_path):
    stage.run(tmp_path / "videos", SMALL, classes=TWO)
    other = SynthConfig(seed=0, clips_per_class=2, frames=4, width=32, height=32)
    summary = stage.run(tmp_path / "videos", other, overwrite=True, classes=["shrink"])
    assert summary.counts == {"shrink": 2}
    assert sorted(p.name for p in (tmp_path / "videos").iterdir() if p.is_dir()) == ["shrink"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["videos"]


def test_stage_reports_missing_files_instead_of_trusting_the_settings(tmp_path):
    stage.run(tmp_path / "videos", SMALL, classes=TWO)
    next((tmp_path / "videos" / "grow").iterdir()).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        stage.run(tmp_path / "videos", SMALL, classes=TWO)


def test_a_crash_mid_build_leaves_no_dataset_that_looks_complete(tmp_path, monkeypatch):
    def crash(root, *args, **kwargs):
        (Path(root) / "grow").mkdir(parents=True)
        (Path(root) / "grow" / "clip_000.avi").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(stage, "generate_dataset", crash)
    with pytest.raises(RuntimeError):
        stage.run(tmp_path / "videos", SMALL, classes=TWO)
    assert list(tmp_path.iterdir()) == []
