"""Commands run by hand write only under the paths they were given, and their settings come from params.yaml.

A user in a project folder (params.yaml beside them, as shipped) runs train, evaluate and render with output
paths of their own: the folder must hold nothing new afterwards (no ./plots, ./metrics of the graph
overwritten), and each command's --help names the params.yaml value it will use.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def typed(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` as typed in `cwd`: its params.yaml read, progress bar on, output to a file."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONPATH": str(REPO)})


def everything_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def project_folder(tmp_path) -> Path:
    """A folder holding the shipped params.yaml and the graph's tracked outputs, as a clone has them."""
    here = tmp_path / "project"
    here.mkdir()
    shutil.copy(REPO / "params.yaml", here / "params.yaml")
    for tracked in ("metrics/train.json", "plots/eval/confusion.csv", "plots/train/loss.tsv"):
        (here / tracked).parent.mkdir(parents=True, exist_ok=True)
        (here / tracked).write_text("the graph's\n")
    return here


@pytest.mark.slow
def test_train_evaluate_and_render_by_hand_write_only_where_they_were_told(tiny_project, project_folder, tmp_path):
    params = yaml.safe_load((project_folder / "params.yaml").read_text())
    params["evaluate"]["split"] = "val"  # reaches render too: it draws the split evaluate measured
    (project_folder / "params.yaml").write_text(yaml.safe_dump(params))
    before = everything_in(project_folder)
    run = tmp_path / "run"
    model = run / "head.pt"
    common = ["--device", "cpu"]
    trained = typed(project_folder, "train", str(tiny_project["cache"]), str(tiny_project["splits"]), str(model),
                    "--epochs", "1", "--channels", "4", *common)
    assert trained.returncode == 0, trained.stderr
    assert {"head.pt", "head.pt.resume", "head.pt.timings.json", "train.json", "loss.tsv", "accuracy.tsv"} <= \
        {p.name for p in run.iterdir()}
    evaluated = typed(project_folder, "evaluate", str(tiny_project["cache"]), str(tiny_project["splits"]), str(model),
                      str(run / "eval"), "--boxes", str(tiny_project["videos"] / "boxes.json"), *common)
    assert evaluated.returncode == 0, evaluated.stderr
    assert {p.name for p in (run / "eval").iterdir()} == {"eval.json", "predictions.csv", "confusion.csv",
                                                          "attention.npz"}
    assert json.loads((run / "eval" / "eval.json").read_text())["split"] == "val"
    rendered = typed(project_folder, "render", str(tiny_project["cache"]), str(model), str(run / "report"),
                     "--splits", str(tiny_project["splits"]), "--per-class", "1", *common)
    assert rendered.returncode == 0, rendered.stderr
    assert (run / "report" / "index.html").is_file() and (run / "report" / "curves.png").is_file()  # model's folder
    assert "(split val, cpu)" in " ".join(rendered.stdout.split())
    assert everything_in(project_folder) == before
    for tracked in ("metrics/train.json", "plots/eval/confusion.csv", "plots/train/loss.tsv"):
        assert (project_folder / tracked).read_text() == "the graph's\n"


def test_help_shows_the_defaults_params_yaml_sets(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["render"].update(per_class=7, alpha=0.25)
    params["evaluate"]["split"] = "val"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shown = " ".join(typed(tmp_path, "render", "--help").stdout.split())  # rich folds long lines
    assert "params.yaml render.per_class: 7" in shown and "params.yaml render.alpha: 0.25" in shown
    assert "params.yaml evaluate.split: val" in shown  # render draws the split evaluate measured
    del params["render"]["fps"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shown = " ".join(typed(tmp_path, "render", "--help").stdout.split())
    assert "built-in render.fps: 4.0" in shown
