"""A copy of this repository made a fresh, offline git + DVC project with tiny parameters, for tests that run
the DVC graph or the CLI end to end (tests/test_dvc_graph.py, tests/test_journey.py, tests/test_dvc_folder_cache.py).

Those tests copy prepared projects rather than build their own (tests/conftest.py, session-scoped):
`fresh_project` (`make_project` with `TINY`: committed, nothing run) and `reproduced_project` (a copy of it
after one full `dvc repro`, ~40 s on 2 cores, then moved, so copies read their own data/videos). `copy_project`
copies one (files, git and DVC state, outputs, DVC cache and logs) in about a second.

The copy holds the checkout's git files only (tracked ones plus untracked ones git does not ignore): no data,
caches or outputs of the real checkout. DVC and git in it are kept off everything outside it: their global and
system config point into the tmp dir, DVC's site cache dir into the copy, analytics and update checks are off,
nothing is pulled. Every command's stdout and stderr go to files in a log folder beside the copy (as in CI or
`> log 2>&1`: not a terminal), and come back as a `Result`; `run_in_pty` runs one on a pseudo-terminal
instead, where rich draws its live bars.
"""
from __future__ import annotations

import copy
import csv
import errno
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# The tiny run the CLI/DVC tests share (tests/test_journey.py, tests/test_dvc_graph.py; tests/test_progress_on.py
# passes the same synth and extract values as flags). Every value must already be a key of the real params.yaml
# (checked): the same sections and fields the real run has, only smaller.
TINY = {
    "data": {"videos": "data/videos"},  # the synth stage writes there
    "synth": {"clips_per_class": 3, "frames": 8, "width": 64, "height": 48},
    # 32 px through conv5_3 (stride 16) still gives a 2x2 grid, which the ConvLSTM head and render need.
    "extract": {"weights": "random:0", "frames": 4, "image_size": 32, "layer": "conv5_3", "batch_size": 16,
                "workers": 1},
    # 3 clips a class: round(0.34 * 3) = 1 each for test and val, one left for train (pipeline/video/splits.py).
    "split": {"val": 0.34, "test": 0.34},
    "head": {"channels": 8},
    "train": {"epochs": 2, "patience": 2},
    "render": {"per_class": 1, "strip_frames": 2},
}

RUNNING = re.compile(r"Running stage '([^']+)'")
UNCHANGED = re.compile(r"Stage '([^']+)' didn't change, skipping")


