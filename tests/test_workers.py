"""The decoding pool: a hung or crashing task costs only itself."""
from __future__ import annotations

import os
import time

from pipeline.video.workers import TaskError, TaskTimeout, TimedPool, WorkerCrashed


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
