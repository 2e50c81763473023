"""A full disk is one clear line, never a crash: mid-extract, before the join and mid-join.

HDF5 2.0 segfaults when a file it could not write is closed (pipeline/isolate.py), so a disk that filled while
shards or the join were written used to end the run with exit 139 and pages of h5py tracebacks. Now shards are
built in memory and written by Python, the join runs in a forked child, its room is checked up front, and the
run ends with one `error:` line saying how many clips are safe and how much room the rest needs.

The end-to-end test runs the CLI on a real small filesystem: a tmpfs of a few hundred KB mounted in a private
mount namespace (`unshare --mount`, as root; `unshare --mount --map-root-user` otherwise), so nothing is left
mounted whatever happens. Where neither is allowed (no CAP_SYS_ADMIN, user namespaces off) it is skipped,
saying so; the in-process tests below still cover the pieces.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ExtractConfig, SynthConfig
from pipeline.features import space
from pipeline.features.extractor import ExtractError
from pipeline.features.reader import open_cache
from pipeline.isolate import ChildDied, run_forked
from pipeline.video.synthetic import generate_dataset
from stages import extract

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(weights="random:0", frames=4, image_size=32, layer="conv5_3", workers=1, shard_clips=2)


def _segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _full() -> None:
    raise OSError(errno.ENOSPC, "No space left on device", "/x/features.h5.tmp")


def test_a_crash_in_the_forked_child_is_one_exception_here():
    assert run_forked(sum, [1, 2, 3]) == 6
    with pytest.raises(ChildDied, match="SIGSEGV"):
        run_forked(_segfault)
    with pytest.raises(OSError) as raised:
        run_forked(_full)
    assert raised.value.errno == errno.ENOSPC and space.is_disk_full(raised.value)


def test_the_join_is_refused_up_front_when_the_disk_cannot_hold_a_second_copy(mini_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "f.h5"
    extract.run(mini_dataset, cache, ExtractConfig(**SETTINGS), progress=False)
    shutil.copy(mini_dataset / "jump" / "clip0.avi", mini_dataset / "jump" / "clip7.avi")
    stamp = cache.read_bytes()
    monkeypatch.setattr(space, "free_bytes", lambda path: 1000)
    with pytest.raises(ExtractError, match=r"^not enough space to join the cache: .* 7 clips are safe"):
        extract.run(mini_dataset, cache, ExtractConfig(**SETTINGS), progress=False)
    assert cache.read_bytes() == stamp and len(list((tmp_path / "f.h5.parts").glob("shard-*.h5"))) == 1
    monkeypatch.undo()
    done = extract.run(mini_dataset, cache, ExtractConfig(**SETTINGS), progress=False)
    assert (done.extracted, done.total_clips) == (0, 7)


def _namespace() -> list[str] | None:
    """The `unshare` prefix that gives a private mount namespace where tmpfs may be mounted, or None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for prefix in ([unshare, "--mount"], [unshare, "--mount", "--map-root-user"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                                "mount -t tmpfs -o size=64k tmpfs \"$TMPDIR\""], env={**os.environ,
                               "TMPDIR": "/tmp"}, capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return prefix
    return None


# The CLI against a tmpfs that grows: full while shards are written (100k); room for the shards but not for
# the join (300k), with the up-front check switched off so that the join itself meets the full disk (the check
# is the in-process test above); then room (2m): the rerun joins. Each step's exit status and output go to out/.
SCRIPT = r"""
set -u
mount -t tmpfs -o size=100k tmpfs "$SMALL"
step() { "$@" > "$OUT/$N.log" 2>&1; echo $? > "$OUT/$N.rc"; N=$((N + 1)); }
N=1
step $EXTRACT
mount -o remount,size=300k "$SMALL"
step $PY -c "import stages.extract as e; e.require_room_for_join = lambda cache: None
from pipeline.__main__ import main; main()" ${EXTRACT#"$PY -m pipeline "}
mount -o remount,size=2m "$SMALL"
step $EXTRACT
cp "$SMALL/features.h5" "$OUT/features.h5"
"""


@pytest.mark.slow  # fast form: test_a_crash_in_the_forked_child_is_one_exception_here and the up-front refusal
def test_a_full_disk_mid_extract_and_mid_join_is_one_line_and_a_rerun_with_room_equals_a_clean_run(tmp_path):
    prefix = _namespace()
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (needs root or unprivileged user namespaces: unshare --mount)")
    videos = tmp_path / "videos"
    generate_dataset(videos, SynthConfig(seed=0, clips_per_class=3, frames=8, width=64, height=48),
                     classes=["move_left", "move_right", "move_up", "move_down"])
    small, out = tmp_path / "small", tmp_path / "out"
    small.mkdir()
    out.mkdir()
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SETTINGS.items())
    command = f"{sys.executable} -m pipeline extract {videos} {small}/features.h5 {flags} --no-progress " \
              f"--params {tmp_path}/none.yaml"
    env = {**os.environ, "SMALL": str(small), "OUT": str(out), "PY": sys.executable, "EXTRACT": command,
           "PYTHONPATH": str(REPO)}
    subprocess.run([*prefix, "sh", "-c", SCRIPT], cwd=tmp_path, env=env, timeout=600, check=False)
    logs = [(out / f"{n}.log").read_text() for n in range(1, 4)]
    codes = [int((out / f"{n}.rc").read_text()) for n in range(1, 4)]
    shown = "\n".join(f"--- step {n + 1}: exit {c}\n{log[-1500:]}" for n, (c, log) in enumerate(zip(codes, logs)))
    assert codes == [2, 2, 0], shown
    for log in logs[:2]:
        lines = [line for line in log.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: disk full while writing"), shown
        assert "Traceback" not in log and "h5py" not in log, shown
    assert "clips are safe" in logs[0] and "and the join about" in logs[0], shown
    assert "12 of 12 clips are safe" in logs[1], shown  # every clip in shards, the join cut short

    clean = tmp_path / "clean.h5"
    extract.run(videos, clean, ExtractConfig(**SETTINGS), progress=False)
    with open_cache(out / "features.h5") as resumed, open_cache(clean) as expected:
        assert resumed.videos == expected.videos and resumed.source == expected.source
        np.testing.assert_array_equal(resumed.load(), expected.load())
