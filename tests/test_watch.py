"""watch: sampling at the model's interval, events that match the segments of a stream, the annotated video
playable however a run ends (a clean end, a file cut short, an HTTP server that stops, SIGTERM), drops
counted and latency bounded when the model is slow, one line and exit status 2 for what a user got wrong.

The model is a tiny head trained on two classes a frame's colour tells apart (random VGG weights, 64 px,
conv5_3): "calm" clips are blue, "fight" clips red, both with noise and a moving square, 2 s at 10 fps,
4 frames a clip, so the head samples a stream every 0.5 s and a window spans 2 s.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from pipeline.config import ExtractConfig, HeadConfig, SplitConfig, TrainConfig, WatchConfig
from pipeline.head import checkpoint as ck
from pipeline.video.encode import Encoding, write_video
from pipeline.watch.events import EventTracker
from pipeline.watch.sources import Sampler
from stages import extract, split, train
from stages import watch as stage
from tests.cli_helpers import run_in_process

FPS = 10
HEIGHT, WIDTH = 48, 64
COLOURS = {"calm": (40, 70, 200), "fight": (200, 50, 40)}
# the long stream: (class, seconds); fights at 4-8 s and 12-16 s
SEGMENTS = [("calm", 4), ("fight", 4), ("calm", 4), ("fight", 4), ("calm", 3)]


def frames_of(cls: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """(n, H, W, 3) uint8: the class's colour with noise, and a grey square crossing the frame."""
    n = int(round(seconds * FPS))
    frames = np.empty((n, HEIGHT, WIDTH, 3), dtype=np.uint8)
    base = np.array(COLOURS[cls], dtype=np.int16)
    for i in range(n):
        noisy = base + rng.integers(-30, 31, size=(HEIGHT, WIDTH, 3))
        x = int((i * 3) % (WIDTH - 12))
        noisy[18:30, x:x + 12] = 128
        frames[i] = np.clip(noisy, 0, 255).astype(np.uint8)
    return frames


