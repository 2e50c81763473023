"""The folder cache under DVC: `dvc repro` with the extract output a folder (`cache/features`, persist: true),
then the dataset grows by 10% and `dvc repro` runs again.

What a run that adds clips must cost, in the workspace and in DVC's cache (docs/DESIGN.md, "Past one machine"):
the old shards stay as they are (same inode, mtime and bytes: neither the pipeline nor DVC's checkout
rewrites them), the folder gains new shards and a new index.h5 only, and `.dvc/cache` gains objects for
those files and a new `.dir` manifest only. DVC stores a directory output as a `.dir` manifest (relpath ->
md5 of each file) plus one object per file; committing a new version copies only the objects it does not hold
yet (dvc_data's transfer skips existing ones), and with a copy-type cache ('reflink,copy' falls back to copy
on ext4) its relink leaves unchanged workspace copies alone. This test pins both. (A one-file output fares
worse: there the relink checks only the first cache type, `reflink`, and rewrites the whole workspace file from
the cache on every repro; numbers in docs/BENCHMARKS.md, "Past one machine".)

A copy of the repository, offline, tiny params (tests/conftest.py's `fresh_project` copied, with this module's
TINY: tests/project_copy.py); its dvc.yaml is edited to the folder form. The dataset grows the way a user's
does under the graph: synth's `clips_per_class` 10 -> 11 writes the same first 10 clips of every class again
(same bytes, so extract keeps them) plus one new one per class.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.project_copy import Project, copy_project

pytestmark = pytest.mark.slow

CLASSES = 8  # pipeline.video.synthetic.CLASSES
BEFORE, AFTER = 10, 11  # clips per class: +10%
SHARD_CLIPS = 8  # extract.shard_clips: 80 clips -> 10 shards, the 8 new ones -> 1
TINY = {
    "data": {"videos": "data/videos"},
    "synth": {"clips_per_class": BEFORE, "frames": 8, "width": 64, "height": 48},
    "extract": {"weights": "random:0", "frames": 4, "image_size": 32, "layer": "conv5_3", "batch_size": 32,
                "workers": 1, "shard_clips": SHARD_CLIPS},
    "split": {"val": 0.2, "test": 0.2},
    "head": {"channels": 8},
    "train": {"epochs": 2, "patience": 2},
}
FILE, FOLDER = "cache/features.h5", "cache/features"
RAN = ["synth", "extract", "split", "train", "evaluate"]  # `dvc repro evaluate`: render is not needed here


def to_folder_form(project: Project) -> None:
    """dvc.yaml with the cache a folder: extract's one output and every later stage's argument and dep."""
    path = project.path("dvc.yaml")
    text = path.read_text()
    assert text.count(FILE) >= 6, "dvc.yaml no longer names cache/features.h5 where this test expects"
    path.write_text(re.sub(re.escape(FILE) + r"\b", FOLDER, text))
    stages = yaml.safe_load(path.read_text())["stages"]
    assert stages["extract"]["outs"] == [{FOLDER: {"persist": True}}]
    assert all(FOLDER in stages[s]["deps"] and FOLDER in stages[s]["cmd"] for s in ("split", "train", "evaluate"))
    project.git("add", "-A")
    project.git("commit", "-q", "-m", "the cache as a folder")


def file_ids(folder: Path) -> dict[str, tuple[int, int, int, str]]:
    """name -> (inode, mtime_ns, size, md5) of every file in the folder (md5: what DVC names its objects by)."""
    import hashlib

    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size, hashlib.md5(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir()) if p.is_file()}


def odb(project: Project) -> dict[str, tuple[int, int, int]]:
    """DVC's cache: object path (relative to .dvc/cache) -> (inode, mtime_ns, size)."""
    root = project.path(".dvc/cache")
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()}


def object_path(md5: str) -> str:
    return f"files/md5/{md5[:2]}/{md5[2:]}"


def locked_out(project: Project, stage: str, out: str) -> dict:
    lock = yaml.safe_load(project.path("dvc.lock").read_text())
    return next(o for o in lock["stages"][stage]["outs"] if o["path"] == out)


