"""Stage-one throughput, three ways in one run, so the ratios compare like with like.

* end to end: `stages.extract.run` (decode workers + backbone + shard writes + join) on HMDB-like clips,
  three ways: steady state (after the first backbone batch), the extraction (first clip dispatched to last
  clip written: worker start-up and the backbone's first call included) and the whole run (backbone build,
  rerun plan and join included too)
* bare backbone: the same frames, pre-decoded and pre-processed, through `Backbone.forward` in batches
* naive: decode every frame, then push the sampled frames one at a time through an fp32 trunk
* decode check: seconds per clip of `decode_sampled` checked against PyAV (what extract runs) vs decord
  alone, interleaved clip by clip, so the cost of never trusting decord blindly is a ratio of one run

    python bench/extract.py [--clips 12] [--frames 30] [--image-size 224] [--device cpu] [--threads N]

Batch size, precision and threads are pinned (flags) and printed with the figures.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


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

    x = torch.cat([backbone.preprocess(torch.from_numpy(f)) for f in decoded])  # (N*T, 3, S, S)
    backbone.forward(x[:batch])  # warm-up
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
    parser.add_argument("--clips", type=int, default=12)
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
    parser.add_argument("--naive-clips", type=int, default=4, help="clips for the (slow) naive baseline")
    parser.add_argument("--read-clips", type=int, default=200, help="clips in the cache-read benchmark")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import os

    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    from pipeline.features.backbone import Backbone
    from pipeline.config import ExtractConfig
    from pipeline.video.decode import decode_sampled
    from stages import extract

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "videos"
        paths = make_clips(root, args.clips, args.length, 320, 240)
        cfg = ExtractConfig(weights=args.weights, frames=args.frames, image_size=args.image_size,
                            batch_size=args.batch_size, workers=args.workers, device=args.device,
                            precision=args.precision)
        summary = extract.run(root, Path(tmp) / "f.h5", cfg, progress=False)
        end_to_end = summary.frames / summary.extract_seconds  # first clip dispatched -> last clip written
        steady = summary.steady_frames_per_second  # after the first backbone batch: no spawn, no first call
        whole = summary.frames / summary.seconds  # the whole run: backbone build, plan, lock, join included
        backbone = Backbone(args.weights, "pool5", args.image_size, args.device, args.precision)
        decoded = [decode_sampled(p, args.frames).frames for p in paths]
        bare = bare_backbone(backbone, decoded, args.batch_size)
        checked, alone = decode_check_cost(paths, args.frames)
        baseline = naive(paths[: args.naive_clips], args.frames, args.image_size, args.weights)
        read = cache_read_rate(Path(tmp) / "read", args.read_clips, args.frames)

    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"cpu capability {torch.backends.cpu.get_cpu_capability()}",
        "precision": backbone.precision, "device": str(backbone.device),
        "clips": args.clips, "frames": args.frames, "image_size": args.image_size,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(), "workers": args.workers,
        "end_to_end_fps_steady": round(steady, 2),
        "end_to_end_fps": round(end_to_end, 2),
        "end_to_end_fps_whole_run": round(whole, 2),
        "bare_backbone_fps": round(bare, 2), "naive_fps": round(baseline, 2),
        "steady_over_bare": round(steady / bare, 3),
        "end_to_end_over_bare": round(end_to_end / bare, 3),
        "whole_run_over_bare": round(whole / bare, 3),
        "end_to_end_over_naive": round(end_to_end / baseline, 2),
        "decode_seconds_per_clip_checked": round(checked, 4), "decode_seconds_per_clip_decord": round(alone, 4),
        "decode_checked_over_decord": round(checked / alone, 3),
        "cache_read_clips": args.read_clips, "cache_read_gb_per_s": round(read, 2),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


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
    from pipeline.features.shards import ClipFeatures, join, write_shard
    from pipeline.features.cache import FeatureCache

    rng = np.random.default_rng(0)
    settings = {"frames": frames, "dtype": "float16"}
    rows = [ClipFeatures(f"c/{i:04d}.avi", "c", rng.standard_normal((frames, 512, 7, 7)).astype(np.float16),
                         np.arange(frames, dtype=np.int32), frames, 25.0, 240, 320) for i in range(clips)]
    write_shard(folder / "f.h5.parts", rows, [], settings)
    join(folder / "f.h5", folder / "f.h5.parts", settings)
    best = 0.0
    with FeatureCache(folder / "f.h5") as cache:
        for _ in range(3):
            start = time.perf_counter()
            data = cache.load()
            best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return best


if __name__ == "__main__":
    main()
