"""The DVC graph end to end, as a user runs it: `dvc repro`, a no-op rerun, and `dvc exp run -S`.

A copy of the repository made a fresh, offline git + DVC project with tiny parameters (tests/project_copy.py),
so the whole graph synth -> extract -> split -> train -> evaluate -> render runs from nothing in well under a
minute on 2 CPU cores. That first `dvc repro` runs once a session (tests/conftest.py `reproduced_project`,
shared with tests/test_journey.py); this module works in a copy of the result.
"""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from tests.project_copy import TINY, Project, Result, copy_project

pytestmark = pytest.mark.slow

STAGES = ["synth", "extract", "split", "train", "evaluate", "render"]

CLASSES = 8  # pipeline.video.synthetic.CLASSES
CLIPS = CLASSES * TINY["synth"]["clips_per_class"]
GRID = (2, 2)  # conv5_3 at 32 px


class Workspace(Project):
    first: Result  # the first, full `dvc repro`


@pytest.fixture(scope="module")
def ws(reproduced_project, tmp_path_factory) -> Workspace:
    """The copy with tiny params (tests/project_copy.py's TINY), committed, after one full `dvc repro`."""
    w = copy_project(reproduced_project, tmp_path_factory.mktemp("dvc_graph"), Workspace)
    w.first = reproduced_project.first
    print(f"\ndvc repro (everything): {w.first.seconds:.1f}s")
    return w


def test_repro_runs_every_stage_and_writes_well_formed_outputs(ws):
    from pipeline.features.reader import open_cache

    assert ws.first.ran == STAGES, ws.first.output[-4000:]
    stages = yaml.safe_load(ws.path("dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES, "dvc.yaml stages changed: update this test"
    lock = yaml.safe_load(ws.path("dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert lock["stages"]["extract"]["params"]["params.yaml"]["extract"]["frames"] == TINY["extract"]["frames"]

    # synth + extract
    assert len([p for p in ws.path("data/videos").rglob("*") if p.is_file() and p.suffix != ".json"]) == CLIPS
    with open_cache(ws.path("cache/features.h5")) as c:
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
    linked = {(reports / unquote(urlsplit(link).path)).resolve() for link in links}
    assert {p.resolve() for p in strips + gifs} <= linked, "a rendered clip is not on the page"


def test_metrics_and_plots_show_offline(ws):
    shown = ws.dvc("metrics", "show", "--json").check()
    metrics = json.loads(shown.stdout)[""]["data"]
    for name in ("metrics/train.json", "metrics/eval.json", "splits/summary.json"):
        assert metrics.get(name, {}).get("data"), f"dvc metrics show lacks {name}: {shown.output[:2000]}"
    assert metrics["metrics/eval.json"]["data"]["video_accuracy"] == ws.json("metrics/eval.json")["video_accuracy"]
    table = ws.dvc("metrics", "show").check().output
    assert "metrics/eval.json" in table and "video_accuracy" in table

    # --json renders nothing, so nothing (vega from a CDN) is fetched.
    plots = ws.dvc("plots", "show", "--json").check()
    shown_plots = json.loads(plots.stdout)
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
    from pipeline.features.reader import open_cache

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
    with open_cache(ws.path("cache/features.h5")) as c:
        assert len(c) == CLIPS and c.feature_shape == (frames, 512, *GRID)
    assert ws.json("metrics/eval.json")["clips"] == len(ws.lines("splits/test.txt"))

    names = re.findall(r"Ran experiment\(s\): (\S+)", head.output + extract.output)
    assert len(names) == 2, head.output + extract.output
    listed = ws.dvc("exp", "list", "--name-only").check().stdout.split()
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
