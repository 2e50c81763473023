"""The cache past one file: a folder of immutable shards plus index.h5, read and written like the one-file form."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.config import EvaluateConfig, ExtractConfig, HeadConfig, RenderConfig, SplitConfig, TrainConfig
from pipeline.features import shards as shards_module
from pipeline.features.cache import CacheError, FeatureCache, is_folder, main_file
from pipeline.features.plan import exclusive_lock, parts_dir_for, rerun_plan
from pipeline.features.reader import FolderCache, open_cache
from pipeline.features.shards import ClipFeatures, pending_shards, shard_paths, write_shard
from pipeline.video.encode import Encoding, write_video
from pipeline.video.folders import discover
from stages import evaluate, extract, info, render, split, train
from tests.cli_helpers import run_cli
from tests.test_extract_stale import other_video

SMALL = dict(weights="random:0", frames=4, image_size=32, layer="conv5_3", batch_size=8, workers=1, timeout=30.0,
             device="cpu")
META = ("videos", "classes", "frame_index", "num_frames", "fps", "height", "width", "source", "decoder",
        "precision", "failed", "failed_source")


def run(root: Path, cache: Path, shard_clips: int = 32, **kwargs) -> extract.ExtractSummary:
    return extract.run(root, cache, ExtractConfig(**SMALL, shard_clips=shard_clips), progress=False, **kwargs)


def same_reads(a: FeatureCache, b: FeatureCache, exact: bool = True) -> None:
    for name in META:
        got, want = getattr(a, name), getattr(b, name)
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            assert got == want, name
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.feature_shape == b.feature_shape and a.settings == b.settings
    assert a.precision_summary == b.precision_summary
    assert a.features.shape == b.features.shape and a.features.dtype == b.features.dtype
    compare = np.testing.assert_array_equal if exact else \
        (lambda x, y: np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=1e-2, atol=1e-2))
    compare(a.load(), b.load())
    shuffled = np.random.default_rng(0).permutation(len(b))[: max(1, len(b) - 1)]
    compare(a.load(shuffled), b.load(shuffled))


def file_ids(folder: Path) -> dict[str, tuple[int, int, str]]:
    """shard name -> (inode, mtime_ns, sha256 of its bytes)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in shard_paths(folder)}


def add_clip(path: Path, seed: int) -> None:
    frames = np.random.default_rng(seed).integers(0, 255, size=(12, 48, 64, 3), dtype=np.uint8)
    write_video(path, frames, enc=Encoding("libx264", "mp4", 2))


# --- the form rule ------------------------------------------------------------------------------------


def test_the_path_chooses_the_form_and_a_folder_without_index_is_a_clear_error(tmp_path):
    assert not is_folder(tmp_path / "features.h5") and not is_folder(tmp_path / "features.HDF5")
    assert is_folder(tmp_path / "features") and is_folder(tmp_path / "cache.v2")
    (tmp_path / "made.h5").mkdir()
    assert is_folder(tmp_path / "made.h5")  # an existing folder is a folder, whatever its name
    (tmp_path / "plain").write_bytes(b"")
    assert not is_folder(tmp_path / "plain")  # an existing file is a file
    assert main_file(tmp_path / "features") == tmp_path / "features" / "index.h5"
    assert parts_dir_for(tmp_path / "features") == tmp_path / "features"
    assert parts_dir_for(tmp_path / "features.h5") == tmp_path / "features.h5.parts"
    for folder in (tmp_path / "features", tmp_path / "made.h5"):
        with pytest.raises(CacheError, match="index.h5"):
            open_cache(folder)
    settings = {"frames": 2, "dtype": "float16"}
    write_shard(tmp_path / "made.h5", [ClipFeatures("a/1", "a", np.zeros((2, 4, 1, 1), np.float16),
                                                     np.arange(2, dtype=np.int32), 2, 25.0, 8, 8)], [], settings)
    with pytest.raises(CacheError, match="not a feature cache yet"):
        open_cache(tmp_path / "made.h5")  # shards but no index: not a cache until a run finishes it


def test_the_lock_is_beside_the_folder(tmp_path):
    with exclusive_lock(tmp_path / "features"):
        assert (tmp_path / "features.lock").exists()
    assert not (tmp_path / "features").exists()


# --- same reads ---------------------------------------------------------------------------------------


