"""decord's output is checked, never trusted blindly: wrong shape or wrong content -> PyAV, recorded per clip.

decord2 3.4 returns (H, W, 4) garbage for 48- and 96-pixel-wide frames on some CPUs (dmlc/decord #93, #336);
it may not show on the CPU the tests run on, so besides a 96-wide video the tests inject a faulty decord:
one with a wrong shape, and one with garbage of the right shape (which a shape check alone lets through).
"""
from __future__ import annotations

import textwrap

import numpy as np
import pytest

from pipeline.features.reader import open_cache
from pipeline.video import decode as video
from pipeline.video.decode import VideoError, decode_frames_at, decode_sampled
from pipeline.video.encode import Encoding, numbered_frames, read_frame_number, write_video


def stamped(frames: np.ndarray) -> list[int]:
    return [read_frame_number(f) for f in frames]


@pytest.mark.parametrize("enc", [Encoding("libx264", "mp4", 2), Encoding("mpeg4", "avi", 2)], ids=lambda e: e.label)
def test_a_96_pixel_wide_video_decodes_to_its_exact_frames(tmp_path, enc):
    path = write_video(tmp_path / f"w96{enc.suffix}", numbered_frames(40, 64, 96), enc=enc)
    clip = decode_sampled(path, 10)
    assert clip.frames.shape == (10, 64, 96, 3) and clip.frames.dtype == np.uint8
    assert stamped(clip.frames) == clip.frame_index.tolist()
    assert clip.decoder in video.DECODERS
    again = decode_frames_at(path, clip.frame_index, clip.decoder)
    assert stamped(again) == clip.frame_index.tolist()


def _fake_decord(monkeypatch, make_frame) -> None:
    """Replace what decord's reader returns with `make_frame(true_frame)`."""
    real = video._DecordReader.next
    monkeypatch.setattr(video._DecordReader, "next", lambda self: make_frame(real(self)))


def four_channels(frame: np.ndarray) -> np.ndarray:
    return np.zeros((*frame.shape[:2], 4), np.uint8)


def garbage_of_the_right_shape(frame: np.ndarray) -> np.ndarray:
    return np.roll(frame.reshape(-1), 37).reshape(frame.shape)[:, ::-1].copy()  # misaligned rows, three channels


@pytest.mark.parametrize("fault", [four_channels, garbage_of_the_right_shape])
def test_a_faulty_decord_is_caught_and_the_clip_decoded_by_pyav(tmp_path, monkeypatch, fault):
    path = write_video(tmp_path / "clip.mp4", numbered_frames(30, 48, 64), enc=Encoding("libx264", "mp4", 2))
    _fake_decord(monkeypatch, fault)
    clip = decode_sampled(path, 6)
    assert clip.decoder == "pyav" and clip.note.startswith("decord gave ")
    assert stamped(clip.frames) == clip.frame_index.tolist()  # PyAV decodes in order: exact
    assert clip.num_frames == 30


def test_the_shape_check_alone_would_miss_three_channel_garbage(tmp_path, monkeypatch):
    path = write_video(tmp_path / "clip.mp4", numbered_frames(30, 48, 64))
    _fake_decord(monkeypatch, garbage_of_the_right_shape)
    wrong = decode_sampled(path, 6, decoder="decord")  # decord alone: right shape, wrong pixels, no error
    assert wrong.frames.shape == (6, 48, 64, 3) and stamped(wrong.frames) != wrong.frame_index.tolist()
    assert "unlike PyAV" in decode_sampled(path, 6).note


def test_a_good_decord_is_kept(tmp_path):
    path = write_video(tmp_path / "clip.mkv", numbered_frames(20, 48, 64), enc=Encoding("libx264", "mkv", 0))
    clip = decode_sampled(path, 5)
    assert (clip.decoder, clip.note) == ("decord", "")


def test_pyav_applies_the_display_rotation_as_decord_does(tmp_path):
    frames = np.zeros((4, 64, 128, 3), np.uint8)
    frames[:, :16, :16] = 255
    for rotation in (90, 180, 270):
        path = write_video(tmp_path / f"r{rotation}.mp4", frames, rotation=rotation)
        by_decord = decode_sampled(path, 2, decoder="decord").frames
        by_pyav = decode_sampled(path, 2, decoder="pyav").frames
        assert by_pyav.shape == by_decord.shape
        assert np.abs(by_pyav.astype(int) - by_decord).mean() < video.AGREEMENT


def test_when_neither_decoder_gives_frames_the_clip_fails_with_both_reasons(tmp_path, monkeypatch):
    path = write_video(tmp_path / "clip.mp4", numbered_frames(10, 48, 64))
    _fake_decord(monkeypatch, four_channels)

    def broken(self, path):
        raise VideoError("not a readable video for PyAV (injected)")

    monkeypatch.setattr(video._PyAVReader, "__init__", broken)
    with pytest.raises(VideoError, match=r"decord gave frames of shape \(48, 64, 4\).*PyAV: not a readable"):
        decode_sampled(path, 4)


FAULTY_DECORD = textwrap.dedent('''
    """Test-only: every decord reader started in this process returns 3-channel garbage of the right shape."""
    import numpy as np
    import pipeline.video.decode as video

    _real = video._DecordReader.next

    def _garbage(self):
        frame = _real(self)
        return np.roll(frame.reshape(-1), 37).reshape(frame.shape)[:, ::-1].copy()

    video._DecordReader.next = _garbage
''')


def test_extract_records_the_decoder_per_clip_and_render_redecodes_with_it(tmp_path, monkeypatch):
    """The decoding worker processes get the faulty decord (a sitecustomize on their PYTHONPATH)."""
    import os

    from pipeline.config import ExtractConfig
    from stages import extract

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULTY_DECORD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    root = tmp_path / "videos"
    for name in ("a", "b"):
        write_video(root / name / "clip.mp4", numbered_frames(24, 48, 64), enc=Encoding("libx264", "mp4", 2))
    cache = tmp_path / "f.h5"
    summary = extract.run(root, cache, ExtractConfig(weights="random:0", frames=4, image_size=32, workers=1,
                                                     timeout=30.0), progress=False)
    assert summary.extracted == 2 and len(summary.redecoded) == 2
    with open_cache(cache) as c:
        assert c.decoder == ["pyav", "pyav"]
        frames = decode_frames_at(root / c.videos[0], c.frame_index[0], c.decoder[0])
        assert stamped(frames) == c.frame_index[0].tolist()


def test_decoding_before_torch_in_one_process_does_not_break_torch(tmp_path):
    """decord2 preloads libnvblas (nvidia-* pip packages) with RTLD_GLOBAL; if torch loads after it, torch's
    first matrix product segfaulted. A fresh process, as a notebook user would: decode, then train."""
    import subprocess
    import sys

    path = write_video(tmp_path / "clip.mp4", numbered_frames(10, 48, 64))
    script = ("import sys; from pipeline.video.decode import decode_sampled; decode_sampled(sys.argv[1], 4); "
              "import torch; m = torch.nn.Linear(512, 48); m(torch.randn(4096, 512)).sum().backward(); print('ok')")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])
