"""Stage-one throughput, three ways in one run, so the ratios compare like with like.

* end to end: `stages.extract.run` (decode workers + backbone + shard writes + join) on HMDB-like clips, in
  a fresh process each time as a user's `extract` runs (oneDNN's kernels compiled anew, workers spawned),
  three ways: steady state (after the first backbone batch), the extraction (first clip dispatched to last
  clip written: worker start-up and the backbone's first call included) and the whole run (rerun plan, lock,
  the last shard's write and the join included too; the backbone's build is not); with a timeline of where
  its time went (the profile)
* bare backbone: the same frames, pre-decoded and pre-processed, through `Backbone.forward` in batches, eager
  and compiled (`extract.compile`, torch.compile with frozen weights) alternately: `trunk_compiled_over_eager`
* naive: decode every frame, then push the sampled frames one at a time through an fp32 trunk
* decode check: seconds per clip of `decode_sampled` checked against PyAV (what extract runs) vs decord
  alone, interleaved clip by clip, so the cost of never trusting decord blindly is a ratio of one run

End to end and the bare trunk alternate (bare, end to end, bare, ... `--rounds` end-to-end runs) and each run's
ratio is taken against the mean of the bare runs just before and after it, of the trunk the run used (`--compile`:
the end-to-end runs' extract.compile, default on) (the bare figure of a shared 2-core
machine moves by up to 10% from one minute to the next); the median round decides, every round is printed.

    python bench/extract.py [--clips 100] [--rounds 3] [--frames 30] [--image-size 224] [--compile on|off]
        [--precision auto|fp32|bf16|int8] [--real ../shared/data/fight] [--only all|precisions]

Precisions (`--real DIR`, a real dataset such as the fight set): fp32 (eager), bf16 (compiled, where the CPU
has it natively) and int8 (calibrated on 64 frames of DIR as `extract` chooses them, compiled) on the same real
frames, alternately (`--rounds` times), so their ratios come from the same minutes; the quantisation time
(choosing and decoding the calibration frames, export, calibration, conversion, the first compiled call)
apart; and each precision's pool5 error against fp32 on 64 *other* real frames (8 clips not used to
calibrate, 8 frames each): relative L2 over all of them, and the mean cosine of frame pairs.
`--only precisions` runs that part alone.

At 100 clips or more the run's fixed costs (start-up to the first backbone call, the compilation in it, the
last shard and the join: `startup_s`, `first_call_s`, `join_s`) weigh what they weigh in a user's dataset; at a
handful of clips they are a third of the run and the ratio says more about them than about extraction.

Batch size, precision and threads are pinned (flags) and printed with the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import line as machine_line  # bench/ is the script's folder


def make_clips(root: Path, clips: int, length: int, width: int, height: int) -> list[Path]:
    """HMDB-51-like files: MPEG-4 Part 2 with B-frames in AVI, moving textured content."""
    from pipeline.video.encode import Encoding, write_video

    rng = np.random.default_rng(0)
    paths = []
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(clips):
        phase = rng.uniform(0, 6.28, size=3)
        frames = np.stack([
            np.stack([(127 + 120 * np.sin(xx / (7 + c) + yy / (11 + c) + t / 5 + phase[c])) for c in range(3)], -1)
            for t in range(length)
        ]).astype(np.uint8)  # (L, H, W, 3)
        paths.append(write_video(root / f"class{i % 4}" / f"clip{i:03d}.avi", frames, enc=Encoding("mpeg4", "avi", 2)))
    return paths


def bare_backbone(backbone, decoded: list[np.ndarray], batch: int) -> float:
    import torch

    x = torch.cat([backbone.preprocess(torch.from_numpy(f)) for f in decoded[:8]])  # (8*T, 3, S, S): enough
    backbone.forward(x[:batch])  # warm-up (a compiled trunk compiles here)
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        backbone.forward(x[i:i + batch])
    return len(x) / (time.perf_counter() - start)


def naive(paths: list[Path], frames: int, image_size: int, weights: str) -> float:
    """Decode every frame in order, then one frame at a time through an fp32, contiguous-format trunk."""
    import decord
    import torch

    from pipeline.features.backbone import MEAN, STD, build_trunk, resolve_weights
    from pipeline.video.decode import sample_indices

    trunk = build_trunk("pool5")
    trunk.load_state_dict(resolve_weights(weights)[0])
    trunk.eval()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    done = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            vr = decord.VideoReader(str(path))
            every = vr.get_batch(list(range(len(vr)))).asnumpy()  # (L, H, W, 3): all frames
            for i in sample_indices(len(every), frames):
                x = torch.from_numpy(every[i]).permute(2, 0, 1)[None].float() / 255
                x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
                trunk((x - mean) / std)
                done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--length", type=int, default=90, help="frames per generated clip")
    parser.add_argument("--frames", type=int, default=30, help="T, frames sampled per clip")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="pinned: the same for end to end and bare")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, pinned for every figure "
                        "(default: the machine's cores, what extract uses)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="auto = bf16 where the CPU has it, else fp32")
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--compile", default="on", choices=("auto", "on", "off"),
                        help="extract.compile of the end-to-end runs (their ratio is against the same trunk bare)")
    parser.add_argument("--naive-clips", type=int, default=4, help="clips for the (slow) naive baseline")
    parser.add_argument("--read-clips", type=int, default=200, help="clips in the cache-read benchmark")
    parser.add_argument("--rounds", type=int, default=3, help="end to end / bare trunk pairs; the median decides")
    parser.add_argument("--real", type=Path, help="a real dataset (class folders): the precisions' table on its frames")
    parser.add_argument("--only", default="all", choices=("all", "precisions"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--one-run", help=argparse.SUPPRESS)  # internal: one end-to-end run in this process
    args = parser.parse_args()
    if args.one_run:
        return one_end_to_end_run(json.loads(args.one_run))

    import os

    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    from pipeline.features.backbone import Backbone
    from pipeline.video.decode import decode_sampled

    table = precisions(args) if args.real else None
    if args.only == "precisions":
        if table is None:
            raise SystemExit("--only precisions needs --real DIR")
        print(json.dumps(table, indent=2))
        if args.json:
            args.json.write_text(json.dumps(table, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "videos"
        paths = make_clips(root, args.clips, args.length, 320, 240)
        cfg = dict(weights=args.weights, frames=args.frames, image_size=args.image_size, batch_size=args.batch_size,
                   workers=args.workers, device=args.device, precision=args.precision, compile=args.compile)
        backbone = Backbone(args.weights, "pool5", args.image_size, args.device, args.precision)
        compiled = Backbone(args.weights, "pool5", args.image_size, args.device, args.precision)
        if compiled.needs_calibration:  # int8: calibrated on the generated clips, as extract would
            from pipeline.features import calibration

            clips = [(f"{p.parent.name}/{p.name}", p) for p in paths]
            for model in (backbone, compiled):
                calibration.prepare(model, Path(tmp) / "none.h5", clips, args.frames)
        t0 = time.perf_counter()
        compiled.compile("on", 1)
        decoded = [decode_sampled(p, args.frames).frames for p in paths[:8]]
        compiled.forward(compiled.preprocess(torch.from_numpy(decoded[0]))[:1].repeat(args.batch_size, 1, 1, 1))
        compile_seconds = time.perf_counter() - t0  # the first compiled call, in this process
        trunks = {"eager": [], "compiled": []}
        for _ in range(3):  # eager, compiled, eager, ...: the pair's ratio from the same minutes
            for name, model in (("eager", backbone), ("compiled", compiled)):
                trunks[name].append(bare_backbone(model, decoded, args.batch_size))
        used = compiled if compiled.trunk_form == "compiled" and args.compile != "off" else backbone
        rounds = []
        before = bare_backbone(used, decoded, args.batch_size)
        for r in range(args.rounds):  # bare, e2e, bare, e2e, ..., bare: each run against its two neighbours
            run = end_to_end_run(root, Path(tmp) / f"f{r}.h5", cfg, torch.get_num_threads())
            after = bare_backbone(used, decoded, args.batch_size)
            run["bare"], run["bare_before"], run["bare_after"], before = (before + after) / 2, before, after, after
            for name in ("steady", "extraction", "whole"):
                run[f"{name}_over_bare"] = run[name] / run["bare"]
            rounds.append(run)
            print(json.dumps(figures_of(run)), flush=True)
        checked, alone = decode_check_cost(paths, args.frames)
        baseline = naive(paths[: args.naive_clips], args.frames, args.image_size, args.weights)
        read = cache_read_rate(Path(tmp) / "read", args.read_clips, args.frames)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    middle = sorted(rounds, key=lambda r: r["extraction_over_bare"])[len(rounds) // 2]
    figures = {
        "machine": f"{machine_line()}, cpu capability {torch.backends.cpu.get_cpu_capability()}",
        "precision": backbone.precision, "device": str(backbone.device), "compile": args.compile,
        "clips": args.clips, "frames": args.frames, "image_size": args.image_size,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(), "workers": args.workers,
        "rounds": [figures_of(r) for r in rounds],
        "end_to_end_fps_steady": round(median("steady"), 2),
        "end_to_end_fps": round(median("extraction"), 2),
        "end_to_end_fps_whole_run": round(median("whole"), 2),
        "bare_backbone_fps": round(median("bare"), 2), "naive_fps": round(baseline, 2),
        "trunk_eager_fps": round(statistics.median(trunks["eager"]), 2),
        "trunk_compiled_fps": round(statistics.median(trunks["compiled"]), 2),
        "trunk_compiled_over_eager": round(
            statistics.median(c / e for e, c in zip(trunks["eager"], trunks["compiled"])), 3),
        "first_compiled_call_s": round(compile_seconds, 2),
        "startup_s": median_profile(rounds, "startup_s (first dispatch -> first call)"),
        "first_call_s": median_profile(rounds, "first_call_s"),
        "join_s": median_profile(rounds, "join_s"),
        "outside_extraction_s": median_profile(rounds, "outside_extraction_s (plan, lock, last shard, join)"),
        "steady_over_bare": round(median("steady_over_bare"), 3),
        "end_to_end_over_bare": round(median("extraction_over_bare"), 3),
        "whole_run_over_bare": round(median("whole_over_bare"), 3),
        "end_to_end_over_naive": round(median("extraction") / baseline, 2),
        "profile_of_the_median_round": middle["profile"],
        "decode_seconds_per_clip_checked": round(checked, 4), "decode_seconds_per_clip_decord": round(alone, 4),
        "decode_checked_over_decord": round(checked / alone, 3),
        "cache_read_clips": args.read_clips, "cache_read_gb_per_s": round(read, 2),
        "precisions": table,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


GFLOP_PER_FRAME_224 = 30.7  # VGG-16 through pool5 at 224 x 224 (DESIGN, "Backbone")


def precisions(args) -> dict:
    """fp32, bf16 (where native) and int8 trunks on the frames of the real dataset `args.real`: frames/s
    alternately, the int8 quantisation time, the pool5 error against fp32 on frames no calibration saw."""
    import torch

    from pipeline.features import calibration
    from pipeline.features.backbone import Backbone, cpu_supports_bf16
    from pipeline.features.int8 import unavailable
    from pipeline.video.decode import decode_sampled
    from pipeline.video.folders import discover

    clips = [(c.video, c.path) for c in discover(args.real).clips]
    names = ["fp32"] + (["bf16"] if cpu_supports_bf16() else []) + (["int8"] if unavailable(torch.device("cpu"))
                                                                    is None else [])
    models, quantize = {}, {}
    for name in names:
        model = Backbone(args.weights, "pool5", args.image_size, "cpu", name)
        if name == "bf16":
            model.compile("on", 1)
        if name == "int8":
            with tempfile.TemporaryDirectory() as tmp:
                quantize["calibration_s"] = calibration.prepare(model, Path(tmp) / "none.h5", clips, args.frames)
        models[name] = model
    calibrated = set(models["int8"].quantization["calibration"]["clips"]) if "int8" in models else set()
    order = [clips[i] for i in calibration.choose([k for k, _ in clips], 2 * calibration.CLIPS)]
    held_out = [c for c in order if c[0] not in calibrated][:calibration.CLIPS]
    frames = [decode_sampled(path, args.frames).frames for _, path in held_out]  # (T, H, W, 3) each
    x = torch.cat([models["fp32"].preprocess(torch.from_numpy(f)) for f in frames])  # (8T, 3, S, S)
    picked = torch.cat([models["fp32"].preprocess(torch.from_numpy(f[calibration.frame_positions(len(f))]))
                        for f in frames])  # the 64 error frames
    first = {}
    for name, model in models.items():  # the first call (a compiled trunk compiles here)
        start = time.perf_counter()
        model.forward(x[:args.batch_size])
        first[name] = time.perf_counter() - start
    if "int8" in models:
        quantize["first_compiled_call_s"] = first["int8"]
        quantize["total_s"] = quantize["calibration_s"] + first["int8"]
    fps: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(max(1, args.rounds)):  # fp32, bf16, int8, fp32, ...: ratios from the same minutes
        for name, model in models.items():
            start = time.perf_counter()
            for i in range(0, len(x), args.batch_size):
                model.forward(x[i:i + args.batch_size])
            fps[name].append(len(x) / (time.perf_counter() - start))
    reference = models["fp32"].forward(picked).flatten(1).double()  # (64, C*h*w)
    gflop = GFLOP_PER_FRAME_224 * (args.image_size / 224) ** 2
    table: dict = {"real_dataset": str(args.real), "frames_timed": len(x), "error_frames": len(picked),
                   "error_clips": [k for k, _ in held_out], "batch_size": args.batch_size,
                   "threads": torch.get_num_threads(), "machine": machine_line(), "quantize": quantize}
    for name, model in models.items():
        y = model.forward(picked).flatten(1).double()
        median = statistics.median(fps[name])
        table[name] = {
            "frames_per_s": round(median, 2), "rounds": [round(v, 2) for v in fps[name]],
            "gflop_per_s": round(median * gflop, 1),
            "over_fp32": round(statistics.median(a / b for a, b in zip(fps[name], fps["fp32"])), 2),
            "over_bf16": (round(statistics.median(a / b for a, b in zip(fps[name], fps["bf16"])), 2)
                          if "bf16" in fps else None),
            "relative_l2_vs_fp32": round(float((y - reference).norm() / reference.norm()), 4),
            "cosine_vs_fp32": round(float(torch.nn.functional.cosine_similarity(y, reference).mean()), 5),
            "trunk": model.trunk_form, "first_call_s": round(first[name], 2)}
    return table


def median_profile(rounds: list[dict], key: str) -> float:
    return round(statistics.median(r["profile"][key] for r in rounds), 3)


def figures_of(run: dict) -> dict:
    """One round's figures as printed: rounded, without its profile."""
    return {k: round(v, 3) for k, v in run.items() if k != "profile"}


