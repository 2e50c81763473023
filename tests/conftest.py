"""Shared fixtures, built once per session: small generated videos, stage two's tiny inputs, and the prepared
projects the CLI/DVC tests copy (tests/project_copy.py)."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.video.encode import Encoding, numbered_frames, write_video

os.environ.setdefault("OMP_NUM_THREADS", "2")


def overstate_avi_frame_count(path: Path, extra: int = 1) -> Path:
    """Copy of an AVI whose headers claim `extra` more frames than exist (as real HMDB-51 files do)."""
    data = bytearray(path.read_bytes())
    avih = data.find(b"avih") + 8 + 16  # dwTotalFrames
    strh = data.find(b"strh") + 8 + 32  # dwLength
    for offset in (avih, strh):
        (count,) = struct.unpack("<I", data[offset:offset + 4])
        data[offset:offset + 4] = struct.pack("<I", count + extra)
    out = path.with_name(path.stem + "-overstated.avi")
    out.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="session")
def numbered_video(tmp_path_factory):
    """Factory: a video of `count` frames, frame i showing i in its pixels."""
    root = tmp_path_factory.mktemp("numbered")

    def make(enc: Encoding = Encoding(), count: int = 61, height: int = 96, width: int = 128, name: str | None = None,
             rotation: int | None = None) -> Path:
        path = root / f"{name or enc.label}-{count}-{width}x{height}{enc.suffix}"
        if not path.exists():
            write_video(path, numbered_frames(count, height, width), enc=enc, rotation=rotation)
        return path

    return make


@pytest.fixture
def mini_dataset(tmp_path) -> Path:
    """Three classes of short clips in mixed codecs, the layout `extract` expects."""
    root = tmp_path / "videos"
    rng = np.random.default_rng(0)
    encodings = [Encoding("mpeg4", "avi", 2), Encoding("libx264", "mp4", 2), Encoding("libx264", "mkv", 0)]
    for c, name in enumerate(("jump", "run", "walk")):
        for i in range(2):
            frames = rng.integers(0, 255, size=(12, 48, 64, 3), dtype=np.uint8)
            write_video(root / name / f"clip{i}{encodings[(c + i) % 3].suffix}", frames, enc=encodings[(c + i) % 3])
    return root


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> dict[str, Path]:
    """Stage two's inputs, tiny: 3 synthetic classes x 4 clips (with boxes.json), extracted with random weights
    (T=6 frames, conv5_3 at 64x64: a 4x4 grid of 512 channels), split 2/1/1 per class. Read-only for tests."""
    from pipeline.config import ExtractConfig, SplitConfig, SynthConfig
    from pipeline.video.synthetic import generate_dataset
    from stages import extract, split

    root = tmp_path_factory.mktemp("stage2")
    videos = root / "videos"
    generate_dataset(videos, SynthConfig(seed=0, clips_per_class=4, frames=12, width=64, height=48),
                     classes=["move_left", "move_right", "move_up"])
    cache = root / "features.h5"
    extract.run(videos, cache, ExtractConfig(weights="random:0", frames=6, image_size=64, layer="conv5_3",
                                             batch_size=24, workers=2, timeout=30.0, device="cpu"), progress=False)
    split.run(cache, root / "splits", SplitConfig(seed=0, val=0.25, test=0.25))
    return {"root": root, "videos": videos, "cache": cache, "splits": root / "splits"}


@pytest.fixture(scope="session")
def fresh_project(tmp_path_factory):
    """The checkout's git files made a fresh, offline git + DVC project with tests/project_copy.py's TINY params,
    committed, nothing run: the template the CLI/DVC tests copy (`project_copy.copy_project`). Read-only."""
    from tests.project_copy import TINY, make_project

    return make_project(tmp_path_factory.mktemp("fresh_project"), TINY)


@pytest.fixture(scope="session")
def reproduced_project(fresh_project, tmp_path_factory):
    """`fresh_project` after one full `dvc repro` (its Result in `.first`), built once for tests/test_dvc_graph.py
    and the DVC half of tests/test_journey.py, which copy it. Read-only."""
    from tests.project_copy import reproduce

    built = reproduce(fresh_project, tmp_path_factory.mktemp("reproduced_project"))
    print(f"\nreproduced_project: dvc repro (everything) {built.first.seconds:.1f}s")
    return built