def test_folder_and_file_of_the_same_clips_read_the_same(mini_dataset, tmp_path):
    (mini_dataset / "jump" / "broken.mp4").write_bytes(b"not a video")
    file, folder = tmp_path / "f.h5", tmp_path / "features"
    run(mini_dataset, file, shard_clips=2)
    summary = run(mini_dataset, folder, shard_clips=2)
    assert (summary.extracted, summary.total_clips, summary.total_failed) == (6, 6, 1)
    assert not (tmp_path / "features.parts").exists() and (folder / "index.h5").exists()
    assert len(shard_paths(folder)) >= 3 and not list(folder.glob("*.tmp"))
    with open_cache(folder) as a, open_cache(file) as b:
        assert isinstance(a, FolderCache) and type(b) is FeatureCache
        same_reads(a, b)
        # the dataset root is recorded relative to the file that holds it (the index one folder deeper)
        assert {k: v for k, v in a.attrs.items() if k not in ("created", "feature_shape", "dataset_root")} == \
            {k: v for k, v in b.attrs.items() if k not in ("created", "dataset_root")}
        assert a.dataset_root == b.dataset_root == mini_dataset
        assert a.failed == [("jump/broken.mp4", a.failed[0][1])] and len(a) == 6
        np.testing.assert_array_equal(a.features[2], b.features[2])
        np.testing.assert_array_equal(a.features[-1], b.features[-1])
        np.testing.assert_array_equal(a.features[1:4], b.features[1:4])
        np.testing.assert_array_equal(a.features[()], b.features[()])
        assert a.indices(b.videos[::-1]).tolist() == b.indices(b.videos[::-1]).tolist()
        with pytest.raises(CacheError, match="no clip"):
            a.indices(["nope"])
    with open_cache(folder) as a:  # close() before any read, and a shard opened only on first read
        assert a._handles == {}
        a.load([0])
        assert len(a._handles) == 1
    assert run(mini_dataset, folder).extracted == 0  # an unchanged rerun leaves the index alone
    reported, expected = info.run(folder), info.run(file)
    for key in ("clips", "classes", "failed", "feature_shape", "per_class"):
        assert reported[key] == expected[key], key
    assert reported["bytes"] == sum(p.stat().st_size for p in folder.iterdir())


def test_retry_failed_and_overwrite_on_a_folder(mini_dataset, tmp_path):
    (mini_dataset / "jump" / "broken.mp4").write_bytes(b"not a video")
    folder = tmp_path / "features"
    run(mini_dataset, folder)
    retried = run(mini_dataset, folder, retry_failed=True)
    assert (retried.extracted, retried.skipped, [v for v, _ in retried.failed]) == (0, 6, ["jump/broken.mp4"])
    with open_cache(folder) as c:
        assert [v for v, _ in c.failed] == ["jump/broken.mp4"] and len(c) == 6
        assert set(c.shards) == {p.name for p in shard_paths(folder)}  # the superseded failure's shard is gone
    other = ExtractConfig(**dict(SMALL, image_size=64))
    with pytest.raises(extract.ExtractError, match="other settings"):
        extract.run(mini_dataset, folder, other, progress=False)
    redone = extract.run(mini_dataset, folder, other, overwrite=True, progress=False)
    assert redone.extracted == 6
    with open_cache(folder) as c:
        assert c.settings["image_size"] == 64 and c.feature_shape[-1] == 4
        assert set(c.shards) == {p.name for p in shard_paths(folder)}


# --- adding, dropping ---------------------------------------------------------------------------------


