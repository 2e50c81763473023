"""The DVC graph end to end, as a user runs it: `dvc repro`, a no-op rerun, and `dvc exp run -S`.

A copy of the repository (its git files only: no data, caches or outputs of the real checkout) becomes a fresh
git repo with tiny parameters, so the whole graph synth -> extract -> split -> train -> evaluate -> render runs
in well under a minute on 2 CPU cores. DVC in the copy is kept off everything outside it: its site cache dir,
global and system config point into the tmp dir, analytics and update checks are off, nothing is pulled.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STAGES = ["synth", "extract", "split", "train", "evaluate", "render"]

# Every value changed here must already be a key of the real params.yaml (checked): the tiny run exercises
# the same sections and fields the real one does, only smaller.
TINY = {
    "data": {"videos": "data/videos"},  # the synth stage writes there
    "synth": {"clips_per_class": 3, "frames": 8, "width": 64, "height": 48},
    # 32 px through conv5_3 (stride 16) still gives a 2x2 grid, which the ConvLSTM head and render need.
    "extract": {"weights": "random:0", "frames": 4, "image_size": 32, "layer": "conv5_3", "batch_size": 16,
                "workers": 1},
    # 3 clips a class: round(0.34 * 3) = 1 each for test and val, one left for train (pipeline/splits.py).
    "split": {"val": 0.34, "test": 0.34},
    "head": {"channels": 8},
    "train": {"epochs": 2, "patience": 2},
    "render": {"per_class": 1, "strip_frames": 2},
}
CLASSES = 8  # pipeline.synthetic.CLASSES
CLIPS = CLASSES * TINY["synth"]["clips_per_class"]
GRID = (2, 2)  # conv5_3 at 32 px

RUNNING = re.compile(r"Running stage '([^']+)'")
UNCHANGED = re.compile(r"Stage '([^']+)' didn't change, skipping")


def _tool(name: str) -> str | None:
    """`name` next to this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


DVC = _tool("dvc")
GIT = shutil.which("git")


class Run:
    def __init__(self, args: list[str], proc: subprocess.CompletedProcess, seconds: float):
        self.args, self.returncode, self.output, self.seconds = args, proc.returncode, proc.stdout, seconds
        self.ran = RUNNING.findall(self.output)
        self.skipped = UNCHANGED.findall(self.output)

    def check(self) -> "Run":
        assert self.returncode == 0, f"{' '.join(self.args)} exited {self.returncode}:\n{self.output[-6000:]}"
        return self


class Workspace:
    """The copy: a git + DVC repo in a tmp dir, and how to run commands in it."""

    first: Run  # the first, full `dvc repro`

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env

    def run(self, *args: str, timeout: float = 300) -> Run:
        start = time.monotonic()
        proc = subprocess.run(list(args), cwd=self.root, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace",
                              timeout=timeout)
        return Run(list(args), proc, time.monotonic() - start)

    def dvc(self, *args: str, timeout: float = 300) -> Run:
        return self.run(DVC, *args, timeout=timeout)

    def git(self, *args: str) -> Run:
        return self.run(GIT, *args, timeout=60).check()

    def path(self, rel: str) -> Path:
        return self.root / rel

    def lines(self, rel: str) -> list[str]:
        return [line for line in self.path(rel).read_text().splitlines() if line.strip()]

    def json(self, rel: str) -> dict:
        return json.loads(self.path(rel).read_text())

    def csv(self, rel: str) -> list[dict[str, str]]:
        with open(self.path(rel), newline="") as f:
            return list(csv.DictReader(f))


