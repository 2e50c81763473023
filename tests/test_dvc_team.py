"""Extract once for the whole team, the DVC way (README "Share the cache with your team"): one person runs the
graph, commits and `dvc push`es to a remote; a teammate `git clone`s elsewhere, `dvc pull`s, and `dvc repro`
has nothing to do; a sweep over head settings, queued and run by DVC, reruns only the head's stages.

It rests on outputs being a function of their inputs (tests/test_reproducible.py): the same commit reproduced
cold at another path writes the same dvc.lock, every md5, so git stays clean.

Both tests copy the prepared project after one `dvc repro` (tests/conftest.py `reproduced_project`); the remote
is a local folder (what `dvc remote add -d team /mnt/shared/dvc` gives, with no extra installed).
"""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.project_copy import Project, clean_env, copy_project

pytestmark = pytest.mark.slow  # fast forms: tests/test_reproducible.py, test_dvc_graph's exp run test

STAGES = ["synth", "extract", "split", "train", "evaluate", "render"]
HEAD = ["train", "evaluate", "render"]


def committed(project: Project) -> Project:
    """The first person's commit: code, params, dvc.lock and the metrics and plots git keeps."""
    project.git("add", "-A")
    project.git("commit", "-q", "-m", "dvc repro")
    return project


def test_push_clone_pull_then_nothing_reruns_and_a_cold_repro_elsewhere_writes_the_same_lock(
        reproduced_project, tmp_path_factory):
    first = committed(copy_project(reproduced_project, tmp_path_factory.mktemp("team_first")))
    remote = tmp_path_factory.mktemp("team_remote")
    first.dvc("remote", "add", "-d", "team", str(remote)).check()
    first.git("add", ".dvc/config")
    first.git("commit", "-q", "-m", "the team's remote")
    first.dvc("push").check()

    # the teammate: another path, the first checkout gone
    second_tmp = tmp_path_factory.mktemp("team_second")
    root = second_tmp / "teammate-clone"
    first.git("clone", "-q", str(first.root), str(root))
    shutil.rmtree(first.root)
    (second_tmp / "logs").mkdir()
    second = Project(root, second_tmp / "logs", clean_env(second_tmp, root))
    second.dvc("pull").check()
    status = second.dvc("status", "--json").check()
    assert json.loads(status.stdout or "{}") == {}, status.output
    again = second.dvc("repro").check()
    assert again.ran == [] and sorted(again.skipped) == sorted(STAGES), again.output
    assert second.git("status", "--porcelain") == ""

    # evaluate and render typed by hand find the videos and boxes (the cache's root is relative to it)
    second.run("python", "-m", "pipeline", "evaluate", "cache/features.h5", "splits", "models/head.pt",
               str(second_tmp / "by-hand"), "--no-progress").check()
    attention = json.loads((second_tmp / "by-hand" / "eval.json").read_text())["attention"]
    assert attention["clips_with_boxes"] == len(second.lines("splits/test.txt")), attention
    render = second.run("python", "-m", "pipeline", "render", "cache/features.h5", "models/head.pt",
                        str(second_tmp / "report"), "--metrics", str(second_tmp / "by-hand"), "--no-progress").check()
    assert "no dataset folder found" not in render.output and "skipped" not in render.output.lower(), render.output
    assert list((second_tmp / "report" / "clips").glob("*.png"))

    # the same commit reproduced cold at this path: the same bytes, so dvc.lock (every md5) does not move
    lock = second.path("dvc.lock").read_text()
    second.path("cache/features.h5").unlink()  # persist: true keeps it through -f; cold means from nothing
    cold = second.dvc("repro", "-f").check()
    assert cold.ran == STAGES, cold.output
    assert second.path("dvc.lock").read_text() == lock
    assert second.git("status", "--porcelain") == "", second.git("diff")


def test_a_queued_sweep_over_head_settings_reruns_only_the_head(reproduced_project, tmp_path_factory):
    ws = committed(copy_project(reproduced_project, tmp_path_factory.mktemp("team_sweep")))
    # two values, one of them params.yaml's own: that experiment is the baseline and reruns nothing
    ws.dvc("exp", "run", "--queue", "-S", "train.lr=1e-3,3e-4").check()
    ran = ws.dvc("exp", "run", "--run-all", "-j", "1", timeout=900).check()
    names = [n for n in ws.dvc("exp", "list", "--name-only").check().stdout.split() if n]
    assert len(names) == 2, ran.output
    started = {}
    for name in names:
        log = ws.dvc("queue", "logs", name).check().output
        started[name] = [s for s in STAGES if f"Running stage '{s}'" in log]
        assert "Running stage 'extract'" not in log and "Stage 'extract' didn't change" in log, log[-3000:]
    assert sorted(started.values()) == [[], HEAD], started
    shown = json.loads(ws.dvc("exp", "show", "--json", "--sort-by", "video_accuracy").check().stdout)
    lrs = {exp["data"]["params"]["params.yaml"]["data"]["train"]["lr"]
           for entry in shown for exp in (entry.get("experiments") or []) for exp in exp.get("revs", [])
           if exp.get("name") in names}
    assert lrs == {1e-3, 3e-4}, json.dumps(shown)[:3000]
    swept = next(name for name, ran in started.items() if ran)
    ws.dvc("exp", "apply", swept).check()
    assert yaml.safe_load(ws.path("params.yaml").read_text())["train"]["lr"] == 3e-4