def stream_frames(segments, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([frames_of(cls, seconds, rng) for cls, seconds in segments])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """The two-class set (6 clips a class), its cache (random:0, 64 px, conv5_3, 4 frames), a trained head,
    and the streams the tests watch."""
    root = tmp_path_factory.mktemp("watch")
    rng = np.random.default_rng(0)
    for cls in COLOURS:
        for i in range(6):
            write_video(root / "videos" / cls / f"clip{i}.mp4", frames_of(cls, 2.0, rng), fps=FPS)
    cache = root / "features.h5"
    extract.run(root / "videos", cache, ExtractConfig(weights="random:0", frames=4, image_size=64, layer="conv5_3",
                                                      batch_size=24, workers=2, timeout=30.0, device="cpu"),
                progress=False)
    split.run(cache, root / "splits", SplitConfig(seed=0, val=0.17, test=0.17))
    model = root / "head.pt"
    train.run(cache, root / "splits", model, HeadConfig(channels=8, dropout=0.0, feature_dropout=0.0),
              TrainConfig(epochs=30, batch_size=4, lr=1e-2, patience=30, device="cpu"),
              metrics_path=root / "metrics.json", plots_dir=root / "plots", progress=False)
    stream = write_video(root / "stream.mkv", stream_frames(SEGMENTS), fps=FPS, enc=Encoding("libx264", "mkv"))
    short = write_video(root / "short.mkv", stream_frames([("calm", 2), ("fight", 2)], seed=3), fps=FPS,
                        enc=Encoding("libx264", "mkv"))
    return {"root": root, "model": model, "stream": stream, "short": short, "cache": cache}


def config(**changes) -> WatchConfig:
    """Eager trunk (a stream counts as a long run: on a CPU with native bf16, `auto` would compile)."""
    return WatchConfig(**{"device": "cpu", "min_duration": 1.0, "threshold": 0.8, "hysteresis": 0.3,
                          "compile": "off", **changes})


def count_frames(path: Path) -> int:
    """Frames PyAV decodes from `path`: a file that does not open or decode fails the test."""
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


# --- the checkpoint's sampling interval -------------------------------------------------------------------


def test_train_records_the_clips_mean_sampling_interval(project):
    """frame_index 2, 7, 12, 17 of 20 frames at 10 fps: one sampled frame every 0.5 s."""
    interval, note = ck.sample_interval(ck.load(project["model"]))
    assert interval == pytest.approx(0.5) and note is None


def test_an_old_checkpoint_falls_back_to_two_second_clips_and_says_so(project, tmp_path):
    old = ck.load(project["model"])
    old.train.pop("sample_interval")
    ck.save(tmp_path / "old.pt", old)
    interval, note = ck.sample_interval(ck.load(tmp_path / "old.pt"))
    assert interval == pytest.approx(2.0 / 4) and "2 s clips" in note and "\n" not in note


def test_the_sampler_keeps_frames_on_the_models_grid_whatever_the_source_rate():
    """25 fps sampled every 0.5 s: frames 0, 0.48 (nearest to 0.5), 1.0, ...; the grid does not drift."""
    sampler = Sampler(0.5)
    kept = [round(i / 25, 2) for i in range(250) if sampler.keep(i / 25)]
    assert len(kept) == 20
    assert all(abs(t - 0.5 * k) <= 0.02 + 1e-9 for k, t in enumerate(kept))


# --- events -----------------------------------------------------------------------------------------------


def test_events_need_the_minimum_duration_and_hysteresis_keeps_one_fight_one_event():
    """fight: a 0.5 s blip (too short), then one fight whose probability dips to 0.6 (above 0.8 - 0.3) once."""
    tracker = EventTracker(["calm", "fight"], {"fight": 0.8}, hysteresis=0.3, min_duration=1.0)
    series = [0.1, 0.9, 0.1, 0.1, 0.85, 0.95, 0.6, 0.9, 0.92, 0.3, 0.1]
    for step, p in enumerate(series):
        tracker.update(step * 0.5, np.array([1 - p, p]), lambda: [0, 0, 10, 10])
    tracker.finish()
    assert [(e.label, e.start, e.end, e.probability) for e in tracker.events] == [("fight", 2.0, 4.0, 0.95)]


def test_an_event_still_open_when_the_source_ends_is_closed_and_reported():
    tracker = EventTracker(["calm", "fight"], {"fight": 0.5}, hysteresis=0.1, min_duration=0.0)
    for step in range(4):
        tracker.update(step * 0.5, np.array([0.0, 1.0]), lambda: [1, 2, 3, 4])
    assert tracker.events == [] and tracker.finish()[0].end == 1.5


# --- a whole stream ---------------------------------------------------------------------------------------


def test_events_of_a_stream_of_known_segments_match_its_fight_segments(project, tmp_path):
    events = tmp_path / "events.jsonl"
    out = tmp_path / "annotated.mp4"
    summary = stage.run(str(project["stream"]), project["model"], config(), out=out, events=events,
                        alerts=["fight"], progress=False)
    assert summary.outcome == "end" and summary.dropped == 0
    assert summary.sampled == 38  # 19 s every 0.5 s: a file is processed whole
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["label"] for e in lines] == ["fight", "fight"]
    for event, (start, end) in zip(lines, [(4, 8), (12, 16)]):
        assert set(event) == {"start", "end", "label", "probability", "box"}
        assert abs(event["start"] - start) <= 1.0 and abs(event["end"] - end) <= 1.0, lines
        assert event["probability"] >= 0.8
        x0, y0, x1, y1 = event["box"]
        assert 0 <= x0 < x1 <= WIDTH and 0 <= y0 < y1 <= HEIGHT
    assert count_frames(out) == summary.out_frames == summary.sampled


def test_a_folder_plays_in_order_with_time_running_on(project, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, part in enumerate([[("calm", 2)], [("fight", 3)]]):
        write_video(folder / f"part{i}.mp4", stream_frames(part, seed=i), fps=FPS)
    seen = []
    summary = stage.run(str(folder), project["model"], config(), progress=False, on_window=seen.append)
    assert summary.outcome == "end" and summary.sampled == 10
    assert summary.source_seconds == pytest.approx(4.9)
    assert [round(t, 2) for t in seen[-1].times] == [3.0, 3.5, 4.0, 4.5]


def test_the_trunk_compiles_on_a_files_sampled_frames_and_a_stream_counts_as_a_long_run(project, monkeypatch):
    """short.mkv declares 4 s, sampled every 0.5 s: 8 frames; a URL's length is unknown until it ends."""
    from pipeline.features.backbone import Backbone
    from pipeline.watch.sources import LONG_RUN_FRAMES, Reader, parse_source

    asked = []
    monkeypatch.setattr(Backbone, "compile", lambda self, mode, frames: asked.append((mode, frames)) or False)
    stage.run(str(project["short"]), project["model"], config(compile="on"), progress=False)
    assert asked == [("on", 8)]
    assert Reader(parse_source("http://127.0.0.1:9/live.mkv")).sampled_frames(0.5) == LONG_RUN_FRAMES


# --- sources that break, stall or cannot be opened --------------------------------------------------------


def test_a_file_cut_short_exits_1_and_leaves_a_playable_video(project, tmp_path):
    cut = tmp_path / "cut.mkv"
    data = project["stream"].read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    out = tmp_path / "cut.mp4"
    result = run_in_process("watch", str(cut), "--model", str(project["model"]), "--out", str(out), "--device", "cpu",
                            "--no-progress")
    assert result.exit_code == 1, result.output
    assert "cut short" in result.output
    assert count_frames(out) > 4


class _HalfServer(http.server.BaseHTTPRequestHandler):
    """Serves one file, declaring its whole length, and stops after half of it."""

    body = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "video/x-matroska")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body[:len(self.body) // 2])
        self.wfile.flush()
        self.after_half()

    def after_half(self) -> None:
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[_HalfServer], body: bytes) -> Iterator[str]:
    """`body` served by `handler` on a local port for the block; yields its URL."""
    handler.body = body
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/short.mkv"
    finally:
        server.shutdown()


