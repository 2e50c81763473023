"""A learning curve to choose with: the head at 10, 20, 40 and all training clips a class, several seeds, beside
the linear probe on the same clips.

    python bench/learning_curve.py CACHE SPLITS [--sizes 10,20,40,all] [--seeds 0,1,2,3,4] [--split val|test]
        [--variant NAME:head.heads=3,train.jitter=0.2 ...] [--params FILE] [--jobs 2] [--json out.json]

For each size n and seed s the train list is n clips of each class, drawn with s from SPLITS/train.txt (all of a
class where it has fewer); val and the scored split stay as SPLITS has them. Each variant is trained with that
seed by `stages.train.run` and scored by `stages.evaluate.run` (the graph's own code), whose eval.json also holds
the linear probe fitted on the same n clips a class (`baselines.linear_probe`). Settings: the code's defaults
(what a user with no params.yaml gets), or `--params` (e.g. the project's params.yaml for the embedded set), with
each variant's fields on top. Per point: mean video accuracy over the seeds, its spread (max - min), the probe's
mean, the attention's entropy over uniform's and, with `--deletion-draws`, the drop at k = 5 (top vs random).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from machine import line
from real_attention import parse_variant  # bench/ is the script's folder: the same syntax

DEFAULT_VARIANTS = ["default:"]


def subsample(splits: Path, out: Path, labels: dict[str, str], per_class: int | None, seed: int) -> int:
    """Write `out`/{train,val,test}.txt: `per_class` train clips of each class drawn with `seed` (None: all), the
    other lists copied. Returns the train clips written."""
    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k in (splits / "train.txt").read_text().split() if k]
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in sorted(set(labels[k] for k in keys)):
        mine = [k for k in keys if labels[k] == cls]
        order = rng.permutation(len(mine))
        chosen += [mine[i] for i in sorted(order[:per_class] if per_class is not None else order)]
    (out / "train.txt").write_text("".join(k + "\n" for k in chosen))
    for name in ("val", "test"):
        src = splits / f"{name}.txt"
        (out / f"{name}.txt").write_text(src.read_text() if src.exists() else "")
    return len(chosen)


def one_point(job: dict) -> dict:
    """Train one variant on one subsample and evaluate it: the row of figures."""
    import torch

    torch.set_num_threads(job["threads"])
    from pipeline.config import load_section, make
    from stages import evaluate, train

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = subsample(Path(job["splits"]), tmp / "splits", job["labels"], job["size"], job["seed"])
        fields, params = job["fields"], job["params"]

        def section(name: str, **extra):
            base = load_section(name, params) if params else make(name, {})
            return make(name, {**base.__dict__, **extra, **fields.get(name, {})})

        head = section("head")
        cfg = section("train", seed=job["seed"], device="cpu")
        summary = train.run(Path(job["cache"]), tmp / "splits", tmp / "head.pt", head, cfg,
                            metrics_path=tmp / "train.json", plots_dir=tmp / "plots", progress=False)
        report = evaluate.run(Path(job["cache"]), tmp / "splits", tmp / "head.pt", tmp / "eval",
                              section("evaluate", split=job["split"], deletion_draws=job["draws"], device="cpu"),
                              plots_dir=tmp / "eplots", progress=False)
    probe = report["baselines"]["linear_probe"]
    row = {"variant": job["name"], "size": job["size"] or "all", "seed": job["seed"], "train_clips": n,
           "video_accuracy": report["video_accuracy"], "probe_accuracy": probe.get("video_accuracy"),
           "entropy_ratio": report["entropy"]["mean"] / report["entropy"]["uniform"],
           "best_epoch": summary.best_epoch, "epochs_run": len(summary.history),
           "train_seconds": round(summary.seconds, 1), "seconds": round(time.perf_counter() - start, 1)}
    att = report["attention"]
    if att.get("clips_with_boxes"):
        row.update(mass_ratio=att["mass_ratio"], pointing=att["pointing"])
    deletion = report.get("deletion") or {}
    if "5" in deletion.get("k", {}):
        p = deletion["unmodified"]["true_probability"]
        row["top5_drop"] = p - deletion["k"]["5"]["top"]["true_probability"]
        row["random5_drop"] = p - deletion["k"]["5"]["random"]["true_probability"]
    return row


COLUMNS = ["mass_ratio", "pointing", "top5_drop", "random5_drop"]


def table(rows: list[dict]) -> str:
    """One line per variant and size: mean, spread (max - min), the probe, the attention figures."""
    extra = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| variant | clips a class | seeds | video accuracy: mean | spread (max - min) | min | linear probe "
             "| entropy / uniform |" + "".join(f" {c} |" for c in extra),
             "|" + " --- |" * (8 + len(extra))]
    for name in dict.fromkeys(r["variant"] for r in rows):
        for size in dict.fromkeys(r["size"] for r in rows if r["variant"] == name):
            mine = [r for r in rows if r["variant"] == name and r["size"] == size]
            acc = np.array([r["video_accuracy"] for r in mine], dtype=float)
            probe = np.array([r["probe_accuracy"] for r in mine if r["probe_accuracy"] is not None], dtype=float)
            cells = [name, str(size), str(len(mine)), f"{acc.mean():.1%}", f"{acc.max() - acc.min():.1%}",
                     f"{acc.min():.1%}", f"{probe.mean():.1%}" if probe.size else "-",
                     f"{np.mean([r['entropy_ratio'] for r in mine]):.3f}"]
            for c in extra:
                values = [r[c] for r in mine if r.get(c) is not None]
                cells.append(f"{np.mean(values):.3f}" if values else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("splits", help="a folder with train.txt, val.txt, test.txt (`python -m pipeline split`)")
    parser.add_argument("--sizes", default="10,20,40,all", help="train clips a class; 'all' for the whole list")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--split", choices=("val", "test"), default="val", help="the split each point is scored on")
    parser.add_argument("--variant", action="append", default=None)
    parser.add_argument("--params", default=None, help="a params.yaml to take settings from (default: the code's)")
    parser.add_argument("--deletion-draws", type=int, default=0, help="evaluate.deletion_draws (0: no deletion test)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads a job (0: the cores / --jobs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from pipeline.features.reader import open_cache

    with open_cache(Path(args.cache)) as cache:
        labels = {key: cache.classes[int(lab)] for key, lab in zip(cache.videos, cache.labels[:])}
    sizes = [None if s == "all" else int(s) for s in args.sizes.split(",")]
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    threads = args.threads or max(1, (os.cpu_count() or 2) // max(args.jobs, 1))
    jobs = [{"cache": args.cache, "splits": args.splits, "labels": labels, "name": name, "fields": fields,
             "size": size, "seed": int(s), "split": args.split, "params": args.params, "draws": args.deletion_draws,
             "threads": threads}
            for name, fields in variants for size in sizes for s in args.seeds.split(",")]
    start = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(one_point, jobs):
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    print()
    print(table(rows))
    print(f"\n{line()}, split {args.split}, {args.jobs} jobs x {threads} threads, "
          f"{time.perf_counter() - start:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"cache": args.cache, "splits": args.splits, "split": args.split,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
