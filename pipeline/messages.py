"""Exceptions from libraries (torch, PyAV, decord) turned into text that fits in a one-line user message."""
from __future__ import annotations


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of `exc`'s text, at most `limit` characters; its class name when it has no text."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else exc.__class__.__name__)[:limit]
