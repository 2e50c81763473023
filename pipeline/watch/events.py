"""Events: a class above its threshold for long enough, one JSON line each.

Each scored window gives every class a probability, at the window's time (its centre). A class's event
starts at the first window at or above its threshold and goes on while its windows stay at or above
threshold - hysteresis, so a fight whose probability wavers around the threshold is one event, not ten.
It ends at the last window still above that lower line; it is reported only when it lasted at least
`min_duration` seconds (end - start), with its peak probability and where the attention was at the peak
(a box in the source's pixels). `EventLog` writes each as one line of JSON and flushes it at once, so a
reader tailing the file (or a run that is killed) has every event closed so far:

    {"start": 12.4, "end": 19.8, "label": "fight", "probability": 0.97, "box": [64, 20, 224, 180]}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.watch.online import Window


class AlertError(UserError):
    """An --alert that names no class of the model or gives a threshold out of range."""


@dataclass
class Event:
    label: str
    start: float
    end: float
    probability: float  # the peak over its windows
    box: list[int] = field(default_factory=list)  # [x0, y0, x1, y1] in pixels at the peak

    def as_json(self) -> dict:
        return {"start": round(self.start, 3), "end": round(self.end, 3), "label": self.label,
                "probability": round(self.probability, 4), "box": list(self.box)}


def parse_alerts(alerts: Sequence[str], classes: Sequence[str], threshold: float) -> dict[str, float]:
    """--alert CLASS[:THRESHOLD] ... -> {class: threshold}; none given: every class at `threshold`."""
    if not alerts:
        return {c: threshold for c in classes}
    chosen: dict[str, float] = {}
    for alert in alerts:
        name, _, value = alert.rpartition(":") if ":" in alert else (alert, "", "")
        if name not in classes:
            raise AlertError(f"--alert {alert}: the model has no class {name!r}; its classes: {', '.join(classes)}")
        try:
            level = float(value) if value else threshold
        except ValueError:
            raise AlertError(f"--alert {alert}: the threshold must be a number in (0, 1]") from None
        if not 0 < level <= 1:
            raise AlertError(f"--alert {alert}: the threshold must be in (0, 1], got {level:g}")
        chosen[name] = level
    return chosen


class EventTracker:
    """Turns windows' probabilities into events, class by class (see the module docstring)."""

    def __init__(self, classes: Sequence[str], thresholds: dict[str, float], hysteresis: float,
                 min_duration: float, on_event: Callable[[Event], None] | None = None) -> None:
        self.classes = list(classes)
        self.thresholds, self.hysteresis, self.min_duration = dict(thresholds), hysteresis, min_duration
        self.on_event = on_event
        self.open: dict[str, Event] = {}  # class -> its event in progress
        self.events: list[Event] = []

    def update(self, t: float, probabilities: np.ndarray, box: Callable[[], list[int]]) -> list[Event]:
        """The windows' probabilities (K,) at time t; `box()` gives the attention's box when it is needed.
        Returns the events that closed."""
        closed = []
        for name, level in self.thresholds.items():
            p = float(probabilities[self.classes.index(name)])
            event = self.open.get(name)
            if event is None:
                if p >= level:
                    self.open[name] = Event(name, t, t, p, box())
            elif p >= level - self.hysteresis:
                event.end = t
                if p > event.probability:
                    event.probability, event.box = p, box()
            else:
                closed += self._close(name)
        return closed

    def scored(self, window: Window, width: int, height: int) -> list[Event]:
        """A scored window: its probabilities at its time; an event's box is where the window's attention was,
        in pixels of a width x height frame. Returns the events that closed."""
        return self.update(window.time, window.probabilities, lambda: attention_box(window.attention, width, height))

    def finish(self) -> list[Event]:
        """Close every event still open (the source ended or the run was stopped)."""
        return [e for name in list(self.open) for e in self._close(name)]

    def _close(self, name: str) -> list[Event]:
        event = self.open.pop(name)
        if event.end - event.start < self.min_duration:
            return []
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        return [event]

    def active(self) -> list[str]:
        """Classes with an event in progress."""
        return list(self.open)


def attention_box(attention: np.ndarray, width: int, height: int, share: float = 0.5) -> list[int]:
    """Where a window's attention was: the box [x0, y0, x1, y1] in pixels of a width x height frame around
    the cells whose mean attention over the window's frames is at least `share` of the hottest cell's."""
    mean = np.asarray(attention, dtype=np.float64).mean(axis=0)  # (h, w)
    rows, cols = np.nonzero(mean >= share * mean.max())
    h, w = mean.shape
    return [int(round(cols.min() * width / w)), int(round(rows.min() * height / h)),
            int(round((cols.max() + 1) * width / w)), int(round((rows.max() + 1) * height / h))]


class EventLog:
    """--events: one JSON line per event, written and flushed as it closes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--events {path}: cannot be written ({exc.strerror or exc})") from None

    def write(self, event: Event) -> None:
        self._fh.write(json.dumps(event.as_json()) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
