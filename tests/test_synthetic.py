"""The embedded default dataset: classes by the actor's straight-line heading, real encoded files, per-frame actor
boxes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

import pipeline
from pipeline.config import SynthConfig
from pipeline.video.encode import Encoding
from pipeline.video.synthetic import (
    BOXES_FILE,
    CLASSES,
    MOTIONS,
    SYNTH_ENCODINGS,
    actor_path,
    clip_key,
    clip_rng,
    generate_clip,
    generate_dataset,
    path_boxes,
    read_boxes,
)
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
# Screen terms, independent of the generator's constants: y points down, so "up" is (0, -1) and "right" (1, 0).
# Each class's expected heading as signs of (dx, dy) in picture coordinates.

SCREEN = {
    "move_right": (1, 0), "move_down_right": (1, 1), "move_down": (0, 1), "move_down_left": (-1, 1),
    "move_left": (-1, 0), "move_up_left": (-1, -1), "move_up": (0, -1), "move_up_right": (1, -1),
}


def heading(cls_name: str) -> np.ndarray:
    """The unit vector (2,) a class's name says the actor goes, on screen."""
    step = np.array(SCREEN[cls_name], dtype=np.float64)
    return step / np.linalg.norm(step)


def centres(boxes: np.ndarray) -> np.ndarray:
    """Box centres (T, 2) as float64."""
    boxes = boxes.astype(np.float64)
    return (boxes[:, :2] + boxes[:, 2:]) / 2


def radii(boxes: np.ndarray) -> np.ndarray:
    """Half the box width and height (T, 2) as float64: the actor's radius, twice."""
    boxes = boxes.astype(np.float64)
    return (boxes[:, 2:] - boxes[:, :2]) / 2


def test_eight_distinct_headings_45_degrees_apart_named_as_seen_on_screen():
    assert len(CLASSES) == 8 and len(set(CLASSES)) == 8
    assert set(CLASSES) == set(SCREEN)
    vectors = np.array([(MOTIONS[c].dx, MOTIONS[c].dy) for c in CLASSES], dtype=np.float64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-9)  # unit steps
    angles = np.sort(np.mod(np.degrees(np.arctan2(vectors[:, 1], vectors[:, 0])), 360))
    np.testing.assert_allclose(np.diff(np.append(angles, angles[0] + 360)), 45.0, atol=1e-6)  # evenly round
    for cls_name in CLASSES:  # and each name says where it goes
        np.testing.assert_allclose((MOTIONS[cls_name].dx, MOTIONS[cls_name].dy), heading(cls_name), atol=1e-9)


@pytest.mark.parametrize("cls_name, x_sign, y_sign", [
    ("move_up", 0, -1), ("move_down", 0, 1), ("move_left", -1, 0), ("move_right", 1, 0),
    ("move_down_left", -1, 1), ("move_down_right", 1, 1), ("move_up_left", -1, -1), ("move_up_right", 1, -1),
])
def test_the_boxes_go_where_the_name_says_on_screen(cls_name, x_sign, y_sign):
    """Up is towards row 0: move_up decreases y; move_down_left increases y and decreases x."""
    for index in range(5):
        _, boxes = generate_clip(cls_name, clip_rng(0, cls_name, index), 12, 48, 64)
        move = centres(boxes)[-1] - centres(boxes)[0]
        for sign, component in ((x_sign, move[0]), (y_sign, move[1])):
            if sign:
                assert sign * component > 10, (cls_name, move)
            else:
                assert abs(component) < 1e-3, (cls_name, move)


