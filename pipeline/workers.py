"""A process pool where every task has a time limit and a crashing task costs only itself.

Decoders hang on some broken files and can crash the process on others; a plain multiprocessing pool
would then hang the whole run or lose every result. Here each worker runs one task at a time; a worker
past its deadline is killed and replaced, and a worker that dies is reported against the task it held.
Also here: the guards of helper threads (`GuardedThread`, `stop_producer`) that extract and the loader use.

Not pebble's ProcessPool (5.2.3, measured for issue 23): it passes tests/test_workers.py and
test_extract_failures.py in 64 code lines to this pool's 96, but it stops a timed-out worker with SIGTERM,
3 s of grace, then SIGKILL, holding the lock every worker needs: a task stuck in native code (as a hung
decoder is) was reported 5.0 s after its start instead of 2.0 s (time limit 2 s), the other worker's
results stalled ~3 s meanwhile, and closing the pool cost 3 s per such worker (here 0.01 s).
"""
from __future__ import annotations

import multiprocessing as mp
import os
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


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the process that started it dies (a `kill -9` of extract
    gives no chance to close the pool), so a worker inside a hung task is no orphan; elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _serve(fn: Callable[..., Any], conn: Connection, warm: Callable[[], None] | None = None,
           parent: int | None = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    if warm is not None:
        try:
            warm()
        except Exception:  # noqa: BLE001 - the first task meets the same problem and reports it
            pass
    while True:
        try:
            task = conn.recv()
        except (EOFError, KeyboardInterrupt):
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

    def __init__(self, fn: Callable[[Any], Any], workers: int = 2, timeout: float = 60.0,
                 warm: Callable[[], None] | None = None):
        self.fn, self.workers, self.timeout, self.warm = fn, max(1, workers), timeout, warm  # warm: run once per worker
        self._ctx = mp.get_context("spawn")  # never fork a process that holds torch's thread pools
        self._pool: list[_Worker] = []

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_serve, args=(self.fn, child, self.warm, os.getpid()), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(5)
        worker.conn.close()
        self._pool[self._pool.index(worker)] = self._start()

    def start(self) -> "TimedPool":
        """Spawn the workers now (else the first `imap_unordered` does): their start-up (a fresh interpreter
        and its imports) can then overlap other work of the caller."""
        if not self._pool:
            self._pool = [self._start() for _ in range(self.workers)]
        return self

    def imap_unordered(self, tasks: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        pending = iter(tasks)
        exhausted = False
        self.start()
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
        """Stop every worker now. A worker holds nothing worth waiting for (a result nobody will read, at most),
        and asked politely it would first finish what it is doing (its start-up imports, ~0.6 s with decord;
        a task, up to the timeout) and then unload FFmpeg and the CUDA libraries (~1 s): killed, it is gone at
        once."""
        for worker in self._pool:
            worker.process.kill()
        for worker in self._pool:
            worker.process.join()
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


class GuardedThread:
    """A helper thread whose death is seen, never waited on forever.

    The body runs under a guard: an exception (a pool that cannot spawn: EAGAIN, ENOMEM, too many open
    files; a writer that cannot write: disk full, an h5py error) is kept in `error` and `done` is set, so
    the thread that feeds or drains it stops with that error (as `error_class`, naming the thread, plus
    `hint`) instead of blocking on a queue nobody serves.
    """

    def __init__(self, name: str, body: Callable[[], None], error_class: type[Exception] = RuntimeError,
                 hint: str = "") -> None:
        self.name, self.error, self.error_class, self.hint = name, None, error_class, hint
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._guarded, args=(body,), name=name, daemon=True)

    def _guarded(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:  # noqa: BLE001 - reported by the other thread, with this one's name
            self.error = exc
        finally:
            self.done.set()

    def _fail(self, what: str) -> Exception:
        return self.error_class(f"the {self.name} {what}" + (f"; {self.hint}" if self.hint else ""))

    def put(self, items: queue.Queue, item: Any) -> None:
        """Put `item` for this thread to consume; raises if it has died (its queue would never drain)."""
        while True:
            self.raise_if_failed()
            try:
                items.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def get(self, items: queue.Queue) -> Any:
        """The next item this thread produced; raises if it died before producing its end marker."""
        while True:
            try:
                return items.get(timeout=0.2)
            except queue.Empty:
                if self.done.is_set() and items.empty():
                    self.raise_if_failed()
                    raise self._fail("stopped without finishing")

    def raise_if_failed(self) -> None:
        if self.error is not None:
            from pipeline.errors import describe

            raise self._fail(f"failed: {describe(self.error)}") from self.error  # the cause: is the disk full?