def test_adding_clips_writes_only_new_shards_and_old_labels_map_through_the_index(mini_dataset, tmp_path):
    folder = tmp_path / "features"
    run(mini_dataset, folder, shard_clips=2)
    before_ids = file_ids(folder)
    with open_cache(folder) as c:
        before = {v: c.load([i])[0] for i, v in enumerate(c.videos)}
    add_clip(mini_dataset / "run" / "clip2.mp4", 1)  # an existing class
    add_clip(mini_dataset / "aaa" / "clip0.mp4", 2)  # a new class, sorted first: every global label moves
    summary = run(mini_dataset, folder)
    assert (summary.extracted, summary.skipped, summary.total_clips) == (2, 6, 8)
    after_ids = file_ids(folder)
    assert {k: after_ids[k] for k in before_ids} == before_ids  # old shards untouched: same inode, mtime, bytes
    assert len(after_ids) == len(before_ids) + 1
    with open_cache(folder) as c:
        assert c.classes == ["aaa", "jump", "run", "walk"]
        assert [c.classes[i] for i in c.labels] == [v.split("/")[0] for v in c.videos]
        for video, feats in before.items():
            np.testing.assert_array_equal(c.load(c.indices([video]))[0], feats)
    for name in before_ids:  # each old shard keeps its own classes and label numbers
        with h5py.File(folder / name, "r") as h5:
            assert "aaa" not in h5.attrs["classes"]
    fresh = tmp_path / "fresh.h5"
    run(mini_dataset, fresh)
    with open_cache(folder) as a, open_cache(fresh) as b:
        same_reads(a, b, exact=False)


def test_removed_and_changed_clips_leave_the_index_and_an_unreferenced_shard_is_deleted(mini_dataset, tmp_path):
    folder = tmp_path / "features"
    run(mini_dataset, folder, shard_clips=2)
    with open_cache(folder) as c:
        by_shard: dict[str, list[str]] = {}
        for i, v in enumerate(c.videos):
            by_shard.setdefault(c.shards[c.shard[i]], []).append(v)
    emptied, (gone, changed) = next((name, vs) for name, vs in by_shard.items() if len(vs) == 2)
    kept = {name: ids for name, ids in file_ids(folder).items() if name != emptied}
    saved = tmp_path / "saved.h5"
    shutil.copy(folder / emptied, saved)
    (mini_dataset / gone).unlink()
    other_video(mini_dataset / changed, seed=11)
    summary = run(mini_dataset, folder)
    assert (summary.extracted, summary.removed, summary.changed, summary.total_clips) == (1, 1, 1, 5)
    assert not (folder / emptied).exists()  # none of its rows is referenced any more
    now = file_ids(folder)
    assert {k: now[k] for k in kept} == kept and len(now) == len(kept) + 1
    fresh = tmp_path / "fresh.h5"
    run(mini_dataset, fresh)
    with open_cache(folder) as a, open_cache(fresh) as b:
        assert gone not in a and emptied in a.retired and emptied not in a.shards
        same_reads(a, b, exact=False)
    # A crash between the new index and the deletion left the retired shard: it is not read back (the gone
    # clip stays gone, the old version of the changed one stays replaced) and the next run deletes it.
    shutil.copy(saved, folder / emptied)
    assert pending_shards(folder) == []
    plan = rerun_plan(folder, discover(mini_dataset), open_cache(fresh).settings, retry_failed=False)
    assert gone not in plan.done and not plan.drop
    again = run(mini_dataset, folder)
    assert (again.extracted, again.removed, again.changed, again.total_clips) == (0, 0, 0, 5)
    assert not (folder / emptied).exists()
    with open_cache(folder) as a, open_cache(fresh) as b:
        same_reads(a, b, exact=False)


# --- crash safety -------------------------------------------------------------------------------------


