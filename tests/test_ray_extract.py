"""`extract --engine ray` (pipeline/features/ray_extract.py) against the local engine, on the 2-core CI box.

One Ray for the module's slow tests (`ray.init(num_cpus=2)`, ~5 s); each run still starts its backbone actor (~5-8 s: a
worker process importing torch). The CLI tests start their own Ray in the subprocess (--ray-cpus 2); the
kill -9 test also checks what a killed driver leaves running, and kills whatever it left at the end.
Skipped when Ray is not installed (the `[ray]` extra).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from pipeline.config import ExtractConfig  # noqa: E402
from pipeline.engines.ray_extract import plan_resources  # noqa: E402
from pipeline.features.cache import main_file  # noqa: E402
from pipeline.features.reader import open_cache  # noqa: E402
from pipeline.features.shards import pending_shards  # noqa: E402
from stages import extract  # noqa: E402
from tests.cli_helpers import run_cli  # noqa: E402
from tests.ray_slow_actor import actor_waiting_to_be_killed  # noqa: E402

# Ray's own DataContext copies touch its deprecated fields (ray/data/context.py warns on every set): not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
# The tests that run Ray are slow and run beside the module's Ray (as they always have, the CLI ones too); the
# rest (sizing, the actor's body called directly, one-line errors) are in the fast set.
TINY = dict(weights="random:0", frames=4, image_size=32, layer="conv5_3", workers=1, device="cpu", batch_size=8,
            timeout=30.0)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    yield
    ray.shutdown()


def cfg(**settings) -> ExtractConfig:
    return ExtractConfig(**TINY | settings)


def contents(cache: Path) -> dict:
    with open_cache(cache) as c:
        feats = c.load()
        return {v: dict(label=c.classes[c.labels[i]], frame_index=c.frame_index[i].tolist(),
                        num_frames=int(c.num_frames[i]), source=c.source[i], decoder=c.decoder[i],
                        features=feats[i]) for i, v in enumerate(c.videos)} | {"failed": sorted(c.failed)}


def assert_same_cache(got: Path, want: Path) -> bool:
    """Same clips, labels, indices, metadata; features within float16 tolerance. Returns bitwise equality."""
    a, b = contents(got), contents(want)
    assert a.pop("failed") == b.pop("failed")
    assert sorted(a) == sorted(b)
    bitwise = True
    for video in b:
        fa, fb = a[video].pop("features"), b[video].pop("features")
        assert a[video] == b[video], video
        np.testing.assert_allclose(fa.astype(np.float32), fb.astype(np.float32), rtol=1e-2, atol=1e-3)
        bitwise &= np.array_equal(fa, fb)
    return bitwise


def test_sizing_never_gives_the_actors_every_cpu():
    for cpus in (1, 2, 3, 4, 8, 16, 64):
        r = plan_resources(cpus)
        assert r.actors * r.actor_cpus + r.decode_cpus <= cpus and r.decoders >= 1, (cpus, r)
    assert plan_resources(2) == plan_resources(2.0) and plan_resources(2).actor_cpus == 1
    g = plan_resources(16, gpus=4)
    assert (g.actors, g.actor_gpus, g.decoders) == (4, 1, 12)


def test_a_clip_the_backbone_cannot_take_is_its_own_failure_not_the_batchs():
    from pipeline.engines.ray_operators import BackboneActor, _column

    actor = BackboneActor("random:0", "conv5_3", 32, "cpu", "auto", batch_size=8, threads=1)
    good = np.random.default_rng(0).integers(0, 255, size=(4, 48, 64, 3), dtype=np.uint8)
    batch = {"key": np.array(["a", "b", "c"]), "ok": np.array([True, True, False]),
             "error": np.array(["", "", "decoder process died"]),
             "frames": _column([good, good.astype(np.float32), np.zeros((0, 0, 0, 3), np.uint8)])}
    out = actor(batch)
    assert out["ok"].tolist() == [True, False, False] and "frames" not in out
    assert out["error"][1].startswith("backbone failed: frames must be uint8") and out["error"][2] == batch["error"][2]
    assert out["features"][0].shape == (4, 512, 2, 2) and out["features"][0].dtype == np.float16
    assert out["features"][1].shape == (0, 512, 2, 2)  # same rank in every row: one Arrow tensor column
    import torch

    want = actor.backbone.embed(torch.from_numpy(good)).to(torch.float16).numpy()
    assert np.array_equal(out["features"][0], want)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_ray_cache_equals_the_local_engines(mini_dataset, tmp_path):
    local = extract.run(mini_dataset, tmp_path / "local.h5", cfg(), progress=False)
    ray_run = extract.run(mini_dataset, tmp_path / "ray.h5", cfg(), progress=False, engine="ray")
    assert (ray_run.extracted, ray_run.frames, ray_run.failed) == (local.extracted, local.frames, [])
    assert ray_run.total_clips == 6 and ray_run.startup_seconds > 0 and ray_run.extract_seconds > 0
    bitwise = assert_same_cache(tmp_path / "ray.h5", tmp_path / "local.h5")
    assert bitwise  # same frames per backbone batch (8 = 2 clips) in both engines: identical cubes
    assert not list(extract.parts_dir_for(tmp_path / "ray.h5").glob("*.h5"))  # joined, shards gone


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_corrupt_clip_is_one_failure_and_the_others_complete(mini_dataset, tmp_path):
    (mini_dataset / "jump" / "broken.avi").write_bytes(os.urandom(4096))
    summary = extract.run(mini_dataset, tmp_path / "f.h5", cfg(), progress=False, engine="ray")
    assert summary.extracted == 6 and [v for v, _ in summary.failed] == ["jump/broken.avi"]
    with open_cache(tmp_path / "f.h5") as c:
        assert len(c) == 6 and [v for v, _ in c.failed] == ["jump/broken.avi"]
        assert c.failed_source[0].startswith("sha256:")  # fingerprinted, so a fixed file is retried


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_killed_backbone_actor_loses_nothing_and_duplicates_nothing(mini_dataset, tmp_path):
    pid_file = tmp_path / "actor.pid"  # the actor waits to be killed on its second batch
    killed = []

    def killer() -> None:
        deadline = time.monotonic() + 90
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_file.exists():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with actor_waiting_to_be_killed(pid_file):  # several shards (shard_clips 2): some written before the kill
        summary = extract.run(mini_dataset, tmp_path / "ray.h5", cfg(shard_clips=2), progress=False, engine="ray")
    thread.join(5)
    assert killed, "the actor never reached its second batch"
    assert (summary.extracted, summary.failed, summary.total_clips) == (6, [], 6)  # each clip written once
    extract.run(mini_dataset, tmp_path / "local.h5", cfg(), progress=False)
    assert_same_cache(tmp_path / "ray.h5", tmp_path / "local.h5")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_rerun_extracts_only_the_missing_clips(mini_dataset, tmp_path):
    from pipeline.video.encode import Encoding, write_video

    cache = tmp_path / "f.h5"
    extract.run(mini_dataset, cache, cfg(), progress=False)  # the local engine made the cache
    frames = np.random.default_rng(1).integers(0, 255, size=(12, 48, 64, 3), dtype=np.uint8)
    write_video(mini_dataset / "run" / "extra.mp4", frames, enc=Encoding("libx264", "mp4", 2))
    summary = extract.run(mini_dataset, cache, cfg(), progress=False, engine="ray")
    assert (summary.extracted, summary.skipped, summary.total_clips) == (1, 6, 7)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")  # and its own Ray, in the CLI's process
def test_the_cli_as_typed_with_its_progress_bar(mini_dataset, tmp_path):
    from tests.project_copy import run_in_pty

    env = dict(os.environ)
    argv = [sys.executable, "-m", "pipeline", "extract", str(mini_dataset), str(tmp_path / "f.h5"), "--engine", "ray",
            "--ray-cpus", "2",
            "--weights", "random:0", "--frames", "4", "--image-size", "32", "--layer", "conv5_3",
            "--params", "/nonexistent/params.yaml"]
    status, out, _seconds = run_in_pty(argv, tmp_path, env, timeout=150)
    text = out.decode(errors="replace")
    assert status == 0, text[-3000:]
    assert "Traceback" not in text and "extract (ray)" in text and "━" in text
    assert "extract ->" in text and "ray: start-up" in text
    assert " E " not in text and "WARNING" not in text and "INFO" not in text  # Ray's own logs stay out


RAY_AGENTS = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}  # see the kill -9 test


def session_processes(sid: int) -> dict[int, str]:
    """Live processes (zombies excluded) of session `sid`, pid -> name: a run started with start_new_session and
    everything it started, even once re-parented to init (Ray's processes keep their session)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        state, _ppid, _pgid, session = text.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            found[int(stat.parent.name)] = cmdline[0].decode(errors="replace")
    return found


def kill_session(sid: int) -> None:
    for pid in session_processes(sid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def summary_row(out: str) -> dict[str, str]:
    """The CLI's summary table (`extract -> CACHE`) as {column: cell}."""
    rows = [[cell.strip() for cell in line.strip().strip("│┃").split("│" if "│" in line else "┃")]
            for line in out.splitlines() if line.strip().startswith(("│", "┃"))]
    header = next(r for r in rows if "extracted" in r)
    return dict(zip(header, rows[rows.index(header) + 1]))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")  # and its own Ray, in the CLI's process
@pytest.mark.parametrize("form", ["folder"])  # the one-file form's shards (<cache>.parts/) resume the same way: the
# local engine's kill -9 test covers that path, and a Ray run into a .h5 cache is tested above (CI time: ~40 s a form)
def test_kill_9_of_the_driver_loses_nothing_leaves_no_ray_behind_and_a_rerun_resumes(mini_dataset, tmp_path, form):
    """`kill -9` of the driver (the one pid, as a user does) while its backbone actor is mid-batch, after a shard
    was written: Ray's processes die with it (its fate-sharing: gcs, raylet, workers, the decoder children), but
    for its two per-node agents, which notice at once but then wait up to 60 s to report the raylet's death to the
    dead GCS (Ray 2.60's publish_error_to_driver), idle, and exit by themselves. The shards stay; the same command
    again extracts only the clips they lack, and the cache equals an uninterrupted local run's."""
    cache = tmp_path / ("features" if form == "folder" else "f.h5")
    pid_file = tmp_path / "actor.pid"
    # the backbone actor's second batch waits to be killed (tests/ray_slow_actor.py), so the kill lands mid-run after
    # the first batch's shard: 8 clips are 2 input blocks of 4 (CLIPS_PER_BLOCK), a backbone batch is 4 clips
    # (--batch-size 16 / --frames 4), so each batch is one Ray task and the first one's rows leave it (a task's
    # output leaves it only when it ends) while the second waits
    from pipeline.video.encode import Encoding, write_video

    rng = np.random.default_rng(2)
    for name in ("jump/clip2.mp4", "walk/clip2.mp4"):
        write_video(mini_dataset / name, rng.integers(0, 255, size=(12, 48, 64, 3), dtype=np.uint8),
                    enc=Encoding("libx264", "mp4", 2))
    env = {**os.environ, "COLUMNS": "250"}
    command = ["extract", str(mini_dataset), str(cache), "--engine", "ray", "--ray-cpus", "2", "--shard-clips", "1",
               "--weights", "random:0", "--frames", "4", "--image-size", "32", "--layer", "conv5_3",
               "--batch-size", "16", "--no-progress", "--params", "/nonexistent/params.yaml"]
    argv = [sys.executable, "-m", "tests.ray_slow_actor", str(pid_file), *command]
    sessions = []
    try:
        with open(tmp_path / "first.log", "wb") as log:
            first = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sessions.append(first.pid)
        deadline = time.monotonic() + 120
        while (first.poll() is None and time.monotonic() < deadline
               and not (pid_file.exists() and pending_shards(cache))):
            time.sleep(0.05)
        log_text = (tmp_path / "first.log").read_text(errors="replace")
        assert first.poll() is None and pid_file.exists() and pending_shards(cache), log_text[-3000:]
        running = session_processes(first.pid)
        assert {"gcs_server", "raylet"} <= {Path(name).name for name in running.values()}, running
        os.kill(first.pid, signal.SIGKILL)  # the driver only
        assert first.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 20
        while set((left := session_processes(first.pid)).values()) - RAY_AGENTS and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(left.values()) <= RAY_AGENTS, f"left running after kill -9: {left}"
        assert not main_file(cache).exists() and not list(extract.parts_dir_for(cache).glob("*.tmp"))
        kept = set()
        for shard in pending_shards(cache):
            with open_cache(shard) as c:
                kept |= set(c.videos)
        assert len(kept) == 4, kept  # the first batch's clips, and only those: its second batch never finished

        argv = [sys.executable, "-m", "pipeline", *command]  # the same command again, agents may still be there
        second = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        sessions.append(second.pid)
        out, _ = second.communicate(timeout=150)
        assert second.returncode == 0, out[-3000:]
        row = summary_row(out)
        assert (row["extracted"], row["skipped (cached)"], row["failed"], row["clips in cache"]) == \
               ("4", "4", "0", "8"), out
        deadline = time.monotonic() + 20  # a run that ends normally shuts its Ray down: nothing stays
        while session_processes(second.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not session_processes(second.pid)
    finally:
        for sid in sessions:
            kill_session(sid)
    extract.run(mini_dataset, tmp_path / "local.h5", ExtractConfig(**TINY | dict(batch_size=16)), progress=False)
    assert_same_cache(cache, tmp_path / "local.h5")
    assert pending_shards(cache) == []
    if form == "folder":
        with open_cache(cache) as c:
            assert set(c.shards) == {p.name for p in extract.parts_dir_for(cache).glob("shard-*.h5")}


def test_without_ray_installed_it_is_one_line(monkeypatch):
    from pipeline.engines import ray_extract
    from pipeline.errors import UserError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as without the extra
    with pytest.raises(UserError) as err:
        ray_extract.import_ray()
    assert str(err.value) == "--engine ray needs Ray: pip install -e '.[ray]'"


def test_a_wrong_engine_is_one_line(tmp_path):
    result = run_cli("extract", str(tmp_path), str(tmp_path / "f.h5"), "--engine", "nonsense")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "unknown --engine 'nonsense'" in lines[0], result.stderr
