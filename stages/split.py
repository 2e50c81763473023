"""Stage `split`: the cache's clips -> splits/{train,val,test}.txt (+ summary.json for DVC metrics).

Seeded stratified by default; the official HMDB-51 or UCF-101 lists of one fold when a folder is given.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pipeline.config import SplitConfig, as_dict
from pipeline.features.reader import open_cache
from pipeline.files import write_text_atomic
from pipeline.video import splits as sp


def run(cache_path: Path, out_dir: Path, cfg: SplitConfig, hmdb51: Path | None = None, ucf101: Path | None = None,
        fold: int = 1) -> dict:
    """Split the clips of `cache_path`, write the three lists and summary.json into `out_dir`, print a table."""
    if hmdb51 is not None and ucf101 is not None:
        raise sp.SplitError("give --hmdb51 or --ucf101, not both")
    out_dir = Path(out_dir)
    with open_cache(cache_path) as cache:
        videos, classes = list(cache.videos), list(cache.classes)
        labels = [classes[i] for i in cache.labels]
        failed = [video for video, _ in cache.failed if not video.endswith("/")]  # "cls/" = an empty class folder

    if hmdb51 is not None or ucf101 is not None:
        mode = "hmdb51" if hmdb51 is not None else "ucf101"
        reader = sp.hmdb51 if hmdb51 is not None else sp.ucf101
        result = reader(hmdb51 if hmdb51 is not None else ucf101, fold, videos, classes, failed=failed,
                        val=cfg.val, seed=cfg.seed)
    else:
        mode = "stratified"
        result = sp.SplitResult(sp.stratified(videos, labels, cfg.val, cfg.test, cfg.seed),
                                {sp.FAILED: len(failed), sp.NOT_IN_CACHE: 0})

    sp.write_splits(out_dir, result.splits)
    summary = summarize(result, classes, mode, cfg, fold if mode != "stratified" else None)
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out_dir)
    return summary


def summarize(result: sp.SplitResult, classes: list[str], mode: str, cfg: SplitConfig, fold: int | None) -> dict:
    """Counts per split, per class and per left-out reason (the summary.json that DVC shows as metrics)."""
    per_split = {name: Counter(sp.class_of(k) for k in keys) for name, keys in result.splits.items()}
    return {
        "mode": mode,
        "fold": fold,
        "config": as_dict(cfg),
        "clips": {**{name: len(result.splits[name]) for name in sp.SPLIT_NAMES},
                  "total": sum(len(result.splits[name]) for name in sp.SPLIT_NAMES)},
        "left_out": dict(result.left_out),
        "per_class": {c: {name: per_split[name].get(c, 0) for name in sp.SPLIT_NAMES} for c in classes},
    }


def print_summary(summary: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    fold = f", fold {summary['fold']}" if summary["fold"] is not None else ""
    table = Table(title=f"split ({summary['mode']}{fold}) -> {escape(str(out_dir))}")
    table.add_column("class")
    for name in sp.SPLIT_NAMES:
        table.add_column(name, justify="right")
    for cls, counts in summary["per_class"].items():
        table.add_row(escape(cls), *(str(counts[name]) for name in sp.SPLIT_NAMES))
    table.add_section()
    table.add_row("[bold]total", *(f"[bold]{summary['clips'][name]}" for name in sp.SPLIT_NAMES))
    console = Console()
    console.print(table)
    left = ", ".join(f"{n} {reason}" for reason, n in summary["left_out"].items())
    console.print(f"left out: {escape(left)}", highlight=False)