def test_an_http_stream_that_stops_halfway_is_a_broken_source_with_a_playable_video(project, tmp_path):
    out = tmp_path / "http.mkv"
    with serving(_HalfServer, project["short"].read_bytes()) as url:
        summary = stage.run(url, project["model"], config(read_timeout=3.0), out=out, progress=False)
    assert summary.outcome == "broken" and summary.live, summary.message
    assert summary.sampled >= 2 and count_frames(out) == summary.out_frames


class _StallingServer(_HalfServer):
    """Serves half of one file, then keeps the connection open and sends nothing."""

    release = threading.Event()

    def after_half(self) -> None:
        self.release.wait(30)


def test_a_stream_that_stalls_is_broken_after_the_read_timeout(project, tmp_path):
    out = tmp_path / "stalled.mp4"
    with serving(_StallingServer, project["short"].read_bytes()) as url:
        try:
            summary = stage.run(url, project["model"], config(read_timeout=1.5), out=out, progress=False)
        finally:
            _StallingServer.release.set()
    assert summary.outcome == "broken" and "stall" in summary.message, summary.message
    assert summary.wall_seconds < 8
    assert count_frames(out) == summary.out_frames >= 2


def test_a_slow_model_on_a_live_source_drops_frames_and_keeps_latency_bounded(project, tmp_path, monkeypatch):
    """A 4 s file read as a camera, sampled every 0.1 s, by a backbone that takes 0.25 s a frame."""
    fast = ck.load(project["model"])
    fast.train["sample_interval"] = 0.1
    ck.save(tmp_path / "fast.pt", fast)
    from pipeline.watch.online import OnlineModel

    embed = OnlineModel.embed

    def slow(self, images):
        time.sleep(0.25 * len(images))
        return embed(self, images)

    monkeypatch.setattr(OnlineModel, "embed", slow)
    summary = stage.run(str(project["short"]), tmp_path / "fast.pt", config(queue=2, batch=1), realtime=True,
                        progress=False)
    assert summary.outcome == "end"
    assert summary.dropped > 10 and summary.sampled + summary.dropped == 40
    # the queue, the frame in hand and the next one taken, each 0.25 s, with room for a busy machine; a
    # latency that grew with the backlog would reach 40 x 0.25 - 4 = 6 s by the end
    bound = (2 + 1 + 1) * 0.25 + 1.0
    assert max(summary.latencies) < bound, summary.latencies


def test_sigterm_mid_run_leaves_a_playable_video_and_exit_0(project, tmp_path):
    out = tmp_path / "stopped.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "watch", str(project["stream"]), "--model",
                             str(project["model"]), "--out", str(out), "--realtime", "--device", "cpu",
                             "--no-progress", "--params", "/nonexistent/params.yaml"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "250"})
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stderr
    assert count_frames(out) >= 4


@pytest.mark.parametrize("case", ["no source", "not a video", "refused URL", "not a model", "unknown alert",
                                  "bad out"])
def test_what_a_user_got_wrong_is_one_line_and_exit_2(project, tmp_path, case):
    source, model, extra = str(project["short"]), str(project["model"]), []
    if case == "no source":
        source = str(tmp_path / "missing.mp4")
    elif case == "not a video":
        source = str(tmp_path / "text.mp4")
        Path(source).write_text("not a video")
    elif case == "refused URL":
        source = "http://127.0.0.1:9/none.mkv"
    elif case == "not a model":
        model = str(tmp_path / "head.pt")
        Path(model).write_text("not a model")
    elif case == "unknown alert":
        extra = ["--alert", "dance:0.5"]
    else:
        extra = ["--out", str(tmp_path / "out.gif")]
    result = run_in_process("watch", source, "--model", model, "--device", "cpu", "--no-progress", *extra)
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1, \
        result.output
