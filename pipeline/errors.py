"""UserError: the one base of every error a user can cause.

The CLI turns a UserError into one red line and exit status 2; anything else is a programming error and
keeps its traceback. Each module raises its own subclass (ConfigError, CacheError, ...), so a message
can say where it comes from while the CLI needs to know only this class.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user gave or asked for that cannot be used; the message says what to do instead."""
