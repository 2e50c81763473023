"""Outputs are a function of their inputs (DESIGN.md, "Reproducible outputs and a cache the team shares"): no
wall-clock time, absolute path or mtime in the cache, the checkpoint or the report, so two clones of one commit
write the same bytes and dvc.lock does not move. The graph-level check (two clones, `dvc repro` cold, dvc.lock
identical) is tests/test_dvc_team.py; here the pieces, in process and fast.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from pipeline.config import ExtractConfig
from pipeline.features.provenance import canonical_fingerprint, source_changed, source_fingerprint
from pipeline.features.reader import open_cache
from stages import extract

TINY = dict(weights="random:0", frames=4, image_size=32, layer="conv5_3", batch_size=8, workers=1, timeout=20.0)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def project_at(where: Path, videos: Path) -> Path:
    """A copy of `videos` at `where/data/videos` with other mtimes (a clone checks files out at its own time)."""
    target = where / "data" / "videos"
    shutil.copytree(videos, target)
    for i, path in enumerate(sorted(target.rglob("*"))):
        os.utime(path, ns=(10**18 + i, 10**18 + i))
    return target


def test_two_checkouts_at_two_paths_write_the_same_cache(mini_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    caches = []
    for name in ("one", "second-clone-elsewhere"):
        videos = project_at(tmp_path / name, mini_dataset)
        cache = tmp_path / name / "cache" / "features.h5"
        extract.run(videos, cache, ExtractConfig(**TINY), progress=False)
        caches.append(cache)
    assert md5(caches[0]) == md5(caches[1])
    with open_cache(caches[1]) as c:
        assert c.attrs["dataset_root"] == "../data/videos"  # relative to the cache's folder
        assert c.dataset_root == tmp_path / "second-clone-elsewhere" / "data" / "videos"
        assert "created" not in c.attrs
        assert all("mtime" not in s and s.startswith("sha256:") for s in c.source)
        assert c.source[0] == source_fingerprint(c.dataset_root / c.videos[0])


def test_source_date_epoch_is_the_one_time_recorded(mini_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    cache = tmp_path / "f.h5"
    extract.run(mini_dataset, cache, ExtractConfig(**TINY), progress=False)
    with open_cache(cache) as c:
        assert c.attrs["created"] == "2023-11-14T22:13:20+00:00"


def make_old(cache: Path, root: Path) -> None:
    """Turn a cache into one written before 2026-12-07: absolute dataset root, a creation time, each row's
    fingerprint with its file's mtime."""
    with h5py.File(cache, "r+") as h5:
        h5.attrs["dataset_root"] = str(root.resolve())
        h5.attrs["created"] = "2026-12-01T10:00:00+00:00"
        videos = [v.decode() for v in h5["video"][()]]
        old = [f"{s.decode()} mtime_ns:{(root / v).stat().st_mtime_ns}" for v, s in zip(videos, h5["source"][()])]
        del h5["source"]
        h5.create_dataset("source", data=old, dtype=h5py.string_dtype("utf-8"))


def test_an_old_cache_resumes_and_its_fingerprints_lose_their_mtimes_at_the_next_join(mini_dataset, tmp_path):
    cache = tmp_path / "f.h5"
    extract.run(mini_dataset, cache, ExtractConfig(**TINY), progress=False)
    make_old(cache, mini_dataset)
    with open_cache(cache) as c:
        before = {v: c.load([i])[0] for i, v in enumerate(c.videos)}
        assert c.dataset_root == mini_dataset.resolve()  # an absolute root reads as it is
    # nothing changed: every clip recognised by its old fingerprint, nothing extracted, the file untouched
    stamp = md5(cache)
    again = extract.run(mini_dataset, cache, ExtractConfig(**TINY), progress=False)
    assert (again.extracted, again.skipped, again.changed) == (0, len(before), 0)
    assert md5(cache) == stamp
    # a touched file with the same bytes is still the same clip (hashed, not re-extracted)
    touched = mini_dataset / sorted(before)[0]
    os.utime(touched, ns=(1, 1))
    # a new clip makes a join: old rows are copied bit for bit, their fingerprints without the mtime
    shutil.copy(mini_dataset / "jump" / "clip0.avi", mini_dataset / "jump" / "clip9.avi")
    grown = extract.run(mini_dataset, cache, ExtractConfig(**TINY), progress=False)
    assert (grown.extracted, grown.changed) == (1, 0)
    with open_cache(cache) as c:
        assert all("mtime" not in s for s in c.source)
        assert c.attrs["dataset_root"] == "videos"  # the cache sits beside the videos folder
        for video, feats in before.items():
            np.testing.assert_array_equal(c.load(c.indices([video]))[0], feats)


def test_fingerprints_are_content_and_size_and_read_each_file_once(tmp_path):
    path = tmp_path / "v.bin"
    path.write_bytes(b"a" * 1000)
    recorded = source_fingerprint(path)
    assert recorded == f"sha256:{hashlib.sha256(b'a' * 1000).hexdigest()} size:1000"
    assert canonical_fingerprint(recorded + " mtime_ns:5") == recorded
    digests: dict[Path, str] = {}
    assert source_changed(recorded, path, digests) is False and path in digests
    digests[path] = "0" * 64  # the run's memo is what is compared: the file is not read again
    assert source_changed(recorded, path, digests) is True


def test_a_pinned_precision_takes_effect_on_a_cache_made_at_another(mini_dataset, tmp_path):
    """What pins two machines' features (README "On another CPU or a GPU"): `extract.precision: fp32` in
    params.yaml must re-extract the rows a bf16 machine made (precision is no setting that refuses a mix, so
    before this DVC reran extract and it kept them all); under `auto` mixed rows stay."""
    cache = tmp_path / "f.h5"
    extract.run(mini_dataset, cache, ExtractConfig(**TINY, precision="bf16"), progress=False)
    kept = extract.run(mini_dataset, cache, ExtractConfig(**TINY, precision="auto"), progress=False)
    assert kept.extracted == 0
    pinned = extract.run(mini_dataset, cache, ExtractConfig(**TINY, precision="fp32"), progress=False)
    assert (pinned.extracted, pinned.changed, pinned.total_clips) == (6, 6, 6)
    with open_cache(cache) as c:
        assert set(c.precision) == {"fp32"}
    again = extract.run(mini_dataset, cache, ExtractConfig(**TINY, precision="fp32"), progress=False)
    assert again.extracted == 0
