"""Reruns follow the dataset: gone files are dropped, replaced files re-extracted, unchanged ones cost nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.config import ExtractConfig
from pipeline.features.provenance import source_changed, source_fingerprint
from pipeline.features.reader import open_cache
from pipeline.features.shards import ClipFeatures, join, write_shard
from pipeline.video.encode import Encoding, write_video
from stages import extract

TINY = dict(weights="random:0", frames=6, image_size=64, batch_size=8, workers=2, timeout=20.0)


def cfg(**changes) -> ExtractConfig:
    return ExtractConfig(**{**TINY, **changes})


def run(root: Path, cache: Path, **kwargs) -> extract.ExtractSummary:
    return extract.run(root, cache, cfg(), progress=False, **kwargs)


def snapshot(cache: Path) -> dict[str, tuple[str, np.ndarray]]:
    """video -> (class name, features), read through the labels as every later stage does."""
    with open_cache(cache) as c:
        return {v: (c.classes[c.labels[i]], c.load([i])[0]) for i, v in enumerate(c.videos)}


def file_id(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def other_video(path: Path, seed: int) -> None:
    """Replace `path` by a different clip under the same name (same codec and container)."""
    frames = np.random.default_rng(seed).integers(0, 255, size=(12, 48, 64, 3), dtype=np.uint8)
    enc = {".avi": Encoding("mpeg4", "avi", 2), ".mp4": Encoding("libx264", "mp4", 2),
           ".mkv": Encoding("libx264", "mkv", 0)}[path.suffix]
    tmp = path.with_name("replacement" + path.suffix)
    write_video(tmp, frames, enc=enc)
    os.replace(tmp, path)


@pytest.mark.slow  # fast form: the leftover-shards and the old-cache tests check fingerprints too
def test_every_row_records_the_fingerprint_of_its_file(mini_dataset, tmp_path):
    cache = tmp_path / "f.h5"
    run(mini_dataset, cache)
    with open_cache(cache) as c:
        for video, source in zip(c.videos, c.source):
            assert source == source_fingerprint(mini_dataset / video)
            assert source.startswith("sha256:") and source_changed(source, mini_dataset / video) is False


@pytest.mark.slow  # fast form: the old-cache test (a rerun leaves the file alone), tests/test_extract.py's reruns
def test_unchanged_rerun_does_no_work_and_leaves_the_cache_file_alone(mini_dataset, tmp_path):
    cache = tmp_path / "f.h5"
    run(mini_dataset, cache)
    before = file_id(cache)
    again = run(mini_dataset, cache)
    assert (again.extracted, again.skipped, again.removed, again.changed) == (0, 6, 0, 0)
    assert file_id(cache) == before
    # Touched (and re-copied) files with the same bytes are unchanged: hashed again, still no rewrite.
    for path in mini_dataset.rglob("clip0.*"):
        shutil.copy(path, path.with_name("copy"))
        os.replace(path.with_name("copy"), path)
    touched = run(mini_dataset, cache)
    assert (touched.extracted, touched.removed, touched.changed) == (0, 0, 0)
    assert file_id(cache) == before
    assert not list(tmp_path.glob("f.h5.parts/*.h5")) and not (tmp_path / "f.h5.tmp").exists()


@pytest.mark.slow  # fast form: a removed class (below)
def test_a_removed_video_is_dropped_and_the_rest_kept_as_they_were(mini_dataset, tmp_path):
    cache = tmp_path / "f.h5"
    run(mini_dataset, cache)
    before = snapshot(cache)
    (mini_dataset / "run" / "clip1.mkv").unlink()
    summary = run(mini_dataset, cache)
    assert (summary.extracted, summary.removed, summary.changed, summary.total_clips) == (0, 1, 0, 5)
    after = snapshot(cache)
    assert set(after) == set(before) - {"run/clip1.mkv"}
    for video, (name, feats) in after.items():
        assert name == before[video][0] == video.split("/")[0]
        np.testing.assert_array_equal(feats, before[video][1])


def test_a_removed_class_vanishes_and_labels_still_name_the_right_class(mini_dataset, tmp_path):
    cache = tmp_path / "f.h5"
    run(mini_dataset, cache)
    before = snapshot(cache)
    shutil.rmtree(mini_dataset / "jump")  # the first class: every other label moves down by one
    summary = run(mini_dataset, cache)
    assert summary.removed == 2 and summary.total_clips == 4
    with open_cache(cache) as c:
        assert c.classes == ["run", "walk"]
        assert sorted(set(c.labels.tolist())) == [0, 1]
        assert [c.classes[i] for i in c.labels] == [v.split("/")[0] for v in c.videos]
    after = snapshot(cache)
    assert set(after) == {v for v in before if not v.startswith("jump/")}
    for video, (name, feats) in after.items():
        assert name == before[video][0]
        np.testing.assert_array_equal(feats, before[video][1])


@pytest.mark.slow  # fast form: the leftover-shards test (a changed file is extracted again there too)
def test_a_replaced_video_is_extracted_again_like_a_fresh_run(mini_dataset, tmp_path):
    cache = tmp_path / "f.h5"
    run(mini_dataset, cache)
    before = snapshot(cache)
    replaced = mini_dataset / "walk" / "clip0.mkv"
    other_video(replaced, seed=99)
    summary = run(mini_dataset, cache)
    assert (summary.extracted, summary.skipped, summary.changed, summary.removed) == (1, 5, 1, 0)
    after = snapshot(cache)
    fresh_cache = tmp_path / "fresh.h5"
    run(mini_dataset, fresh_cache)
    fresh = snapshot(fresh_cache)
    assert set(after) == set(fresh) == set(before)
    new = after["walk/clip0.mkv"][1].astype(np.float32)
    assert not np.allclose(new, before["walk/clip0.mkv"][1].astype(np.float32), rtol=1e-2, atol=1e-2)
    for video in fresh:
        assert after[video][0] == fresh[video][0]
        np.testing.assert_allclose(after[video][1].astype(np.float32), fresh[video][1].astype(np.float32),
                                   rtol=1e-2, atol=1e-2)
    with open_cache(cache) as c:
        assert c.source[c.indices(["walk/clip0.mkv"])[0]] == source_fingerprint(replaced)
    assert run(mini_dataset, cache).extracted == 0  # and the new fingerprint is current


@pytest.mark.slow  # fast form: tests/test_folder_cache.py's retry of a failure, the stale rules in the tests here
def test_failures_follow_their_files_too(mini_dataset, tmp_path):
    broken = mini_dataset / "jump" / "broken.mp4"
    broken.write_bytes(b"not a video")
    (mini_dataset / "later").mkdir()
    cache = tmp_path / "f.h5"
    first = run(mini_dataset, cache)
    assert {v for v, _ in first.failed} == {"jump/broken.mp4", "later/"}
    assert run(mini_dataset, cache).failed == []  # an unchanged failure is not retried
    other_video(broken, seed=5)  # fixed: a real video under the same name
    write_video(mini_dataset / "later" / "a.mp4", np.zeros((10, 48, 64, 3), np.uint8))
    fixed = run(mini_dataset, cache)
    assert fixed.extracted == 2 and fixed.changed == 1 and fixed.removed == 1 and fixed.failed == []
    with open_cache(cache) as c:
        assert {"jump/broken.mp4", "later/a.mp4"} <= set(c.videos) and c.failed == []
    (mini_dataset / "walk" / "bad.avi").write_text("garbage")
    assert {v for v, _ in run(mini_dataset, cache).failed} == {"walk/bad.avi"}
    (mini_dataset / "walk" / "bad.avi").unlink()
    gone = run(mini_dataset, cache)
    assert gone.removed == 1
    with open_cache(cache) as c:
        assert c.failed == [] and c.failed_source == []


def test_stale_rows_in_leftover_shards_are_dropped_and_new_ones_kept(mini_dataset, tmp_path):
    """Work left in shards by an interrupted run is checked like the cache itself."""
    cache = tmp_path / "f.h5"
    run(mini_dataset, cache)
    with open_cache(cache) as c:
        settings, classes = c.settings, c.classes
        rows = [ClipFeatures(v, classes[c.labels[i]], c.load([i])[0], c.frame_index[i], int(c.num_frames[i]),
                             float(c.fps[i]), int(c.height[i]), int(c.width[i]), c.source[i])
                for i, v in enumerate(c.videos) if v.startswith("run/")]
    write_shard(tmp_path / "f.h5.parts", rows, [], settings)  # as if a killed run had redone "run/"
    (mini_dataset / "run" / "clip1.mkv").unlink()
    other_video(mini_dataset / "run" / "clip0.mp4", seed=7)
    # A killed run that already re-extracted a replaced file: its shard row is current and is kept.
    redone = mini_dataset / "walk" / "clip1.avi"
    other_video(redone, seed=8)
    marker = ClipFeatures("walk/clip1.avi", "walk", np.full_like(rows[0].features, 7), rows[0].frame_index, 12,
                          25.0, 48, 64, source_fingerprint(redone))
    write_shard(tmp_path / "f.h5.parts", [marker], [], settings)
    summary = run(mini_dataset, cache)
    assert (summary.extracted, summary.removed, summary.changed, summary.total_clips) == (1, 1, 2, 5)
    with open_cache(cache) as c:
        assert "run/clip1.mkv" not in c
        assert c.source[c.indices(["run/clip0.mp4"])[0]] == source_fingerprint(mini_dataset / "run" / "clip0.mp4")
        assert (c.load(c.indices(["walk/clip1.avi"]))[0] == 7).all()
        assert [c.classes[i] for i in c.labels] == [v.split("/")[0] for v in c.videos]
    assert not list(tmp_path.glob("f.h5.parts/*.h5"))


def test_join_drops_only_the_named_stale_entries(tmp_path):
    settings = dict(backbone="vgg16", layer="pool5", weights="w", image_size=8, frames=2, sampling="s",
                    mean=[0, 0, 0], std=[1, 1, 1], dtype="float16")

    def row(key: str, value: float, source: str) -> ClipFeatures:
        return ClipFeatures(key, key.split("/")[0], np.full((2, 4, 1, 1), value, np.float16),
                            np.arange(2, dtype=np.int32), 2, 25.0, 8, 8, source)

    parts, cache = tmp_path / "f.h5.parts", tmp_path / "f.h5"
    write_shard(parts, [row("a/1", 1, "old"), row("b/1", 2, "b")], [("c/1", "bad")], settings, ["c-old"])
    write_shard(parts, [row("a/1", 3, "new")], [], settings)
    result = join(cache, parts, settings, drop={("a/1", "old"), ("b/1", "b"), ("c/1", "c-old")})
    assert (result.clips, result.failed, result.classes) == (1, 0, ["a"])
    with open_cache(cache) as c:
        assert c.videos == ["a/1"] and c.source == ["new"] and c.classes == ["a"] and c.labels.tolist() == [0]
        assert float(c.load()[0].max()) == 3


def test_an_old_cache_without_fingerprints_still_loads_and_resumes(mini_dataset, tmp_path):
    cache = tmp_path / "f.h5"
    run(mini_dataset, cache)
    with h5py.File(cache, "r+") as h5:  # what the earlier code wrote: no source datasets
        del h5["source"], h5["failed_source"]
    before = snapshot(cache)
    with open_cache(cache) as c:
        assert c.source == [""] * 6 and len(c) == 6
    stamp = file_id(cache)
    same = run(mini_dataset, cache)
    assert (same.extracted, same.skipped, same.changed, same.unverified) == (0, 6, 0, 6)
    assert file_id(cache) == stamp  # not rewritten just to add fingerprints
    write_video(mini_dataset / "walk" / "new.mp4", np.zeros((10, 48, 64, 3), np.uint8))
    (mini_dataset / "jump" / "clip1.mp4").unlink()
    more = run(mini_dataset, cache)
    assert (more.extracted, more.skipped, more.removed, more.total_clips, more.unverified) == (1, 5, 1, 6, 5)
    with open_cache(cache) as c:
        assert c.source[c.indices(["walk/new.mp4"])[0]].startswith("sha256:")
        assert [c.classes[i] for i in c.labels] == [v.split("/")[0] for v in c.videos]
    after = snapshot(cache)
    for video, (name, feats) in after.items():
        if video in before:
            assert name == before[video][0]
            np.testing.assert_array_equal(feats, before[video][1])


@pytest.mark.parametrize("change", ["content", "same size"])
def test_source_changed_looks_at_content_not_just_the_stat(tmp_path, change):
    path = tmp_path / "v.bin"
    path.write_bytes(b"a" * 1000)
    recorded = source_fingerprint(path)
    assert source_changed(recorded, path) is False and source_changed("", path) is None
    path.write_bytes(b"b" * (1000 if change == "same size" else 999))
    assert source_changed(recorded, path) is True
    path.unlink()
    assert source_changed(recorded, path) is True


@pytest.mark.slow  # fast form: the same counts in process (leftover shards, a removed class, the old cache)
def test_the_cli_summary_reports_stale_entries(mini_dataset, tmp_path):
    cache = tmp_path / "f.h5"
    run(mini_dataset, cache)
    (mini_dataset / "walk" / "clip1.avi").unlink()
    other_video(mini_dataset / "run" / "clip0.mp4", seed=3)
    result = subprocess.run([sys.executable, "-m", "pipeline", "extract", str(mini_dataset), str(cache), "--weights",
                             "random:0", "--frames", "6", "--image-size", "64", "--no-progress", "--params",
                             "/nonexistent/params.yaml"], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, COLUMNS="100"))
    assert result.returncode == 0, result.stderr
    assert "stale: 1 dropped (file gone), 1 re-extracted (file changed)" in result.stdout