def end_to_end_run(root: Path, cache: Path, cfg: dict, threads: int) -> dict:
    """`stages.extract.run` in a fresh process, as `python -m pipeline extract` runs; its figures and profile."""
    job = {"root": str(root), "cache": str(cache), "cfg": cfg, "threads": threads}
    out = subprocess.run([sys.executable, __file__, "--one-run", json.dumps(job)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the end-to-end run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_end_to_end_run(job: dict) -> None:
    """The child of `end_to_end_run`: one extraction, each backbone call timed; prints one JSON line.

    The profile says where the extraction's time went beyond the backbone's steady batches: the start-up
    (first clip dispatched -> first batch begins: worker spawn, the first decodes, preprocessing), the first
    call's excess over a steady call (oneDNN compiles its kernels, first-touch memory), the gaps between
    calls (preprocessing, reassembly, the writer and progress in the same process) and the tail after the
    last call (the last clips handed to the writer).
    """
    import time

    import torch

    torch.set_num_threads(job["threads"])
    from pipeline.config import ExtractConfig
    from pipeline.features import backbone as bb
    from stages import extract

    calls: list[tuple[float, float, int]] = []  # (start, end, frames) of every backbone call
    forward = bb.Backbone.forward

    def timed(self, x):
        start = time.monotonic()
        y = forward(self, x)
        calls.append((start, time.monotonic(), len(x)))
        return y

    bb.Backbone.forward = timed
    from pipeline.features import extractor

    timings: list = []
    run = extractor.Extractor.run

    def keep(self, *a, **k):
        timing = run(self, *a, **k)
        timings.append(timing)
        return timing

    extractor.Extractor.run = keep
    arrivals: list[float] = []  # when each decoded clip reached the backbone's thread
    add = extractor._Batcher.add

    def arrived(self, clip):
        arrivals.append(time.monotonic())
        return add(self, clip)

    extractor._Batcher.add = arrived
    joins: list[float] = []
    join = extract.join

    def timed_join(*a, **k):
        start = time.monotonic()
        try:
            return join(*a, **k)
        finally:
            joins.append(time.monotonic() - start)

    extract.join = timed_join
    summary = extract.run(Path(job["root"]), Path(job["cache"]), ExtractConfig(**job["cfg"]), progress=False)
    t = timings[0]
    durations = [end - start for start, end, _ in calls]
    full = [d for (_, _, n), d in zip(calls, durations) if n == job["cfg"]["batch_size"]][1:] or durations
    gaps = sum(calls[i + 1][0] - calls[i][1] for i in range(len(calls) - 1))
    profile = {
        "extraction_s": round(t.seconds, 3), "whole_run_s": round(summary.seconds, 3),
        "outside_extraction_s (plan, lock, last shard, join)": round(summary.seconds - t.seconds, 3),
        "startup_s (first dispatch -> first call)": round(calls[0][0] - t.started, 3),
        "first_clip_decoded_s (after dispatch)": round(arrivals[0] - t.started, 3),
        "second_clip_decoded_s": round(arrivals[1] - t.started, 3) if len(arrivals) > 1 else None,
        "first_call_s": round(durations[0], 3), "steady_call_s (median)": round(statistics.median(full), 3),
        "backbone_calls_s": round(sum(durations), 3), "calls": len(calls),
        "gaps_between_calls_s": round(gaps, 3), "tail_after_last_call_s": round(t.finished - calls[-1][1], 3),
        "join_s": round(sum(joins), 3),
    }
    print(json.dumps({"steady": summary.steady_frames_per_second, "extraction": summary.frames / t.seconds,
                      "whole": summary.frames / summary.seconds, "profile": profile}))


def decode_check_cost(paths: list[Path], frames: int, rounds: int = 3) -> tuple[float, float]:
    """Median seconds per clip of decode_sampled checked ("auto") and decord alone, alternating."""
    from pipeline.video.decode import decode_sampled

    times: dict[str, list[float]] = {"auto": [], "decord": []}
    for _ in range(rounds):
        for path in paths:
            for decoder in times:
                start = time.perf_counter()
                decode_sampled(path, frames, decoder)
                times[decoder].append(time.perf_counter() - start)
    return float(np.median(times["auto"])), float(np.median(times["decord"]))


def cache_read_rate(folder: Path, clips: int, frames: int) -> float:
    """Warm read of a whole `clips`-clip cache (random 512x7x7 cubes) into memory, GB/s (best of three)."""
    from pipeline.features.reader import open_cache
    from pipeline.features.shards import ClipFeatures, join, write_shard

    rng = np.random.default_rng(0)
    settings = {"frames": frames, "dtype": "float16"}
    rows = [ClipFeatures(f"c/{i:04d}.avi", "c", rng.standard_normal((frames, 512, 7, 7)).astype(np.float16),
                         np.arange(frames, dtype=np.int32), frames, 25.0, 240, 320) for i in range(clips)]
    write_shard(folder / "f.h5.parts", rows, [], settings)
    join(folder / "f.h5", folder / "f.h5.parts", settings)
    best = 0.0
    with open_cache(folder / "f.h5") as cache:
        for _ in range(3):
            start = time.perf_counter()
            data = cache.load()
            best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return best


if __name__ == "__main__":
    main()
