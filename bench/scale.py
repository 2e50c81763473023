"""Stage one past one process: the engines side by side on the same generated clips, in one script.

Section "ray" (`--part ray`): `extract --engine ray` against the local engine on the same clips (HMDB-like
MPEG-4 AVIs, default 6 clips of 90 frames at 320x240, T=30, 224x224, weights random:0, precision auto),
each engine once as typed (Ray started by the run: its start-up, i.e. ray.init, dataset plan and first
backbone actor ready, reported apart from its extraction; the ratio compares frames/s without it), then
interleaved rounds in one Ray session comparing torch threads in the backbone actor (`--ray-threads 1 2`: on a
2-core box the actor reserves one CPU; does a second torch thread help?), medians over `--repeat` rounds.

    python bench/scale.py --part ray [--clips 6] [--length 90] [--frames 30] [--image-size 224] [--ray-threads 1 2]
                                     [--repeat 2]

Prints one JSON object: the machine (CPU model, cores, avx512_bf16), the settings, and per engine the
extraction seconds, frames/s over the extraction, steady frames/s (after the first backbone batch) and the
start-up split.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def machine() -> dict:
    flags, model = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "avx512_bf16": " avx512_bf16" in flags,
            "python": platform.python_version()}


def make_dataset(root: Path, clips: int, length: int, width: int, height: int) -> Path:
    """<root>/<class>/<clip>.avi: MPEG-4 Part 2 with B-frames, moving textures (bench/extract.py's clips)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_extract", Path(__file__).with_name("extract.py"))
    bench_extract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_extract)
    bench_extract.make_clips(root, clips, length, width, height)  # <root>/class<i % 4>/clip<i>.avi
    return root


def _figures(summary, wall: float) -> dict:
    out = {"extracted": summary.extracted, "failed": len(summary.failed), "frames": summary.frames,
           "extract_seconds": round(summary.extract_seconds, 2),
           "frames_per_second": round(summary.frames / summary.extract_seconds, 2) if summary.extract_seconds else 0,
           "steady_frames_per_second": round(summary.steady_frames_per_second, 2),
           "run_seconds": round(summary.seconds, 2), "wall_seconds": round(wall, 2)}
    if summary.startup_seconds is not None:
        out["startup_seconds"] = round(summary.startup_seconds, 2)
    return out


def ray_part(args) -> dict:
    """Local vs Ray on the same clips: first each once as a user runs them (Ray started by the run, start-up
    split out), then `--repeat` interleaved rounds (local, then Ray with each `--ray-threads` count, in one Ray
    session started here) so that a shared, noisy machine hits every variant alike; medians reported."""
    import statistics

    from pipeline.config import ExtractConfig
    from pipeline.engines import ray_extract
    from stages import extract

    cfg = ExtractConfig(weights="random:0", frames=args.frames, image_size=args.image_size, layer="pool5",
                        batch_size=args.batch_size, workers=args.workers, device="cpu", precision="auto")
    result = {"part": "ray", "machine": machine(),
              "settings": {"clips": args.clips, "length": args.length, "size": f"{args.width}x{args.height}",
                           "frames": args.frames, "image_size": args.image_size, "batch_size": args.batch_size,
                           "local_workers": args.workers, "weights": "random:0", "precision": "auto",
                           "ray_cpus": int(os.environ.get("PIPELINE_RAY_CPUS") or os.cpu_count() or 1)},
              "as_typed": {}, "rounds": {}}
    real_extract, outcomes = ray_extract.extract, []

    def keep(*a, **k):  # the start-up split, which the stage's summary folds into one number
        outcomes.append(real_extract(*a, **k))
        return outcomes[-1]

    def one(videos: Path, cache: Path, engine: str, threads: int | None = None) -> dict:
        if threads is not None:
            os.environ["PIPELINE_RAY_THREADS"] = str(threads)
        try:
            t = time.monotonic()
            fig = _figures(extract.run(videos, cache, cfg, progress=False, engine=engine), time.monotonic() - t)
        finally:
            os.environ.pop("PIPELINE_RAY_THREADS", None)
        if engine == "ray":
            o = outcomes[-1]
            fig["startup_split"] = {"ray_init": round(o.init_seconds, 2), "plan": round(o.plan_seconds, 2),
                                    "first_actor_ready": round(o.actor_seconds, 2)}
        cache.unlink(missing_ok=True)
        return fig

    ray_extract.extract = keep
    try:
        with tempfile.TemporaryDirectory() as tmp:
            videos = make_dataset(Path(tmp) / "videos", args.clips, args.length, args.width, args.height)
            cache = Path(tmp) / "f.h5"
            local = result["as_typed"]["local"] = one(videos, cache, "local")
            ray_fig = result["as_typed"]["ray"] = one(videos, cache, "ray")
            ray_fig["plan"] = vars(ray_extract.plan_resources(result["settings"]["ray_cpus"]))
            ray_fig["ratio_vs_local"] = round(ray_fig["frames_per_second"] / local["frames_per_second"], 3)
            ray_fig["steady_ratio_vs_local"] = round(ray_fig["steady_frames_per_second"]
                                                     / local["steady_frames_per_second"], 3)
            if args.repeat:
                import ray

                ray.init(address="local", num_cpus=result["settings"]["ray_cpus"], include_dashboard=False,
                         log_to_driver=False, logging_level="error")
                runs: dict[str, list[dict]] = {}
                try:
                    for _ in range(args.repeat):
                        runs.setdefault("local", []).append(one(videos, cache, "local"))
                        for threads in args.ray_threads:
                            runs.setdefault(f"ray_threads{threads}", []).append(one(videos, cache, "ray", threads))
                finally:
                    ray.shutdown()
                for name, figs in runs.items():
                    result["rounds"][name] = {
                        key: {"median": statistics.median(f[key] for f in figs), "all": [f[key] for f in figs]}
                        for key in ("frames_per_second", "steady_frames_per_second")}
                base = result["rounds"]["local"]
                for name, fig in result["rounds"].items():
                    fig["steady_ratio_vs_local"] = round(fig["steady_frames_per_second"]["median"]
                                                         / base["steady_frames_per_second"]["median"], 3)
                    fig["ratio_vs_local"] = round(fig["frames_per_second"]["median"]
                                                  / base["frames_per_second"]["median"], 3)
    finally:
        ray_extract.extract = real_extract
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["ray"], default="ray")
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--length", type=int, default=90)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="the local engine's decode workers")
    parser.add_argument("--ray-threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads of the backbone actor to compare in the interleaved rounds")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds (0: only the as-typed runs)")
    args = parser.parse_args()
    print(json.dumps({"ray": ray_part}[args.part](args), indent=2))


if __name__ == "__main__":
    main()
