"""The attention ablation: readout x regulariser x cell x seeds, trained and evaluated by the pipeline itself.

Each row is `stages.train.run` then `stages.evaluate.run` (the graph's code, not a copy) on one cache and
its splits, with params.yaml's head/train settings except the ablated fields; figures on the test split:
video accuracy (95% bootstrap interval), attention mass in the actor's box over uniform, pointing, both
beside the centre prior, and the deletion test (true-class probability left after zeroing the top-k
attended cells vs k random cells, 20 draws). The readout does not apply to the vector LSTM, so its rows
vary only the regulariser.

    python bench/attention_ablation.py [cache/features.h5] [splits/] [--seeds 0,1,2] [--jobs 2]
        [--only default] [--json out.json]

Runs go `--jobs` at a time, each with 2 / jobs torch threads (the heads are small: two single-threaded runs
side by side finish sooner than two two-threaded ones in turn).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

VARIANTS = [  # (cell, readout, attention_reg); the first is the shipped default
    ("convlstm", "attention", 0.0), ("convlstm", "attention", 0.001),
    ("convlstm", "mean", 0.0), ("convlstm", "mean", 0.001),
    ("lstm", "-", 0.0), ("lstm", "-", 0.001),
]


def one_run(job: dict) -> dict:
    """Train and evaluate one variant with one seed; the figures of its test split."""
    import torch

    torch.set_num_threads(job["threads"])
    from pipeline.config import EvaluateConfig, load_section, make
    from stages import evaluate, train

    head = load_section("head", job["params"])
    cfg = load_section("train", job["params"], seed=job["seed"], attention_reg=job["reg"], device="cpu")
    head = make("head", {**head.__dict__, "cell": job["cell"],
                         "readout": head.readout if job["readout"] == "-" else job["readout"]})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        summary = train.run(job["cache"], job["splits"], tmp / "head.pt", head, cfg, metrics_path=tmp / "train.json",
                            plots_dir=tmp / "plots", progress=False)
        report = evaluate.run(job["cache"], job["splits"], tmp / "head.pt", tmp / "eval",
                              EvaluateConfig(split=job["split"], device="cpu"), plots_dir=tmp / "eplots",
                              progress=False)
    att, deletion = report["attention"], report["deletion"]["k"]
    return {"cell": job["cell"], "readout": job["readout"], "attention_reg": job["reg"], "seed": job["seed"],
            "best_epoch": summary.best_epoch, "val_loss": round(summary.best.val_loss, 4),
            "video_accuracy": report["video_accuracy"], "video_accuracy_ci": report["video_accuracy_ci"],
            "mass_ratio": att["mass_ratio"], "mass_ratio_ci": att.get("mass_ratio_ci"),
            "mass_ratio_centre": att["mass_ratio_centre"], "pointing": att["pointing"],
            "pointing_ci": att.get("pointing_ci"), "pointing_centre": att["pointing_centre"],
            "pointing_uniform": att["pointing_uniform"], "deletion": deletion,
            "unmodified_true_probability": report["deletion"]["unmodified"]["true_probability"],
            "seconds": round(time.perf_counter() - start, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| cell | readout | reg | seed | test video acc [95% CI] | mass / uniform [CI] | pointing [CI] | "
             "true p: none / top-3 / random-3 | top-5 / random-5 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        d3, d5 = r["deletion"].get("3", {}), r["deletion"].get("5", {})

        def ci(v):
            return f"[{v[0]:.2f}, {v[1]:.2f}]" if v else ""

        lines.append(
            f"| {r['cell']} | {r['readout']} | {r['attention_reg']:g} | {r['seed']} | {r['video_accuracy']:.1%} "
            f"{ci(r['video_accuracy_ci'])} | {r['mass_ratio']:.2f}x {ci(r['mass_ratio_ci'])} | "
            f"{r['pointing']:.1%} {ci(r['pointing_ci'])} | {r['unmodified_true_probability']:.3f} / "
            f"{d3['top']['true_probability']:.3f} / {d3['random']['true_probability']:.3f} | "
            f"{d5['top']['true_probability']:.3f} / {d5['random']['true_probability']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", nargs="?", default="cache/features.h5")
    parser.add_argument("splits", nargs="?", default="splits")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", choices=("all", "default"), default="all", help="default: the shipped head only")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="val: where settings are chosen; test: reported once, after")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    variants = VARIANTS[:1] if args.only == "default" else VARIANTS
    threads = max(1, (os.cpu_count() or 2) // max(args.jobs, 1))
    jobs = [{"cache": args.cache, "splits": args.splits, "params": args.params, "cell": c, "readout": ro, "reg": reg,
             "seed": int(s), "threads": threads, "split": args.split}
            for c, ro, reg in variants for s in args.seeds.split(",")]
    start = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(one_run, jobs):
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "deletion"}), flush=True)
    print()
    print(table(rows))
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    print(f"\n{cpu}, {os.cpu_count()} cores, avx512_bf16: {'avx512_bf16' in flags}, torch {torch.__version__}, "
          f"{args.jobs} jobs x {threads} threads, {time.perf_counter() - start:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"cache": args.cache, "params": args.params, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
