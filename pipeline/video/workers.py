"""A process pool where every task has a time limit and a crashing task costs only itself.

Decoders hang on some broken files and can crash the process on others; a plain multiprocessing pool
would then hang the whole run or lose every result. Here each worker runs one task at a time; a worker
past its deadline is killed and replaced, and a worker that dies is reported against the task it held.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable, Iterator


class TaskTimeout(Exception):
    """The task ran past its time limit; its worker was killed."""


class WorkerCrashed(Exception):
    """The worker process died (e.g. a segfault in native code) while running the task."""


@dataclass
class TaskError(Exception):
    """An exception raised inside the task, carried back with its type name and message."""

    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


def _serve(fn: Callable[..., Any], conn: Connection) -> None:
    while True:
        try:
            task = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if task is None:
            return
        try:
            conn.send(("ok", fn(task)))
        except Exception as exc:
            conn.send(("error", (exc.__class__.__name__, str(exc) or traceback.format_exc(limit=1))))


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    task: Any = None
    started: float = 0.0


class TimedPool:
    """Run `fn(task)` in `workers` spawned processes; `imap_unordered` yields (task, result or exception)."""

    def __init__(self, fn: Callable[[Any], Any], workers: int = 2, timeout: float = 60.0):
        self.fn, self.workers, self.timeout = fn, max(1, workers), timeout
        self._ctx = mp.get_context("spawn")  # never fork a process that holds torch's thread pools
        self._pool: list[_Worker] = []

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_serve, args=(self.fn, child), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(5)
        worker.conn.close()
        self._pool[self._pool.index(worker)] = self._start()

    def imap_unordered(self, tasks: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        pending = iter(tasks)
        exhausted = False
        if not self._pool:
            self._pool = [self._start() for _ in range(self.workers)]
        while True:
            for worker in self._pool:
                if worker.task is None and not exhausted:
                    try:
                        task = next(pending)
                    except StopIteration:
                        exhausted = True
                        break
                    worker.task, worker.started = task, time.monotonic()
                    worker.conn.send(task)
            busy = [w for w in self._pool if w.task is not None]
            if not busy:
                return
            deadline = min(w.started for w in busy) + self.timeout
            ready = wait([w.conn for w in busy], timeout=max(0.0, deadline - time.monotonic()))
            for worker in busy:
                task = worker.task
                if worker.conn in ready:
                    try:
                        status, payload = worker.conn.recv()
                    except (EOFError, OSError):
                        worker.task = None
                        self._replace(worker)
                        yield task, WorkerCrashed(f"decoder process died (exit code {worker.process.exitcode})")
                        continue
                    worker.task = None
                    yield task, payload if status == "ok" else TaskError(*payload)
                elif time.monotonic() - worker.started >= self.timeout:
                    worker.task = None
                    self._replace(worker)
                    yield task, TaskTimeout(f"timed out after {self.timeout:g} s")

    def close(self) -> None:
        for worker in self._pool:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._pool:
            worker.process.join(2)
            if worker.process.is_alive():
                worker.process.kill()
            worker.conn.close()
        self._pool = []

    def __enter__(self) -> "TimedPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_producer(stop: threading.Event, producer: threading.Thread, items: queue.Queue) -> None:
    """Tell a producer thread to stop and wait for it, emptying `items` so a blocked put() can return."""
    stop.set()
    while producer.is_alive():
        try:
            items.get(timeout=0.05)
        except queue.Empty:
            pass
