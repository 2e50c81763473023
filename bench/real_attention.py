"""Head variants on a real dataset over repeated splits: accuracy, how focused the maps are, how faithful.

Made for the real CCTV fight set (`../shared/data/fight`, no boxes) and any other real cache: for each
split seed, `stages.split.run` draws stratified train/val/test lists; each variant is trained by
`stages.train.run` and evaluated by `stages.evaluate.run` (the graph's own code) on `--split` (val while
settings are chosen, test once after). Settings are the code's defaults (the ones for real datasets, no
params.yaml) with each variant's fields on top, so the rows say what a user gets from the defaults.

    python bench/real_attention.py CACHE [--seeds 0,1,2,3,4] [--split val|test] [--jobs 2]
        [--variant NAME:head.motion=none,train.lr=3e-4 ...] [--json out.json]

Per row: video and frame accuracy, attention entropy over uniform's, the deletion test (true-class
probability left after zeroing the top-k attended cells vs k random cells; the area between the curves
where evaluate reports it). The table gives the mean and the spread (sd) over the split seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from machine import line  # bench/ is the script's folder

DEFAULT_VARIANTS = ["none:head.motion=none", "prior:head.motion=prior"]


def parse_variant(text: str) -> tuple[str, dict[str, dict[str, str]]]:
    """"name:head.motion=none,train.lr=3e-4" -> ("name", {"head": {"motion": "none"}, "train": {"lr": "3e-4"}})."""
    name, _, fields = text.partition(":")
    sections: dict[str, dict[str, str]] = {}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        sections.setdefault(section, {})[field] = value
    return name, sections


def one_run(job: dict) -> dict:
    """Split with one seed, train one variant, evaluate it; the row of figures."""
    import torch

    torch.set_num_threads(job["threads"])
    from pipeline.config import make
    from stages import evaluate, split, train

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        split.run(Path(job["cache"]), tmp / "splits", make("split", {"seed": job["seed"], "val": job["val"],
                                                                       "test": job["test"]}))
        fields = job["fields"]
        head = make("head", fields.get("head", {}))
        cfg = make("train", {"seed": job["seed"], "device": "cpu", **fields.get("train", {})})
        summary = train.run(Path(job["cache"]), tmp / "splits", tmp / "head.pt", head, cfg,
                            metrics_path=tmp / "train.json", plots_dir=tmp / "plots", progress=False)
        report = evaluate.run(Path(job["cache"]), tmp / "splits", tmp / "head.pt", tmp / "eval",
                              make("evaluate", {"split": job["split"], **fields.get("evaluate", {})}),
                              plots_dir=tmp / "eplots", device="cpu", progress=False)
        beta = torch.load(tmp / "head.pt", weights_only=True)["state_dict"].get("beta")
    deletion = report["deletion"] or {}
    row = {"variant": job["name"], "seed": job["seed"], "best_epoch": summary.best_epoch,
           "video_accuracy": report["video_accuracy"], "frame_accuracy": report["frame_accuracy"],
           "entropy_ratio": report["entropy"]["mean"] / report["entropy"]["uniform"],
           "beta": None if beta is None else round(float(beta), 3),
           "unmodified_p": deletion.get("unmodified", {}).get("true_probability"),
           "deletion": deletion, "seconds": round(time.perf_counter() - start, 1)}
    for k in ("3", "5"):
        if k in deletion.get("k", {}):
            row[f"top{k}_drop"] = row["unmodified_p"] - deletion["k"][k]["top"]["true_probability"]
            row[f"random{k}_drop"] = row["unmodified_p"] - deletion["k"][k]["random"]["true_probability"]
    curve = deletion.get("curve")
    if curve:
        top = np.asarray(curve["top_probability"])
        rand = np.asarray(curve["random_probability"])
        row["curve_top_drop"] = float(np.mean(row["unmodified_p"] - top))
        row["curve_random_drop"] = float(np.mean(row["unmodified_p"] - rand))
        row["area_between"] = (deletion.get("area_between") or {}).get("probability")
    return row


def mean_sd(values: list) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


COLUMNS = ["video_accuracy", "frame_accuracy", "entropy_ratio", "top5_drop", "random5_drop", "curve_top_drop",
           "curve_random_drop", "area_between", "beta"]


def table(rows: list[dict]) -> str:
    lines = ["| variant | splits | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 2)]
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        cells = " | ".join(mean_sd([r.get(c) for r in mine]) for c in COLUMNS)
        lines.append(f"| {name} | {len(mine)} | {cells} |")
    return "\n".join(lines)


def energy_rule(cache_path: str, splits: int = 20, held_out: int = 48) -> dict[str, float]:
    """How far one number per clip goes: a threshold on the clip's motion energy, fitted on the other clips.

    For each of `splits` random splits, the threshold (and its direction) that classifies the training clips
    best is applied to `held_out` others; figures for the mean change over all cells and for the mean over
    frames of the largest cell's change. Two classes only (fight / noFight)."""
    import torch

    from pipeline.features.motion import motion_energy
    from pipeline.features.reader import open_cache

    with open_cache(Path(cache_path)) as cache:
        x = torch.from_numpy(cache.load(np.arange(len(cache.videos))))
        labels = np.asarray(cache.labels[:], dtype=int)
    d = motion_energy(x).flatten(2)  # (N, T, h*w)
    figures = {"mean_change": d.mean(dim=(1, 2)).numpy(), "largest_cell_change": d.amax(dim=2).mean(dim=1).numpy()}
    rng = np.random.default_rng(0)
    out = {}
    for name, value in figures.items():
        right = []
        for _ in range(splits):
            order = rng.permutation(len(labels))
            test, train = order[:held_out], order[held_out:]
            candidates = np.quantile(value[train], np.linspace(0.02, 0.98, 97))
            scores = [((value[train] > c) == (labels[train] == 0)).mean() for c in candidates]
            best = int(np.argmax(np.maximum(scores, 1 - np.asarray(scores))))
            above_is_first = scores[best] >= 0.5
            right.append((((value[test] > candidates[best]) == (labels[test] == 0)) == above_is_first).mean())
        out[name] = round(float(np.mean(right)), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--val", type=float, default=0.2)
    parser.add_argument("--test", type=float, default=0.2)
    parser.add_argument("--variant", action="append", default=None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--energy-rule", action="store_true",
                        help="only the baseline: a threshold on each clip's motion energy, held-out accuracy")
    args = parser.parse_args()
    if args.energy_rule:
        print(json.dumps(energy_rule(args.cache)))
        return
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    threads = max(1, (os.cpu_count() or 2) // max(args.jobs, 1))
    jobs = [{"cache": args.cache, "name": name, "fields": fields, "seed": int(s), "split": args.split,
             "val": args.val, "test": args.test, "threads": threads}
            for name, fields in variants for s in args.seeds.split(",")]
    start = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(one_run, jobs):
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                              if k != "deletion"}), flush=True)
    print()
    print(table(rows))
    print(f"\n{line()}, split {args.split}, {args.jobs} jobs x {threads} threads, "
          f"{time.perf_counter() - start:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"cache": args.cache, "split": args.split, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