@pytest.mark.parametrize("cls_name", CLASSES)
def test_the_actor_moves_straight_along_its_heading_at_steady_speed_and_keeps_its_size(cls_name):
    direction = heading(cls_name)
    for height, width in ((48, 64), (64, 48), (120, 160)):
        short = min(height, width)
        for frames in (12, 5, 2):
            for index in range(6):
                _, boxes = generate_clip(cls_name, clip_rng(0, cls_name, index), frames, height, width)
                steps = np.diff(centres(boxes), axis=0)  # (T-1, 2)
                np.testing.assert_allclose(steps, np.broadcast_to(steps[0], steps.shape), atol=2e-3)  # steady
                length = np.linalg.norm(steps, axis=1)
                cos = steps @ direction / length
                assert np.all(cos > math.cos(1e-3)), (cls_name, steps[0])  # exactly along the heading
                travel = np.linalg.norm(centres(boxes)[-1] - centres(boxes)[0])
                assert 0.55 - 1e-4 <= travel / short <= 0.75 + 1e-4
                r = radii(boxes)
                np.testing.assert_allclose(r, r[0, 0], atol=1e-3)  # a round actor of one size all clip long
                assert 0.16 - 1e-4 <= r[0, 0] / (short / 2) <= 0.22 + 1e-4


def test_start_travel_and_radius_vary_between_clips_of_a_class():
    height, width = 96, 128
    for cls_name in CLASSES:
        paths = [actor_path(MOTIONS[cls_name], clip_rng(0, cls_name, i), 12, height, width) for i in range(16)]
        boxes = [path_boxes(p) for p in paths]
        starts = np.array([centres(b)[0] for b in boxes])
        travels = np.array([np.linalg.norm(centres(b)[-1] - centres(b)[0]) for b in boxes])
        sizes = np.array([radii(b)[0, 0] for b in boxes])
        assert starts[:, 0].std() > 2 and starts[:, 1].std() > 2, cls_name
        assert travels.std() > 0.02 * height, cls_name
        assert sizes.std() > 0.3, cls_name


@pytest.mark.parametrize("height, width", [
    (48, 64), (64, 48), (120, 160), (40, 200), (200, 40), (18, 18), (16, 16),  # 16: the smallest allowed
])
def test_the_actor_stays_inside_the_frame(height, width):
    for cls_name in CLASSES:
        for index in range(25):
            boxes = path_boxes(actor_path(MOTIONS[cls_name], clip_rng(0, cls_name, index), 16, height, width))
            assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= width) and np.all(boxes[:, 3] <= height)


def test_actor_path_gives_the_boxes_generate_clip_draws():
    _, boxes = generate_clip("move_down_left", clip_rng(0, "move_down_left", 1), 12, 48, 64)
    path = actor_path(MOTIONS["move_down_left"], clip_rng(0, "move_down_left", 1), 12, 48, 64)
    np.testing.assert_array_equal(path_boxes(path), boxes)


# --- what one frame shows is the same for every class ---------------------------------------------------

def test_over_many_clips_size_travel_and_spin_are_drawn_alike_for_every_class():
    """What a model without temporal memory could use (how big, how far, how much turning) ignores the class."""
    height, width, frames, clips = 120, 160, 12, 300
    short = min(height, width)
    stats = {}
    for cls_name in CLASSES:
        paths = np.stack([actor_path(MOTIONS[cls_name], clip_rng(0, cls_name, i), frames, height, width)
                          for i in range(clips)])  # (clips, T, 4)
        boxes = [path_boxes(p) for p in paths]
        stats[cls_name] = {
            "radius": np.array([radii(b)[0, 0] for b in boxes]) / (short / 2),
            "travel": np.array([np.linalg.norm(centres(b)[-1] - centres(b)[0]) for b in boxes]) / short,
            "spin": paths[:, -1, 3] - paths[:, 0, 3],  # the actor's own turn over the clip
        }
    for name in ("radius", "travel"):
        means = np.array([s[name].mean() for s in stats.values()])
        assert np.ptp(means) < 0.04 * means.mean(), name
        quantiles = np.array([np.quantile(s[name], (0.1, 0.5, 0.9)) for s in stats.values()])
        assert np.ptp(quantiles, axis=0).max() < 0.04 * means.mean(), name
        spread = np.array([s[name].std() for s in stats.values()])
        assert spread.min() > 0.5 * spread.max() > 0, name  # random, alike for every class

    amounts = np.array([np.abs(s["spin"]).mean() for s in stats.values()])
    assert np.ptp(amounts) < 0.08 * amounts.mean() and amounts.min() > 0.3  # it really spins, alike
    for cls_name, s in stats.items():
        clockwise = np.mean(s["spin"] > 0)
        assert 0.4 < clockwise < 0.6, cls_name  # both ways, about as often, in every class
        assert np.all(np.abs(s["spin"]) > 0.05), cls_name
    # Spin is unrelated to the heading: no correlation with either component of it.
    spin = np.concatenate([s["spin"] for s in stats.values()])
    for axis in (0, 1):
        component = np.repeat([heading(c)[axis] for c in stats], clips)
        assert abs(np.corrcoef(spin, component)[0, 1]) < 0.1
        assert abs(np.corrcoef(np.abs(spin), component)[0, 1]) < 0.1