def test_a_crash_before_the_index_keeps_the_previous_index_and_the_rerun_finishes_the_work(mini_dataset, tmp_path,
                                                                                           monkeypatch):
    aside = tmp_path / "walk"
    shutil.move(mini_dataset / "walk", aside)
    folder = tmp_path / "features"
    run(mini_dataset, folder)
    with open_cache(folder) as c:
        first = (list(c.videos), c.load())
    shutil.move(aside, mini_dataset / "walk")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the index")

    monkeypatch.setattr(shards_module, "write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        run(mini_dataset, folder)
    monkeypatch.undo()
    (folder / "index.h5.tmp").write_bytes(b"half an index")  # what a kill -9 inside the index write leaves
    with open_cache(folder) as c:  # the previous complete index, as if nothing had happened
        assert c.videos == first[0]
        np.testing.assert_array_equal(c.load(), first[1])
    assert len(pending_shards(folder)) == 1  # the new clips, renamed in place but not indexed yet
    summary = run(mini_dataset, folder)
    assert (summary.extracted, summary.skipped, summary.total_clips) == (0, 6, 6)  # nothing extracted twice
    assert not list(folder.glob("*.tmp")) and pending_shards(folder) == []
    whole = tmp_path / "whole"
    run(mini_dataset, whole)
    with open_cache(folder) as a, open_cache(whole) as b:
        same_reads(a, b, exact=False)


@pytest.mark.slow
def test_kill_9_leaves_the_previous_index_and_a_rerun_finishes(tmp_path):
    root = tmp_path / "videos"
    rng = np.random.default_rng(1)
    for i in range(4):
        write_video(root / "c0" / f"v{i}.mp4", rng.integers(0, 255, (16, 48, 64, 3), dtype=np.uint8))
    folder = tmp_path / "features"
    run(root, folder)
    with open_cache(folder) as c:
        first = list(c.videos)
    for c in (1, 2):
        for i in range(4):
            write_video(root / f"c{c}" / f"v{i}.mp4", rng.integers(0, 255, (16, 48, 64, 3), dtype=np.uint8))
    reference = tmp_path / "ref.h5"
    run(root, reference)
    options = ["--weights", "random:0", "--frames", "4", "--image-size", "32", "--layer", "conv5_3", "--workers", "1",
               "--shard-clips", "2", "--no-progress"]
    args = [sys.executable, "-m", "pipeline", "extract", str(root), str(folder), *options, "--params",
            "/nonexistent/params.yaml"]
    env = dict(os.environ)
    for kill_at in (0, 1, 2):  # during start-up, then as soon as the run has renamed a shard into the folder
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 120.0  # kill_at 0: killed at once, no wait
        while time.monotonic() < deadline and proc.poll() is None and len(pending_shards(folder)) < kill_at:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        with open_cache(folder) as c:  # the previous complete index
            assert c.videos == first and c.load().shape[0] == len(first)
        assert len(pending_shards(folder)) >= kill_at  # renamed into the folder, not indexed yet
    final = run_cli("extract", str(root), str(folder), *options)
    assert final.returncode == 0, final.stderr
    with open_cache(folder) as a, open_cache(reference) as b:
        same_reads(a, b, exact=False)
        assert set(a.shards) == {p.name for p in shard_paths(folder)}
    assert not list(folder.glob("*.tmp")) and pending_shards(folder) == []


# --- the stages after extract ---------------------------------------------------------------------------


@pytest.mark.slow  # fast form: test_folder_and_file_of_the_same_clips_read_the_same (the stages read through it)
def test_split_train_and_evaluate_run_on_a_folder_cache_as_on_the_file(tiny_project, tmp_path):
    folder = tmp_path / "features"
    extract.run(tiny_project["videos"], folder,
                ExtractConfig(weights="random:0", frames=6, image_size=64, layer="conv5_3", batch_size=24, workers=2,
                              timeout=30.0, device="cpu", shard_clips=5), progress=False)
    assert len(shard_paths(folder)) == 3
    with open_cache(folder) as a, open_cache(tiny_project["cache"]) as b:
        same_reads(a, b, exact=False)
    splits = tmp_path / "splits"
    split.run(folder, splits, SplitConfig(seed=0, val=0.25, test=0.25))
    for name in ("train", "val", "test"):
        assert (splits / f"{name}.txt").read_text() == (tiny_project["splits"] / f"{name}.txt").read_text()
    cfg = TrainConfig(epochs=2, batch_size=4, device="cpu")
    models = {}
    for label, cache in (("folder", folder), ("file", tiny_project["cache"])):
        out = tmp_path / label
        train.run(cache, splits, out / "head.pt", HeadConfig(channels=8), cfg, metrics_path=out / "train.json",
                  plots_dir=out / "plots", progress=False)
        models[label] = out / "head.pt"
    report = evaluate.run(folder, splits, models["folder"], tmp_path / "eval",
                          EvaluateConfig(split="test", device="cpu"), plots_dir=tmp_path / "eval" / "plots",
                          progress=False)
    assert (tmp_path / "eval" / "eval.json").exists() and report
    rendered = render.run(folder, models["folder"], tmp_path / "report",
                          RenderConfig(per_class=1, strip_frames=4, device="cpu"), splits_dir=splits,
                          metrics_dir=tmp_path / "eval", train_plots=tmp_path / "folder" / "plots", progress=False)
    assert (tmp_path / "report" / "index.html").exists() and rendered
    import torch

    a, b = (torch.load(models[k], map_location="cpu", weights_only=True)["state_dict"] for k in ("folder", "file"))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-3)
