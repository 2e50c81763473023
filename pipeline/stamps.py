"""What an output may say about *when* it was made: nothing, unless SOURCE_DATE_EPOCH says.

Outputs are a function of their inputs (docs/DESIGN.md, "Reproducible outputs and a cache the team shares"): two
clones of one commit must write the same bytes, so DVC's md5s and dvc.lock do not move. A wall-clock time in
the cache or the report breaks that; the reproducible-builds convention, SOURCE_DATE_EPOCH (seconds since
1970, UTC), is the one time a writer may record.
"""
from __future__ import annotations

import datetime as _dt
import os


def source_date() -> str | None:
    """SOURCE_DATE_EPOCH as an ISO 8601 UTC time, or None where it is unset or not a whole number."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value.isdigit():
        return None
    return _dt.datetime.fromtimestamp(int(value), _dt.timezone.utc).isoformat(timespec="seconds")
