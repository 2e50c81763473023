"""Command `boxes import`: a dataset's own box annotations -> a boxes file (format 2) keyed like the cache.

    python -m pipeline boxes import ucf24-pkl pyannot.pkl data/ucf24-boxes.json --videos data/ucf101
    python -m pipeline evaluate ... --boxes data/ucf24-boxes.json

Not a DVC stage: it runs once per dataset, before evaluate and render read the file it writes (`--boxes`).
The readers are pipeline/video/annotations.py (UCF101-24 pyannot.pkl and finalAnnots.mat, JHMDB's
joint_positions), the format pipeline/video/boxes.py. Video names become the cache's keys by matching them
against the videos under the dataset root (`--videos`, default params.yaml's data.videos), or, with `--ext`
alone, by adding that extension; what matched nothing is counted and named in the summary, never guessed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.video.annotations import KINDS, MARGIN, match_keys, read_annotations
from pipeline.video.boxes import BoxesError, write_boxes_file
from pipeline.video.folders import discover

__all__ = ["KINDS", "ImportSummary", "parse_size", "print_summary", "run"]


@dataclass
class ImportSummary:
    out: Path
    annotated: int  # videos in the annotation source
    matched: int  # written to `out`
    unmatched: list[str] = field(default_factory=list)
    frames: int = 0  # frames with a box, over the videos written
    boxes: int = 0
    videos_root: Path | None = None  # what the names were matched against; None: name + ext

    def line(self) -> str:
        """The one line that says how many matched, and what was written."""
        against = f"videos under {self.videos_root}" if self.videos_root else "keys by extension"
        missed = ""
        if self.unmatched:
            shown = ", ".join(self.unmatched[:3]) + (", ..." if len(self.unmatched) > 3 else "")
            missed = f" (unmatched: {shown})"
        return (f"boxes import: {self.matched} of {self.annotated} annotated videos matched {against}{missed}; "
                f"{self.frames} frames with {self.boxes} boxes -> {self.out}")


def print_summary(summary: ImportSummary) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(soft_wrap=True).print(escape(summary.line()), highlight=False)


def parse_size(text: str | None) -> tuple[float, float] | None:
    """"320x240" -> (320.0, 240.0): the frame size (width x height) the annotations are given in."""
    if text is None:
        return None
    try:
        width, height = (float(v) for v in text.lower().split("x"))
    except ValueError:
        raise BoxesError(f"--size must be WIDTHxHEIGHT in pixels (e.g. 320x240), got {text!r}") from None
    if width <= 0 or height <= 0:
        raise BoxesError(f"--size must be positive, got {text!r}")
    return width, height


def run(kind: str, source: Path, out: Path, *, videos: Path | None = None, ext: str | None = None,
        size: tuple[float, float] | None = None, margin: float = MARGIN) -> ImportSummary:
    """Read `source` as `kind`, key its videos like the cache (under `videos`, else name + `ext`), write `out`."""
    if kind not in KINDS:
        raise BoxesError(f"unknown annotation kind {kind!r}: choose {', '.join(KINDS)}")
    if not Path(source).exists():
        raise BoxesError(f"{source}: no such file or folder")
    if videos is None and not ext:
        raise BoxesError("no videos to match the annotated names to: --videos ROOT (the dataset root) or "
                         "--ext .avi (keys are the names plus it)")
    if ext and not ext.startswith("."):
        ext = "." + ext
    named = read_annotations(kind, source, size, margin)
    keys = [clip.video for clip in discover(videos).clips] if videos is not None else None
    matched, unmatched = match_keys(named, keys, ext)
    if named and not matched:
        raise BoxesError(f"none of the {len(named)} annotated videos of {source} matched a video under {videos} "
                         f"(first: '{next(iter(named))}'); --videos names the dataset root")
    write_boxes_file(out, matched)
    return ImportSummary(Path(out), len(named), len(matched), unmatched,
                         frames=sum(len(b) for b in matched.values()),
                         boxes=sum(len(f) for b in matched.values() for f in b.frames.values()),
                         videos_root=Path(videos) if videos is not None else None)
