"""watch on this machine: sustained sampled frames/s against the rate the model needs, latency p50/p95, drops.

Two ways of reading the same SOURCE (a file or a folder of files; a URL or camera is always live):
* file: read as fast as the model takes it, every sampled frame (none dropped): how many times real time
  this machine processes a file (source seconds / wall seconds);
* live: read at its own frame rate, as a camera delivers it (`--realtime`), through the bounded queue:
  the sampled rate held, the frames dropped, and latency (a frame's arrival to its window scored), overall
  and per fifth of the run, so a latency that grows over a long stream shows.

    python bench/watch.py SOURCE --model models/head.pt [--modes file,live] [--device cpu] [--stride 1]
                          [--json bench-watch.json]

For the issue's target run it on a stream of 5 minutes or more (e.g. a folder of the fight set's held-out
clips). Prints one table; --json also writes the numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from machine import line  # bench/ is the script's folder


def measure(source: str, model: Path, mode: str, device: str, stride: int, window: int, queue: int) -> dict:
    from pipeline.config import WatchConfig
    from stages import watch as stage

    cfg = WatchConfig(device=device, stride=stride, window=window, queue=queue)
    s = stage.run(source, model, cfg, realtime=mode == "live", progress=False)
    lat = np.asarray(s.latencies, dtype=np.float64)
    fifths = [float(np.percentile(part, 95)) for part in np.array_split(lat, 5) if len(part)] if len(lat) else []
    return {
        "mode": mode, "outcome": s.outcome, "message": s.message, "source_seconds": round(s.source_seconds, 2),
        "wall_seconds": round(s.wall_seconds, 2),
        "x_real_time": round(s.source_seconds / s.wall_seconds, 2) if s.wall_seconds else None,
        "required_fps": round(s.required_fps, 2), "sampled_fps": round(s.sampled_fps, 2),
        "sampled": s.sampled, "dropped": s.dropped, "windows": s.windows,
        "latency_p50": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
        "latency_p95": round(float(np.percentile(lat, 95)), 3) if len(lat) else None,
        "latency_p95_by_fifth": [round(v, 3) for v in fifths],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("--model", type=Path, default=Path("models/head.pt"))
    parser.add_argument("--modes", default="file,live")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--window", type=int, default=0)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    rows = [measure(args.source, args.model, mode.strip(), args.device, args.stride, args.window, args.queue)
            for mode in args.modes.split(",")]
    table = Table(title=f"watch {args.source} ({line()})")
    cols = ("mode", "outcome", "source_seconds", "x_real_time", "required_fps", "sampled_fps", "sampled", "dropped",
            "latency_p50", "latency_p95", "latency_p95_by_fifth")
    for col in cols:
        table.add_column(col.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(*("/".join(f"{v:.2f}" for v in row[c]) if isinstance(row[c], list) else str(row[c])
                        for c in cols))
    Console().print(table)
    for row in rows:
        if row["message"]:
            print(f"{row['mode']}: {row['message']}")
    if args.json:
        args.json.write_text(json.dumps({"source": args.source, "model": str(args.model), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
