"""Run one function in a forked child, so that a crash inside a C library costs the child, not the run.

Why: HDF5 (2.0, through h5py 3.16; measured 2026-12-07) cannot survive a write that fails. When a disk fills
while a file is written, h5py raises, and then closing that file - explicitly, by garbage collection or in
HDF5's own exit handler - ends the process with a segmentation fault (exit 139) and a page of tracebacks.
Nothing can be done in the process afterwards. So the one big HDF5 write that may meet a full disk, the
cache's join, runs in a child: its failure comes back as an ordinary exception (an OSError keeps its errno),
a child killed by a signal as one line, and the parent's HDF5 state is never touched.

The child is forked (no interpreter start, no re-import: milliseconds), never uses the parent's threads, and
leaves with `os._exit` (no atexit handler, no flush of the parent's buffers). It is killed with its parent
(PR_SET_PDEATHSIG on Linux), so a `kill -9` of the run never leaves a child writing behind it. Where fork is
missing (Windows) the function runs in process.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


_ANSWER_FD: int | None = None  # in a forked child: where its answer goes


class ChildDied(RuntimeError):
    """The child ended without an answer (a signal, most likely a crash in a C library)."""


def abandon(exc: BaseException) -> None:
    """In a `run_forked` child: answer with `exc` now and leave, before anything is closed or collected (an
    h5py file that failed a write crashes the process when it is closed). Elsewhere: nothing; the caller
    re-raises."""
    if _ANSWER_FD is not None:
        _send(_ANSWER_FD, _pickled_error(exc))
        os._exit(0)


def _send(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _prctl():
    """libc's prctl, looked up in the parent: a forked child must not dlopen (another thread of the parent may
    have held the loader's lock at the fork)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(parent: int, prctl) -> None:
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _answer(fn: Callable[..., Any], args: tuple) -> bytes:
    """The pickled ("ok", value), ("raise", the exception itself) or, when it does not pickle, ("error", text)."""
    try:
        return pickle.dumps(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent, as data
        return _pickled_error(exc)  # its traceback is kept alive: freeing its frames may close a failed file


def _pickled_error(exc: BaseException) -> bytes:
    try:
        return pickle.dumps(("raise", exc))
    except Exception:  # noqa: BLE001 - an exception that does not pickle: its class and first line
        text = str(exc).splitlines()[0] if str(exc) else ""
        return pickle.dumps(("error", f"{type(exc).__name__}: {text}" if text else type(exc).__name__))


def run_forked(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a forked child; its return value (picklable) or its exception, raised here (an OSError
    keeps its errno, a UserError its class; one that does not pickle becomes a RuntimeError of its class and
    first line). A child that dies without answering raises ChildDied naming the signal."""
    if not hasattr(os, "fork") or threading.current_thread() is not threading.main_thread():
        # a fork from another thread was seen to hang in the child, inside os.fork itself (a futex, with the
        # parent's other threads mid-flight): there the function runs in process, as it did before isolation
        return fn(*args)
    prctl = _prctl()
    read, write = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: answer, then leave without running anything of the parent's
        global _ANSWER_FD
        code = 1
        try:
            os.close(read)
            _die_with_parent(parent, prctl)
            import faulthandler

            faulthandler.disable()  # a crash here is reported by the parent, in one line
            quiet = os.open(os.devnull, os.O_WRONLY)  # HDF5's and h5py's own complaints: the answer says it
            os.dup2(quiet, 1)
            os.dup2(quiet, 2)
            _ANSWER_FD = write
            _send(write, _answer(fn, args))
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as src:
            data = src.read()
    finally:
        _, status = os.waitpid(pid, 0)
    if not data:
        how = f"signal {signal.Signals(-os.waitstatus_to_exitcode(status)).name}" \
            if os.WIFSIGNALED(status) else f"exit status {os.waitstatus_to_exitcode(status)}"
        raise ChildDied(f"the process writing it died ({how})")
    kind, value = pickle.loads(data)
    if kind == "ok":
        return value
    if kind == "raise":
        raise value
    raise RuntimeError(value)
