"""Stage one end to end: exact cache contents, resume, settings guard, one writer, bad input, kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.config import ExtractConfig
from pipeline.features import extractor
from pipeline.features.reader import open_cache
from pipeline.features.shards import pending_shards
from pipeline.video.decode import sample_indices
from pipeline.video.encode import Encoding, numbered_frames, read_frame_number, write_video
from stages import extract
from stages.extract import ExtractError, exclusive_lock
from tests.cli_helpers import run_cli
from tests.conftest import overstate_avi_frame_count

TINY = dict(weights="random:0", frames=6, image_size=64, batch_size=8, workers=2, timeout=20.0)


def cfg(**changes) -> ExtractConfig:
    return ExtractConfig(**{**TINY, **changes})


def test_cache_holds_one_row_per_clip_with_labels_indices_and_provenance(mini_dataset, tmp_path):
    cache = tmp_path / "f.h5"
    summary = extract.run(mini_dataset, cache, cfg(), progress=False)
    assert (summary.extracted, summary.failed) == (6, [])
    with open_cache(cache) as c:
        assert c.classes == ["jump", "run", "walk"]
        assert len(c) == 6 and c.feature_shape == (6, 512, 2, 2)
        assert [c.classes[i] for i in c.labels] == [v.split("/")[0] for v in c.videos]
        assert c.frame_index.tolist()[0] == [1, 3, 5, 7, 9, 11]
        assert c.attrs["weights"].startswith("random:0 sha256:")
        assert c.attrs["frames"] == 6 and c.attrs["image_size"] == 64 and c.attrs["format_version"] == 1
        assert set(c.attrs["versions"]) >= {"torch", "torchvision", "decord", "pipeline"}
        assert c.load().dtype == np.float16 and np.isfinite(c.load()).all()
    assert not list((tmp_path / "f.h5.parts").glob("*.h5"))


def test_the_cache_records_per_clip_whether_the_trunk_ran_compiled(mini_dataset, tmp_path, monkeypatch):
    import torch

    eager = tmp_path / "eager.h5"
    extract.run(mini_dataset, eager, cfg(), progress=False)  # 36 frames: auto stays eager
    walk = next((mini_dataset / "walk").iterdir())
    (mini_dataset / "walk" / f"more{walk.suffix}").write_bytes(walk.read_bytes())
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # compiling itself: tests/test_backbone.py
    extract.run(mini_dataset, eager, cfg(compile="on"), progress=False)  # the same cache, one clip more, compiled
    with open_cache(eager) as c:
        assert c.trunk == ["compiled" if v.startswith("walk/more") else "eager" for v in c.videos]


def test_stored_features_are_the_features_of_the_stored_frame_index(tmp_path):
    """Exactness end to end: re-embedding the frame named by frame_index reproduces the stored row."""
    import torch

    from pipeline.features.backbone import Backbone

    root = tmp_path / "videos"
    path = write_video(root / "count" / "b.avi", numbered_frames(45, 64, 96), enc=Encoding("mpeg4", "avi", 2))
    cache = tmp_path / "f.h5"
    extract.run(root, cache, cfg(), progress=False)
    backbone = Backbone("random:0", "pool5", 64, "cpu", "fp32")
    frames = numbered_frames(45, 64, 96)
    with open_cache(cache) as c:
        stored, index, decoder = c.load()[0].astype(np.float32), c.frame_index[0], c.decoder[0]
    from pipeline.video.decode import decode_frames_at

    decoded = decode_frames_at(path, index, decoder)  # 96 wide: decord gives garbage on some CPUs, PyAV then
    assert [read_frame_number(f) for f in decoded] == index.tolist()
    expected = backbone.embed(torch.from_numpy(decoded)).numpy()
    np.testing.assert_allclose(stored, expected, rtol=2e-2, atol=2e-2)
    wrong = backbone.embed(torch.from_numpy(frames[index.astype(int) + 1])).numpy()
    assert not np.allclose(stored, wrong, rtol=2e-2, atol=2e-2)


def test_rerun_skips_finished_clips_and_adds_new_ones_without_touching_old(mini_dataset, tmp_path):
    cache = tmp_path / "f.h5"
    extract.run(mini_dataset, cache, cfg(), progress=False)
    with open_cache(cache) as c:
        before = {v: c.load([i])[0] for i, v in enumerate(c.videos)}
    again = extract.run(mini_dataset, cache, cfg(), progress=False)
    assert (again.extracted, again.skipped) == (0, 6)
    write_video(mini_dataset / "walk" / "new.mp4", np.zeros((10, 48, 64, 3), np.uint8))
    write_video(mini_dataset / "zoom" / "first.mp4", np.zeros((10, 48, 64, 3), np.uint8))
    more = extract.run(mini_dataset, cache, cfg(), progress=False)
    assert (more.extracted, more.skipped) == (2, 6)
    with open_cache(cache) as c:
        assert c.classes == ["jump", "run", "walk", "zoom"] and len(c) == 8
        for video, feats in before.items():
            np.testing.assert_array_equal(c.load([c.indices([video])[0]])[0], feats)


@pytest.mark.parametrize("change", [dict(frames=5), *(pytest.param(c, marks=pytest.mark.slow) for c in (  # one key
    dict(image_size=96), dict(layer="conv5_3"), dict(weights="random:1")))])  # in the fast set, the others slow
def test_rerun_with_other_settings_refuses_unless_overwrite(mini_dataset, tmp_path, change):
    cache = tmp_path / "f.h5"
    extract.run(mini_dataset, cache, cfg(), progress=False)
    key = next(iter(change))
    with pytest.raises(ExtractError, match=f"other settings.*{'weights' if key == 'weights' else key}.*--overwrite"):
        extract.run(mini_dataset, cache, cfg(**change), progress=False)
    summary = extract.run(mini_dataset, cache, cfg(**change), overwrite=True, progress=False)
    assert summary.extracted == 6


def test_overwrite_with_the_same_settings_keeps_the_finished_clips(mini_dataset, tmp_path):
    """The DVC stage always passes --overwrite: a rerun after a code change or a crash must resume."""
    cache = tmp_path / "f.h5"
    extract.run(mini_dataset, cache, cfg(), progress=False)
    with open_cache(cache) as c:
        before = {v: c.load([i])[0] for i, v in enumerate(c.videos)}
    summary = extract.run(mini_dataset, cache, cfg(), overwrite=True, progress=False)
    assert (summary.extracted, summary.skipped) == (0, 6)
    with open_cache(cache) as c:
        assert sorted(c.videos) == sorted(before)
        for i, video in enumerate(c.videos):
            np.testing.assert_array_equal(c.load([i])[0], before[video])


def test_second_writer_on_the_same_cache_refuses(mini_dataset, tmp_path):
    cache = tmp_path / "f.h5"
    with exclusive_lock(cache):
        result = run_cli("extract", str(mini_dataset), str(cache), "--weights", "random:0", "--no-progress")
    assert result.returncode == 2
    assert "being written by pid" in result.stderr and "Traceback" not in result.stderr


def test_bad_inputs_are_recorded_with_reasons_and_cost_no_other_clip(tmp_path, numbered_video):
    root = tmp_path / "videos"
    good = root / "good"
    write_video(good / "ok.mp4", numbered_frames(20, 48, 64))
    write_video(good / "one_frame.avi", numbered_frames(1, 48, 64), enc=Encoding("mpeg4", "avi", 2))
    write_video(good / "odd_size.mkv", numbered_frames(9, 45, 67), enc=Encoding("libx264", "mkv", 0))
    write_video(good / "portrait.mp4", numbered_frames(9, 96, 48), rotation=90)
    write_video(good / "naïve café ñ.mp4", numbered_frames(9, 48, 64))
    over = overstate_avi_frame_count(numbered_video(Encoding("mpeg4", "avi", 2), count=20))
    (good / "overstated.avi").write_bytes(over.read_bytes())
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.mp4").write_bytes(b"")
    (bad / "text.avi").write_text("not a video at all\n" * 100)
    full = numbered_video(Encoding("libx264", "mp4", 2), count=60).read_bytes()
    (bad / "truncated.mp4").write_bytes(full[: len(full) // 3])  # MP4's index (moov) is at the end: unreadable
    streamed = numbered_video(Encoding("libx264", "mkv", 0), count=60).read_bytes()
    (good / "truncated.mkv").write_bytes(streamed[: len(streamed) // 2])  # MKV streams: the first frames decode
    (root / "nothing_here").mkdir()
    cache = tmp_path / "f.h5"
    result = run_cli("extract", str(root), str(cache), "--weights", "random:0", "--frames", "4", "--image-size", "32",
                     "--no-progress")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    with open_cache(cache) as c:
        failed = dict(c.failed)
        videos = set(c.videos)
    assert {f"good/{n}" for n in ("ok.mp4", "one_frame.avi", "odd_size.mkv", "portrait.mp4", "naïve café ñ.mp4",
                                  "overstated.avi", "truncated.mkv")} <= videos
    assert "empty file" in failed["bad/zero.mp4"]
    assert "not a readable video" in failed["bad/text.avi"]
    assert "no video" in failed["nothing_here/"]
    assert "not a readable video" in failed["bad/truncated.mp4"] and "bad/truncated.mp4" not in videos
    with open_cache(cache) as c:  # the truncated MKV is kept, cut at the last frame that decodes
        row = c.videos.index("good/truncated.mkv")
        assert 10 < c.num_frames[row] < 60
        assert c.frame_index[row].tolist() == sample_indices(int(c.num_frames[row]), 4).tolist()
    assert all(reason and "\n" not in reason for reason in failed.values())


@pytest.mark.slow  # fast form: tests/test_workers.py (a hanging task times out, alone)
def test_a_hanging_clip_is_recorded_as_timed_out(mini_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(extractor, "decode_task", _hang_on_jump)
    summary = extract.run(mini_dataset, tmp_path / "f.h5", cfg(timeout=5.0), progress=False)
    assert summary.extracted == 4
    assert {v for v, _ in summary.failed} == {"jump/clip0.avi", "jump/clip1.mp4"}
    assert all("timed out" in reason for _, reason in summary.failed)


def _hang_on_jump(task):
    if "/jump/" in task[0]:
        time.sleep(3600)
    return extractor.decode_task(task)


def test_strict_stops_at_the_first_failure_and_keeps_finished_clips(mini_dataset, tmp_path):
    (mini_dataset / "jump" / "zz_broken.mp4").write_bytes(b"garbage")
    cache = tmp_path / "f.h5"
    with pytest.raises(ExtractError, match="zz_broken.mp4.*--strict"):
        extract.run(mini_dataset, cache, cfg(workers=1), strict=True, progress=False)
    resumed = extract.run(mini_dataset, cache, cfg(), progress=False)
    assert resumed.extracted + resumed.skipped == 7


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_complete_cache_or_none_and_a_rerun_finishes(tmp_path):
    root = tmp_path / "videos"
    rng = np.random.default_rng(1)
    for c in range(3):
        for i in range(8):
            write_video(root / f"c{c}" / f"v{i}.mp4", rng.integers(0, 255, (16, 48, 64, 3), dtype=np.uint8))
    reference = tmp_path / "ref.h5"
    extract.run(root, reference, cfg(), progress=False)
    cache = tmp_path / "f.h5"
    args = [sys.executable, "-m", "pipeline", "extract", str(root), str(cache), "--weights", "random:0",
            "--frames", "6", "--image-size", "64", "--batch-size", "8", "--shard-clips", "2", "--no-progress",
            "--params", "/nonexistent/params.yaml"]
    # killed during start-up, then as soon as the run has written its first, second, ... shard of this run (each
    # rerun resumes: 24 clips are 12 shards); the last one may be past the join, with the cache in place
    for new_shards in (0, 1, 2, 3, 5):
        before = len(pending_shards(cache))
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while (time.monotonic() < deadline and proc.poll() is None and not cache.exists()
               and len(pending_shards(cache)) < before + new_shards):
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if cache.exists():
            with open_cache(cache) as c:  # complete and readable whenever it exists
                assert len(c) == len(c.videos) and c.load().shape[0] == len(c)
    final = run_cli("extract", str(root), str(cache), "--weights", "random:0", "--frames", "6", "--image-size", "64",
                    "--no-progress")
    assert final.returncode == 0, final.stderr
    with open_cache(cache) as c, open_cache(reference) as ref:
        assert c.videos == ref.videos
        np.testing.assert_allclose(c.load().astype(np.float32), ref.load().astype(np.float32), rtol=1e-2, atol=1e-2)
    assert not list(tmp_path.glob("f.h5.parts/*"))