def test_the_drawn_actor_covers_the_same_area_in_every_class():
    """Per frame, the red-dominant (actor) pixels: alike across classes, and steady within a clip."""
    height, width = 48, 64
    counts, fill = {}, {}
    for cls_name in CLASSES:
        per_clip, ratios = [], []
        for index in range(24):
            frames, boxes = generate_clip(cls_name, clip_rng(0, cls_name, index), 12, height, width)
            area = red_dominant(frames).sum(axis=(1, 2))  # (T,)
            assert area.max() <= 1.3 * area.min(), cls_name  # no class grows or shrinks
            per_clip.append(area)
            ratios.append(area / (math.pi * radii(boxes)[:, 0] ** 2))
        counts[cls_name], fill[cls_name] = np.concatenate(per_clip), np.concatenate(ratios)
    means = np.array([c.mean() for c in counts.values()])
    assert np.ptp(means) < 0.2 * means.mean()  # loose: the radius is random per clip
    medians = np.array([np.median(c) for c in counts.values()])
    assert np.ptp(medians) < 0.25 * medians.mean()
    fills = np.array([f.mean() for f in fill.values()])  # pixels per unit of disc area: the drawing itself
    assert 0.75 < fills.min() and fills.max() < 1.05 and np.ptp(fills) < 0.04


@pytest.mark.parametrize("cls_name", ["move_up_left", "move_right"])
def test_the_drawn_actor_turns_as_its_path_says(cls_name):
    path = actor_path(MOTIONS[cls_name], clip_rng(0, cls_name, 0), 12, 96, 128)
    frames, boxes = generate_clip(cls_name, clip_rng(0, cls_name, 0), 12, 96, 128, distractors=False, noise=False)
    assert abs(path[-1, 3] - path[0, 3]) > 0.3  # it does turn over the clip
    for image, box, angle in zip(frames, boxes, path[:, 3]):
        orange = (image[..., 0] > 150) & (image[..., 1] > 70) & (image[..., 2] < 50)  # the orange half
        y, x = np.nonzero(orange & disc_mask(box, 96, 128, 1.0))
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        facing = math.atan2(y.mean() + 0.5 - cy, x.mean() + 0.5 - cx)  # the orange half's side of the disc
        assert abs(math.remainder(facing - (angle + math.pi / 2), 2 * math.pi)) < 0.2


# --- boxes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls_name", CLASSES)
def test_the_actor_is_at_its_box_and_nowhere_else(cls_name):
    frames, boxes = generate_clip(cls_name, clip_rng(1, cls_name, 0), 12, 48, 64)
    for image, box in zip(frames, boxes):
        assert red_dominant(image)[disc_mask(box, 48, 64, 0.8)].mean() > 0.95
        assert red_dominant(image)[outside_box(box, 48, 64)].mean() == 0.0