def _repo_files() -> list[str]:
    """What a clean checkout has: tracked files, plus untracked ones git does not ignore (work in progress)."""
    out = subprocess.run([GIT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    return sorted({name for name in out.split("\0") if name})


def _tiny_params(real: dict) -> dict:
    params = copy.deepcopy(real)
    for section, values in TINY.items():
        assert section in real, f"params.yaml has no '{section}' section"
        for key, value in values.items():
            assert key in real[section], f"params.yaml has no '{section}.{key}'"
            params[section][key] = value
    return params


def _clean_env(tmp: Path, root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DVC_", "GIT_")) and k not in ("VIRTUAL_ENV_PROMPT",)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    (tmp / "dvc-global").mkdir()
    (tmp / "dvc-system").mkdir()
    (tmp / "gitconfig").write_text("")
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(root / ".dvc" / "site_cache"),  # .dvc/config's is relative to the cwd
        DVC_GLOBAL_CONFIG_DIR=str(tmp / "dvc-global"),          # no user-wide cache.dir or remote
        DVC_SYSTEM_CONFIG_DIR=str(tmp / "dvc-system"),
        GIT_CONFIG_GLOBAL=str(tmp / "gitconfig"),               # no user hooks, signing or templates
        GIT_CONFIG_NOSYSTEM="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
    )
    return env


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """The copy with tiny params, committed, after one full `dvc repro`."""
    if DVC is None:
        pytest.skip("dvc is not installed (pip install -e .)")
    if GIT is None:
        pytest.skip("git is not on PATH")
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout: cannot list its files")
    tmp = tmp_path_factory.mktemp("dvc_graph")
    root = tmp / "repo"
    root.mkdir()
    for name in _repo_files():
        src = REPO / name
        if not src.is_file():  # deleted in the working tree, or a submodule
            continue
        dst = root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    assert (root / ".dvc" / "config").is_file(), ".dvc/config is not tracked: the copy is no DVC repo"
    dvc_config = (root / ".dvc" / "config").read_text()
    assert re.search(r"analytics\s*=\s*false", dvc_config), ".dvc/config should turn analytics off"
    for out in ("data", "models", "metrics", "plots", "reports", "splits", ".dvc/cache", "cache/features.h5"):
        assert not (root / out).exists(), f"{out} was copied from the real checkout"

    w = Workspace(root, _clean_env(tmp, root))
    w.git("init", "-q")
    w.git("config", "user.name", "dvc graph test")
    w.git("config", "user.email", "dvc-graph-test@localhost")
    w.git("config", "commit.gpgsign", "false")
    w.git("add", "-A")
    w.git("commit", "-q", "-m", "copy of the repository")

    real = yaml.safe_load((REPO / "params.yaml").read_text())
    w.path("params.yaml").write_text(yaml.safe_dump(_tiny_params(real), sort_keys=False))
    w.git("commit", "-q", "-am", "tiny params")

    w.first = w.dvc("repro", timeout=900).check()
    print(f"\ndvc repro (everything): {w.first.seconds:.1f}s")
    return w


def test_repro_runs_every_stage_and_writes_well_formed_outputs(ws):
    from pipeline.features import FeatureCache

    assert ws.first.ran == STAGES, ws.first.output[-4000:]
    stages = yaml.safe_load(ws.path("dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES, "dvc.yaml stages changed: update this test"
    lock = yaml.safe_load(ws.path("dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert lock["stages"]["extract"]["params"]["params.yaml"]["extract"]["frames"] == TINY["extract"]["frames"]

    # synth + extract
    assert len([p for p in ws.path("data/videos").rglob("*") if p.is_file() and p.suffix != ".json"]) == CLIPS
    with FeatureCache(ws.path("cache/features.h5")) as c:
        assert len(c) == CLIPS and len(c.videos) == CLIPS and len(c.classes) == CLASSES
        assert c.feature_shape == (TINY["extract"]["frames"], 512, *GRID)
        assert not dict(c.failed)
        cached = set(c.videos)

    # split
    splits = {name: ws.lines(f"splits/{name}.txt") for name in ("train", "val", "test")}
    for name, keys in splits.items():
        assert keys, f"splits/{name}.txt is empty"
        assert len(set(keys)) == len(keys), f"splits/{name}.txt repeats a clip"
        assert {k.split("/")[0] for k in keys} == {v.split("/")[0] for v in cached}, f"a class misses {name}"
    train, val, test = (set(splits[n]) for n in ("train", "val", "test"))
    assert not (train & val or train & test or val & test), "splits overlap"
    assert train | val | test == cached
    summary = ws.json("splits/summary.json")
    assert summary["clips"] == {"train": len(train), "val": len(val), "test": len(test), "total": CLIPS}

    # train
    import torch

    ckpt = torch.load(ws.path("models/head.pt"), map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and ckpt["head"]["channels"] == TINY["head"]["channels"]
    assert list(ckpt["feature_shape"]) == [TINY["extract"]["frames"], 512, *GRID]
    train_metrics = ws.json("metrics/train.json")
    assert train_metrics["epochs_run"] == TINY["train"]["epochs"]
    for tsv in ("plots/train/loss.tsv", "plots/train/accuracy.tsv"):
        rows = [line.split("\t") for line in ws.lines(tsv)]
        assert rows[0] == ["epoch", "train", "val"], tsv
        assert [r[0] for r in rows[1:]] == ["1", "2"], tsv
        assert all(len(r) == 3 and all(float(x) >= 0 for x in r) for r in rows[1:]), tsv

    # evaluate
    ev = ws.json("metrics/eval.json")
    assert ev["split"] == "test" and ev["clips"] == len(test)
    assert 0.0 <= ev["video_accuracy"] <= 1.0
    assert ev["attention"]["clips_with_boxes"] > 0
    predictions = ws.csv("metrics/predictions.csv")
    assert len(predictions) == len(test) and {r["video"] for r in predictions} == test
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in predictions)
    confusion = ws.csv("plots/eval/confusion.csv")
    assert confusion and list(confusion[0]) == ["video", "actual", "predicted"]
    assert {r["video"]: (r["actual"], r["predicted"]) for r in confusion} == \
           {r["video"]: (r["true"], r["predicted"]) for r in predictions}
    assert all(r["actual"] == r["video"].split("/")[0] for r in confusion)
    right = sum(r["actual"] == r["predicted"] for r in confusion)
    assert ev["video_accuracy"] == pytest.approx(right / len(confusion), abs=1e-6)
    matrix = ev["confusion"]["matrix"]
    assert sum(map(sum, matrix)) == len(test)
    assert sum(matrix[i][i] for i in range(len(matrix))) == right

    # render
    reports = ws.path("reports")
    assert (reports / "index.html").is_file()
    assert (reports / "curves.png").is_file() and (reports / "confusion.png").is_file()
    strips, gifs = list(reports.glob("clips/*.png")), list(reports.glob("clips/*.gif"))
    assert strips and gifs
    links = _links(reports / "index.html")
    assert links, "index.html links no file"
    for link in links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc, f"index.html reaches outside the report: {link}"
        if link.startswith("#"):
            continue
        target = (reports / unquote(parts.path)).resolve()
        assert target.is_file(), f"index.html links {link}, which is not there"
        assert target.is_relative_to(reports.resolve()), f"index.html links outside reports/: {link}"
    linked = {(reports / unquote(urlsplit(l).path)).resolve() for l in links}
    assert {p.resolve() for p in strips + gifs} <= linked, "a rendered clip is not on the page"


def test_metrics_and_plots_show_offline(ws):
    shown = ws.dvc("metrics", "show", "--json").check()
    metrics = json.loads(shown.output)[""]["data"]
    for name in ("metrics/train.json", "metrics/eval.json", "splits/summary.json"):
        assert metrics.get(name, {}).get("data"), f"dvc metrics show lacks {name}: {shown.output[:2000]}"
    assert metrics["metrics/eval.json"]["data"]["video_accuracy"] == ws.json("metrics/eval.json")["video_accuracy"]
    table = ws.dvc("metrics", "show").check().output
    assert "metrics/eval.json" in table and "video_accuracy" in table

    # --json renders nothing, so nothing (vega from a CDN) is fetched.
    plots = ws.dvc("plots", "show", "--json").check()
    shown_plots = json.loads(plots.output)
    assert not shown_plots.get("errors"), shown_plots.get("errors")
    data = shown_plots["data"]
    for name in ("loss", "accuracy", "confusion"):
        assert data.get(name), f"dvc plots show lacks '{name}': {list(data)}"
    loss = data["loss"][0]["content"]["data"]["values"]
    assert {row["epoch"] for row in loss} == {"1", "2"}
    confusion = data["confusion"][0]["content"]["data"]["values"]
    assert len(confusion) == len(ws.lines("splits/test.txt"))


def test_second_repro_reruns_nothing(ws):
    again = ws.dvc("repro").check()
    print(f"\ndvc repro (nothing to do): {again.seconds:.1f}s")
    assert again.ran == [], again.output
    assert sorted(again.skipped) == sorted(STAGES), again.output
    assert "Data and pipelines are up to date" in again.output


def test_exp_run_reruns_exactly_the_stages_a_param_feeds(ws):
    from pipeline.features import FeatureCache

    before = {p: ws.path(p).stat().st_mtime_ns for p in ("data/videos", "cache/features.h5", "splits/test.txt")}
    head = ws.dvc("exp", "run", "-S", "head.cell=lstm").check()
    print(f"\ndvc exp run -S head.cell=lstm: {head.seconds:.1f}s")
    assert head.ran == ["train", "evaluate", "render"], head.output
    assert sorted(head.skipped) == ["extract", "split", "synth"], head.output
    assert {p: ws.path(p).stat().st_mtime_ns for p in before} == before, "an upstream output was rewritten"
    # The experiment's results land in the workspace (not --temp).
    assert yaml.safe_load(ws.path("params.yaml").read_text())["head"]["cell"] == "lstm"
    import torch

    assert torch.load(ws.path("models/head.pt"), map_location="cpu", weights_only=True)["head"]["cell"] == "lstm"
    assert ws.json("metrics/train.json")["epochs_run"] == TINY["train"]["epochs"]

    frames = TINY["extract"]["frames"] - 1
    extract = ws.dvc("exp", "run", "-S", f"extract.frames={frames}").check()
    print(f"dvc exp run -S extract.frames={frames}: {extract.seconds:.1f}s")
    assert extract.ran == ["extract", "split", "train", "evaluate", "render"], extract.output
    assert extract.skipped == ["synth"], extract.output
    with FeatureCache(ws.path("cache/features.h5")) as c:
        assert len(c) == CLIPS and c.feature_shape == (frames, 512, *GRID)
    assert ws.json("metrics/eval.json")["clips"] == len(ws.lines("splits/test.txt"))

    names = re.findall(r"Ran experiment\(s\): (\S+)", head.output + extract.output)
    assert len(names) == 2, head.output + extract.output
    listed = ws.dvc("exp", "list", "--name-only").check().output.split()
    assert set(names) <= set(listed), listed


class _LinkParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "poster", "srcset") and value:
                self.links.append(value.strip())


def _links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    parser = _LinkParser()
    parser.feed(text)
    css_urls = re.findall(r"url\(\s*['\"]?([^'\")]+)", text)
    return parser.links + css_urls
