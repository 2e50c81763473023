"""The decoding pool: a hung or crashing task costs only itself."""
from __future__ import annotations

import os
import time

from pipeline.workers import TaskError, TaskTimeout, TimedPool, WorkerCrashed


def work(task):
    if task == "hang":
        time.sleep(60)
    if task == "crash":
        os._exit(11)
    if task == "raise":
        raise ValueError("bad input")
    return task * 2


def test_results_failures_hangs_and_crashes_are_each_reported_against_their_task():
    tasks = [1, "hang", 2, "crash", "raise", 3]
    start = time.monotonic()
    with TimedPool(work, workers=2, timeout=2.0) as pool:
        results = dict(pool.imap_unordered(tasks))
    assert time.monotonic() - start < 20
    assert [results[t] for t in (1, 2, 3)] == [2, 4, 6]
    assert isinstance(results["hang"], TaskTimeout)
    assert isinstance(results["crash"], WorkerCrashed)
    assert isinstance(results["raise"], TaskError) and str(results["raise"]) == "bad input"


PARENT = """
import sys, time
from pipeline.workers import TimedPool
from tests.test_workers import work
pool = TimedPool(work, 2, timeout=60.0)
pool.start()
results = pool.imap_unordered(["hang", "hang"])
print(" ".join(str(p.pid) for p in pool._ctx.active_children()), flush=True)
time.sleep(60)
"""


def test_kill_9_of_the_parent_takes_its_workers_even_inside_a_hung_task(tmp_path):
    import signal
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workers = [int(p) for p in parent.stdout.readline().split()]  # once both workers run their hung task
    assert len(workers) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in workers):
        time.sleep(0.05)
    left = [p for p in workers if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "workers outlived a killed parent"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