def _tool(name: str) -> str | None:
    """`name` next to this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)


DVC, GIT = _tool("dvc"), shutil.which("git")


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def ran(self) -> list[str]:
        """The stages a `dvc repro` / `dvc exp run` ran, in order."""
        return RUNNING.findall(self.output)

    @property
    def skipped(self) -> list[str]:
        """The stages it found unchanged."""
        return UNCHANGED.findall(self.output)

    def check(self, status: int = 0) -> Result:
        """Exit status `status` and no traceback anywhere in the output."""
        shown = f"$ {' '.join(self.args)}\n--- stdout\n{self.stdout[-5000:]}\n--- stderr\n{self.stderr[-5000:]}"
        assert self.returncode == status, f"exited {self.returncode}, expected {status}\n{shown}"
        assert "Traceback" not in self.output, f"a traceback\n{shown}"
        return self


class Project:
    """The copy, its logs, and how to run things in it and read what they wrote."""

    def __init__(self, root: Path, logs: Path, env: dict[str, str]):
        self.root, self.logs, self.env = root, logs, env
        self.timings: dict[str, float] = {}  # log name -> seconds, in the order the commands ran

    def run(self, *args: str, name: str | None = None, timeout: float = 300) -> Result:
        """`args` in the copy, stdout and stderr to `<name>.stdout` / `.stderr` in the log folder."""
        if name is None:  # numbered: the same command may run more than once
            name = f"{len(self.timings) + 1:02d}-" + re.sub(r"[^\w.=-]+", "_", "-".join(
                [Path(args[0]).name, *args[1:3]]))
        out, err = self.logs / f"{name}.stdout", self.logs / f"{name}.stderr"
        start = time.monotonic()
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.run(list(args), cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=o,
                                  stderr=e, timeout=timeout, check=False)
        seconds = time.monotonic() - start
        self.timings[name] = seconds
        return Result(list(args), proc.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"),
                      seconds)

    def dvc(self, *args: str, name: str | None = None, timeout: float = 600) -> Result:
        return self.run(DVC, *args, name=name, timeout=timeout)

    def git(self, *args: str) -> str:
        """`git args` in the copy, which must succeed; its stdout."""
        proc = subprocess.run([GIT, *args], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    def path(self, rel: str) -> Path:
        return self.root / rel

    def lines(self, rel: str) -> list[str]:
        return [line for line in self.path(rel).read_text().splitlines() if line.strip()]

    def json(self, rel: str):
        return json.loads(self.path(rel).read_text())

    def csv(self, rel: str) -> list[dict[str, str]]:
        with open(self.path(rel), newline="") as f:
            return list(csv.DictReader(f))


def run_in_pty(argv: list[str], cwd: Path, env: dict[str, str], timeout: float, columns: int = 120, lines: int = 40,
               term: str = "xterm-256color") -> tuple[int, bytes, float]:
    """`argv` with stdin, stdout and stderr on a pseudo-terminal of `columns` x `lines`, where rich draws live
    bars: its exit status, everything it wrote (escape codes included) and the seconds it took. A run past
    `timeout` is killed with its process group (its workers too) and fails the test."""
    import fcntl
    import struct
    import termios

    env = {**env, "TERM": term, "COLUMNS": str(columns), "LINES": str(lines)}
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True)  # its own group: a hang is killed with its workers
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            if time.monotonic() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"{' '.join(argv)}: still running after {timeout}s under a pty\n"
                                     + b"".join(chunks).decode(errors="replace")[-3000:])
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # EIO: every process holding the terminal has closed it
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, b"".join(chunks), time.monotonic() - start


def repo_files() -> list[str]:
    """A clean checkout's files: tracked ones plus untracked ones git does not ignore (work in progress)."""
    out = subprocess.run([GIT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    return sorted({name for name in out.split("\0") if name})


def tiny_params(real: dict, tiny: dict[str, dict]) -> dict:
    """`real` (params.yaml) with `tiny`'s values; each must already be a key there, so the tiny run exercises the
    same sections and fields the real one does, only smaller."""
    params = copy.deepcopy(real)
    for section, values in tiny.items():
        assert section in real, f"params.yaml has no '{section}' section"
        for key, value in values.items():
            assert key in real[section], f"params.yaml has no '{section}.{key}'"
            params[section][key] = value
    return params


def clean_env(tmp: Path, root: Path) -> dict[str, str]:
    """Nothing from outside the copy: no user or system DVC/git config, no analytics, no update checks, no
    terminal settings (commands write to files)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DVC_", "GIT_", "PYTEST_")) and k not in ("VIRTUAL_ENV_PROMPT", "NO_COLOR",
                                                                         "FORCE_COLOR", "TERM", "COLUMNS", "LINES")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for folder in ("dvc-global", "dvc-system"):
        (tmp / folder).mkdir()
    # No user hooks, signing or templates; an identity to commit with.
    (tmp / "gitconfig").write_text("[user]\n\tname = project copy test\n\temail = project-copy-test@localhost\n"
                                   "[commit]\n\tgpgsign = false\n[init]\n\tdefaultBranch = main\n")
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(root / ".dvc" / "site_cache"),  # .dvc/config's is relative to the cwd
        DVC_GLOBAL_CONFIG_DIR=str(tmp / "dvc-global"),          # no user-wide cache.dir or remote
        DVC_SYSTEM_CONFIG_DIR=str(tmp / "dvc-system"),
        GIT_CONFIG_GLOBAL=str(tmp / "gitconfig"),
        GIT_CONFIG_NOSYSTEM="1",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        COLUMNS="160",  # the tables' width when written to a file
    )
    return env


P = TypeVar("P", bound=Project)


def make_project(tmp: Path, tiny: dict[str, dict], kind: type[P] = Project) -> P:
    """In the empty folder `tmp`: `repo/`, a copy of the checkout with no outputs, params.yaml made tiny, all
    committed to a fresh git repo, DVC offline; `logs/` for the commands' output. Skips where dvc or git is
    missing or the checkout is no git checkout."""
    if DVC is None or GIT is None:
        pytest.skip("needs dvc (pip install -e .) and git")
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout: cannot list its files")
    root, logs = tmp / "repo", tmp / "logs"
    root.mkdir()
    logs.mkdir()
    for name in repo_files():
        src = REPO / name
        if src.is_file():  # not deleted in the working tree, not a submodule
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name, follow_symlinks=False)
    assert (root / ".dvc" / "config").is_file(), ".dvc/config is not tracked: the copy is no DVC repo"
    analytics_off = re.compile(r"analytics\s*=\s*false")
    assert analytics_off.search((root / ".dvc" / "config").read_text()), ".dvc/config should turn analytics off"
    for out in ("data", "models", "reports", "splits/train.txt", ".dvc/cache", "cache/features.h5"):
        assert not (root / out).exists(), f"{out} was copied from the real checkout"
    # Git keeps the `cache: false` outputs (metrics/, plots/, splits/summary.json), so the checkout may have
    # committed ones; the copy starts from nothing.
    for out in ("metrics", "plots", "splits"):
        shutil.rmtree(root / out, ignore_errors=True)

    project = kind(root, logs, clean_env(tmp, root))
    project.git("init", "-q")
    project.git("config", "core.autocrlf", "false")
    project.dvc("config", "core.analytics", "false", name="dvc-config").check()
    assert analytics_off.search(project.path(".dvc/config").read_text())
    real = yaml.safe_load((REPO / "params.yaml").read_text())
    project.path("params.yaml").write_text(yaml.safe_dump(tiny_params(real, tiny), sort_keys=False))
    project.git("add", "-A")
    project.git("commit", "-q", "-m", "a fresh clone, tiny params")
    return project


def copy_project(template: Project, tmp: Path, kind: type[P] = Project, tiny: dict[str, dict] | None = None) -> P:
    """In the empty folder `tmp`: `repo/`, a copy of the prepared project `template` (every file: git and DVC
    state, outputs and DVC cache too), `logs/` with the template's logs, and git/DVC config of its own. With
    `tiny`, params.yaml becomes the real one with those values instead, committed. The template is not touched."""
    root, logs = tmp / "repo", tmp / "logs"
    shutil.copytree(template.root, root, symlinks=True)
    shutil.copytree(template.logs, logs)
    project = kind(root, logs, clean_env(tmp, root))
    if tiny is not None:
        real = yaml.safe_load((REPO / "params.yaml").read_text())
        project.path("params.yaml").write_text(yaml.safe_dump(tiny_params(real, tiny), sort_keys=False))
        project.git("add", "-A")
        project.git("commit", "-q", "-m", "other tiny params")
    return project


class Reproduced(Project):
    first: Result  # the full `dvc repro` that built it


def reproduce(template: Project, tmp: Path) -> Reproduced:
    """A copy of `template` in `tmp` after one full `dvc repro` (which must succeed), not committed, then moved
    to `tmp/prepared`: the path extract recorded as the dataset root is gone, so the graph's stages in a copy
    read that copy's data/videos (params.yaml's data.videos), never this one's."""
    built = copy_project(template, tmp, Reproduced)
    built.first = built.dvc("repro", name="dvc-repro", timeout=900).check()
    moved = tmp / "prepared"
    os.rename(built.root, moved)
    built.root = moved
    return built