def test_growing_a_folder_cache_under_dvc_writes_and_caches_only_the_new_shards(fresh_project, tmp_path):
    from pipeline.features.reader import FolderCache, open_cache

    project = copy_project(fresh_project, tmp_path, tiny=TINY)
    to_folder_form(project)
    assert not project.dvc("config", "cache.type").check().stdout.strip(), "the default cache type is tested here"

    first = project.dvc("repro", "evaluate", timeout=900).check()
    print(f"\ndvc repro evaluate, {CLASSES * BEFORE} clips: {first.seconds:.1f}s")
    assert first.ran == RAN, first.output[-4000:]
    folder = project.path(FOLDER)
    assert folder.is_dir() and not project.path(FILE).exists()
    old = file_ids(folder)
    old_shards = {k: v for k, v in old.items() if k != "index.h5"}
    # every SHARD_CLIPS clips (or 20 s) a shard; this much work makes ten or more
    assert "index.h5" in old and len(old_shards) >= CLASSES * BEFORE // SHARD_CLIPS, sorted(old)
    old_bytes = sum(v[2] for v in old_shards.values())
    old_odb = odb(project)
    manifest = locked_out(project, "extract", FOLDER)
    assert manifest["md5"].endswith(".dir") and manifest["nfiles"] == len(old)
    for name, (_, _, size, md5) in old.items():  # one object per file, same bytes: a copy, not a link
        assert old_odb[object_path(md5)][2] == size
        assert old_odb[object_path(md5)][0] != old[name][0]

    params = yaml.safe_load(project.path("params.yaml").read_text())
    params["synth"]["clips_per_class"] = AFTER
    project.path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = project.dvc("repro", "evaluate", timeout=900).check()
    print(f"dvc repro evaluate, +{CLASSES * (AFTER - BEFORE)} clips: {second.seconds:.1f}s")
    assert second.ran == RAN, second.output[-4000:]

    # The workspace: old shards untouched, new shards (one, unless 20 s passed) and a new index, nothing else.
    new = file_ids(folder)
    assert {k: new.get(k) for k in old_shards} == old_shards, "an old shard was rewritten, replaced or deleted"
    added = sorted(set(new) - set(old))
    assert added and all(re.fullmatch(r"shard-.*\.h5", name) for name in added), sorted(new)
    assert new["index.h5"][0] != old["index.h5"][0] and new["index.h5"][3] != old["index.h5"][3]
    with open_cache(folder) as cache:
        assert isinstance(cache, FolderCache) and len(cache) == CLASSES * AFTER and not cache.failed
        new_keys = sorted(v for i, v in enumerate(cache.videos) if cache.location(i)[0].name in added)
    from pipeline.video.synthetic import CLASSES as NAMES
    from pipeline.video.synthetic import clip_key

    assert new_keys == sorted(clip_key(name, BEFORE) for name in NAMES)  # the new shard: the new clips only

    info = project.run("python", "-m", "pipeline", "info", FOLDER).check()
    assert re.search(rf"clips\s*│?\s*{CLASSES * AFTER}\b", info.stdout), info.stdout

    # DVC's cache: the new shard, the new index and the new manifest; nothing re-copied, nothing rewritten.
    new_odb = odb(project)
    assert {k: new_odb.get(k) for k in old_odb} == old_odb, "DVC rewrote or dropped an object it held"
    gained = {k: v[2] for k, v in new_odb.items() if k not in old_odb}
    manifest2 = locked_out(project, "extract", FOLDER)
    ours = {object_path(new[name][3]) for name in [*added, "index.h5"]} | {object_path(manifest2["md5"])}
    assert ours <= set(gained), (sorted(ours), sorted(gained))
    ours_bytes = sum(gained[k] for k in ours)
    all_bytes = sum(gained.values())
    new_bytes = sum(new[name][2] for name in [*added, "index.h5"])
    print(f"old shards {len(old_shards)} files {old_bytes} B; new shard + index {new_bytes} B; .dvc/cache gained "
          f"{ours_bytes} B for {FOLDER} ({len(ours)} objects), {all_bytes} B in all ({len(gained)} objects)")
    assert ours_bytes < new_bytes + 64 * 1024  # the two files and a small manifest
    assert ours_bytes < 0.5 * old_bytes, "DVC copied the cache again, not just what is new"
    assert manifest2["nfiles"] == len(new)
