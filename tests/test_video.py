"""Decoding is exact: every sampled frame is the frame its index names, whatever the codec or container."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.video.decode import VideoError, decode_frames_at, decode_sampled, sample_indices
from pipeline.video.encode import ENCODINGS, Encoding, read_frame_number
from tests.conftest import overstate_avi_frame_count


def stamped(frames: np.ndarray) -> list[int]:
    return [read_frame_number(f) for f in frames]


def test_sample_indices_are_segment_centres():
    assert sample_indices(60, 30).tolist() == list(range(1, 60, 2))
    assert sample_indices(300, 3).tolist() == [50, 150, 250]


def test_sample_indices_repeat_frames_of_a_clip_shorter_than_T():
    assert sample_indices(1, 4).tolist() == [0, 0, 0, 0]
    assert sample_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("enc", ENCODINGS, ids=lambda e: e.label)
def test_every_sampled_frame_is_the_frame_its_index_names(numbered_video, enc):
    clip = decode_sampled(numbered_video(enc, count=61), 30)
    assert clip.num_frames == 61
    assert clip.frame_index.tolist() == sample_indices(61, 30).tolist()
    assert stamped(clip.frames) == clip.frame_index.tolist()


@pytest.mark.parametrize("enc", [e for e in ENCODINGS if e.bframes], ids=lambda e: e.label)
def test_redecoding_at_cached_indices_gives_the_same_frames(numbered_video, enc):
    path = numbered_video(enc, count=61)
    clip = decode_sampled(path, 30)
    again = decode_frames_at(path, clip.frame_index)
    assert stamped(again) == clip.frame_index.tolist()


def test_header_that_overstates_the_frame_count_samples_only_real_frames(numbered_video):
    path = overstate_avi_frame_count(numbered_video(Encoding("mpeg4", "avi", 2), count=40), extra=1)
    clip = decode_sampled(path, 30)
    assert clip.num_frames == 40
    assert stamped(clip.frames) == clip.frame_index.tolist()
    assert clip.frame_index.max() == 39


@pytest.mark.parametrize("count", [1, 7])
def test_clip_shorter_than_T_gives_T_rows_of_repeated_frames(numbered_video, count):
    clip = decode_sampled(numbered_video(Encoding("mpeg4", "avi", 2), count=count), 30)
    assert clip.frames.shape[0] == 30
    assert stamped(clip.frames) == clip.frame_index.tolist() == sample_indices(count, 30).tolist()


def test_odd_frame_size_decodes_at_its_own_size(numbered_video):
    clip = decode_sampled(numbered_video(Encoding("libx264", "mp4", 0), count=20, height=75, width=99), 10)
    assert clip.frames.shape == (10, 75, 99, 3)
    assert stamped(clip.frames) == clip.frame_index.tolist()


def test_rotated_clip_is_decoded_upright(tmp_path):
    from pipeline.video.encode import write_video

    frames = np.zeros((4, 64, 96, 3), np.uint8)
    frames[:, :16, :16] = 255  # marker in the stored top-left corner
    path = write_video(tmp_path / "phone.mp4", frames, rotation=90)  # shown turned 90 degrees counter-clockwise
    clip = decode_sampled(path, 2)
    assert (clip.height, clip.width) == (96, 64)
    assert clip.frames[0, -8:, :8].mean() > 200  # the marker is now bottom-left


def test_long_clip_beyond_the_memory_budget_is_still_exact(numbered_video, monkeypatch):
    import pipeline.video.decode as video

    monkeypatch.setattr(video, "KEEP_ALL_BYTES", 1)  # force the keep-only-candidates path
    clip = decode_sampled(numbered_video(Encoding("mpeg4", "avi", 2), count=61), 30)
    assert stamped(clip.frames) == clip.frame_index.tolist()


def test_truncated_file_keeps_the_frames_that_decode(numbered_video, tmp_path):
    full = numbered_video(Encoding("libx264", "mkv", 2), count=61).read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(full[: len(full) // 2])
    try:
        clip = decode_sampled(cut, 10)
    except VideoError as exc:  # acceptable outcome: a clear reason
        assert str(exc)
        return
    assert 0 < clip.num_frames < 61
    assert stamped(clip.frames) == clip.frame_index.tolist()


@pytest.mark.parametrize("content,reason",
                         [(b"", "empty file"), (b"this is not a video\n" * 50, "not a readable video")])
def test_unusable_files_raise_a_one_line_reason(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError, match=reason) as info:
        decode_sampled(path, 30)
    assert "\n" not in str(info.value)
