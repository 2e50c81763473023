"""A stream of held-out clips with known segments, and the segment-level score of watch's events on it.

    python bench/watch_stream.py make VIDEOS SPLIT_LIST stream.mp4 [--run 2]   # runs of 2 clips a class, alternating
    python bench/watch_stream.py score stream.mp4.segments.json events.jsonl --label fight

`make` re-encodes the clips of SPLIT_LIST (keys relative to VIDEOS, as splits/test.txt holds them) into one
H.264 file at 480x360, 25 fps, the classes alternating in runs of `--run` clips, and writes the segments beside
it. `score` merges adjacent segments of a class into runs and says, for the runs of `--label`: precision (events
that overlap such a run), recall (runs that some event overlaps), and recall matched one to one (an event
spanning two runs counts once).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def make(videos: Path, split_list: Path, out: Path, run: int, size=(480, 360), fps: int = 25) -> None:
    import av

    keys = [line.strip() for line in split_list.read_text().splitlines() if line.strip()]
    by_class: dict[str, list[str]] = {}
    for key in keys:
        by_class.setdefault(key.split("/")[0], []).append(key)
    order, queues = [], [list(v) for _, v in sorted(by_class.items(), reverse=True)]
    while any(queues):
        for q in queues:
            order += [q.pop(0) for _ in range(min(run, len(q)))]
    container = av.open(str(out), "w")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
    segments, n = [], 0
    for key in order:
        start = n / fps
        with av.open(str(videos / key)) as clip:
            for frame in clip.decode(video=0):
                picture = frame.to_image().convert("RGB").resize(size)
                container.mux(stream.encode(av.VideoFrame.from_image(picture)))
                n += 1
        segments.append({"clip": key, "label": key.split("/")[0], "start": round(start, 3), "end": round(n / fps, 3)})
    container.mux(stream.encode())
    container.close()
    Path(f"{out}.segments.json").write_text(json.dumps(segments, indent=1))
    print(f"{out}: {len(order)} clips, {n / fps:.1f} s")


def score(segments_path: Path, events_path: Path, label: str) -> dict:
    runs: list[dict] = []
    for s in json.loads(segments_path.read_text()):
        if runs and runs[-1]["label"] == s["label"] and abs(runs[-1]["end"] - s["start"]) < 1e-6:
            runs[-1]["end"] = s["end"]
        else:
            runs.append({"label": s["label"], "start": s["start"], "end": s["end"]})
    wanted = [r for r in runs if r["label"] == label]
    events = [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()]
    events = [e for e in events if e["label"] == label]

    def overlap(a: dict, b: dict) -> float:
        return max(0.0, min(a["end"], b["end"]) - max(a["start"], b["start"]))

    hit_events = sum(any(overlap(e, r) > 0 for r in wanted) for e in events)
    hit_runs = sum(any(overlap(e, r) > 0 for e in events) for r in wanted)
    used, matched = set(), 0
    for e in events:  # one to one: each event takes the run it overlaps most, if still free
        best = max(((overlap(e, r), i) for i, r in enumerate(wanted) if i not in used), default=(0, None))
        if best[0] > 0:
            used.add(best[1])
            matched += 1
    result = {"runs": len(wanted), "events": len(events),
              "precision": round(hit_events / len(events), 3) if events else None,
              "recall": round(hit_runs / len(wanted), 3) if wanted else None,
              "recall_one_to_one": round(matched / len(wanted), 3) if wanted else None,
              "run_times": [(r["start"], r["end"]) for r in wanted],
              "event_times": [(e["start"], e["end"]) for e in events]}
    print(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("make")
    m.add_argument("videos", type=Path)
    m.add_argument("split_list", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--run", type=int, default=2)
    s = sub.add_parser("score")
    s.add_argument("segments", type=Path)
    s.add_argument("events", type=Path)
    s.add_argument("--label", default="fight")
    args = parser.parse_args()
    if args.what == "make":
        make(args.videos, args.split_list, args.out, args.run)
    else:
        score(args.segments, args.events, args.label)


if __name__ == "__main__":
    main()