def test_a_clean_render_is_the_same_clip_without_clutter():
    noisy_frames, noisy_boxes = generate_clip("move_down_right", clip_rng(0, "move_down_right", 2), 12, 48, 64)
    clean_frames, clean_boxes = generate_clip("move_down_right", clip_rng(0, "move_down_right", 2), 12, 48, 64,
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
    keys = ("move_left/clip_000.avi", "move_down/clip_001.mp4", "move_up_right/clip_003.mkv")
    assert keys == (clip_key("move_left", 0), clip_key("move_down", 1), clip_key("move_up_right", 3))
    for key in keys:
        covered = []
        for image, box in zip(decode(root / key), boxes[key]):  # lossy 64x48 (mpeg4 worst): allow some bleeding
            covered.append(red_dominant(image)[disc_mask(box, TINY.height, TINY.width, 0.6)].mean())
            assert covered[-1] > 0.5, key
            assert red_dominant(image)[outside_box(box, TINY.height, TINY.width)].mean() < 0.01, key
        assert np.mean(covered) > 0.85, key


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
    assert len(summary.codecs["move_up"]) == len(SYNTH_ENCODINGS)


# --- determinism ---------------------------------------------------------------------------------------

def test_the_same_seed_gives_the_same_boxes_and_pixels(tmp_path, dataset):
    root, _ = dataset
    again = tmp_path / "again"
    generate_dataset(again, TINY, classes=["move_right", "move_up_left"])
    assert read_boxes(again).keys() == {k for k in read_boxes(root) if k.startswith(("move_right/", "move_up_left/"))}
    for key, boxes in read_boxes(again).items():
        np.testing.assert_array_equal(boxes, read_boxes(root)[key])
        np.testing.assert_array_equal(decode(again / key), decode(root / key))


# Writes one clip in every synthetic encoding into folder argv[2] and prints each file's SHA-256; when
# argv[1] is not 0, on that many cores only.
_ENCODE_IN_A_FRESH_PROCESS = """
import hashlib, os, sys
cores = int(sys.argv[1])
if cores and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
from pathlib import Path
from pipeline.video.encode import write_video
from pipeline.video.synthetic import SYNTH_ENCODINGS, clip_rng, generate_clip
out = Path(sys.argv[2])
frames, _ = generate_clip("move_up", clip_rng(0, "move_up", 0), 8, 120, 160)  # 160x120: x264 slices it
for index, enc in enumerate(SYNTH_ENCODINGS):
    print(hashlib.sha256(write_video(out / f"{index}{enc.suffix}", frames, enc=enc).read_bytes()).hexdigest())
"""


def test_encoded_bytes_depend_on_the_frames_alone_not_on_the_heap_or_the_cores(tmp_path):
    """The same frames must give the same bytes whatever the process did before and however many cores it has.

    Both used to leak in: on AVX-512 CPUs x264's SIMD mbtree code reads heap memory it never wrote (so a
    dataset generated after other tests differed from one generated alone), and the slice-threaded encoders
    cut pictures into as many slices as there were cores. Two fresh processes whose heaps start out filled
    with different bytes, one on a single core, must write the same files.
    """
    checkout = Path(pipeline.__file__).parents[1]  # the children import the same code as this process
    runs = []
    for name, perturb, cores in (("a", 85, 1), ("b", 170, 0)):  # MALLOC_PERTURB_: glibc's fill for fresh memory
        (tmp_path / name).mkdir()
        argv = [sys.executable, "-c", _ENCODE_IN_A_FRESH_PROCESS, str(cores), str(tmp_path / name)]
        runs.append(subprocess.Popen(argv,
                                     cwd=checkout, env={**os.environ, "MALLOC_PERTURB_": str(perturb)},
                                     stdout=subprocess.PIPE, text=True))
    outputs = [run.communicate(timeout=120)[0].split() for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert len(outputs[0]) == len(SYNTH_ENCODINGS)
    assert [enc.label for enc, a, b in zip(SYNTH_ENCODINGS, *outputs) if a != b] == []  # other bytes, same frames


def test_another_seed_gives_other_clips(tmp_path, dataset):
    root, _ = dataset
    generate_dataset(tmp_path, SynthConfig(seed=4, clips_per_class=1, frames=12, width=64, height=48),
                     classes=["move_down_left"])
    assert not np.array_equal(read_boxes(tmp_path)["move_down_left/clip_000.avi"],
                              read_boxes(root)["move_down_left/clip_000.avi"])


@pytest.mark.parametrize("cfg, classes, message", [
    (SynthConfig(width=63), None, "even"),
    (SynthConfig(frames=1), None, "frames"),
    (SynthConfig(), ["jump"], "classes"),
    (SynthConfig(), ["cw_from_top"], "classes"),  # the old (orbit) classes are gone
    (SynthConfig(), ["right"], "classes"),
    (SynthConfig(), ["move_up", "move_up"], "distinct"),
])
def test_unusable_settings_are_a_one_line_error(tmp_path, cfg, classes, message):
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path, cfg, classes=classes)


# --- the stage -----------------------------------------------------------------------------------------

SMALL = SynthConfig(seed=0, clips_per_class=1, frames=4, width=32, height=32)
TWO = ["move_left", "move_up_right"]


def test_stage_writes_the_dataset_and_its_settings(tmp_path):
    summary = stage.run(tmp_path / "videos", SMALL, classes=TWO)
    manifest = json.loads((tmp_path / "videos" / stage.MANIFEST).read_text())
    assert manifest["settings"]["config"] == vars(SMALL)
    assert summary.counts == {"move_left": 1, "move_up_right": 1} and not summary.reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["videos"]  # no temporary folder left beside it


def test_two_builds_of_the_same_settings_are_the_same_bytes(tmp_path):
    """DVC hashes the files: a fresh clone's `dvc repro` must reproduce the committed lock, container
    headers (Matroska's random segment UID) and the manifest included."""
    cfg = SynthConfig(seed=0, clips_per_class=4, frames=4, width=32, height=32)  # 4 clips: every encoding
    stage.run(tmp_path / "a", cfg, classes=TWO)
    stage.run(tmp_path / "b", cfg, classes=TWO)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {p.suffix for p in files} >= {".mkv", ".mp4", ".avi", ".json"}
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_stage_rerun_with_the_same_settings_is_a_no_op(tmp_path):
    stage.run(tmp_path / "videos", SMALL, classes=TWO)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "videos").rglob("*")}
    summary = stage.run(tmp_path / "videos", SMALL, classes=TWO)
    assert summary.reused and summary.counts == {"move_left": 1, "move_up_right": 1}
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
    summary = stage.run(tmp_path / "videos", other, overwrite=True, classes=["move_down"])
    assert summary.counts == {"move_down": 2}
    assert sorted(p.name for p in (tmp_path / "videos").iterdir() if p.is_dir()) == ["move_down"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["videos"]


def test_stage_reports_missing_files_instead_of_trusting_the_settings(tmp_path):
    stage.run(tmp_path / "videos", SMALL, classes=TWO)
    next((tmp_path / "videos" / "move_up_right").iterdir()).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        stage.run(tmp_path / "videos", SMALL, classes=TWO)


def test_a_crash_mid_build_leaves_no_dataset_that_looks_complete(tmp_path, monkeypatch):
    def crash(root, *args, **kwargs):
        (Path(root) / "move_left").mkdir(parents=True)
        (Path(root) / "move_left" / "clip_000.avi").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(stage, "generate_dataset", crash)
    with pytest.raises(RuntimeError):
        stage.run(tmp_path / "videos", SMALL, classes=TWO)
    assert list(tmp_path.iterdir()) == []
