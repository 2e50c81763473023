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

Section "grow" (`--part grow`): what adding `--grow` (10%) new clips to a large cache costs, one file
(`features.h5`: the join copies every clip into a new file) against a folder (`features/`: new shards and a
new index.h5), in seconds and bytes written, and the same under `dvc repro` (what DVC writes and what its cache
gains). The cache is synthetic, no video is decoded: `--clips` (default 2000) clips of (T=30, 512, 7, 7)
float16 (1.5 MB each, the VGG-16 pool5 settings of docs/DESIGN.md) written with the pipeline's own writer
(`pipeline.features.shards.write_shard`, `--shard-clips` clips a shard like extract.shard_clips) and
finished with its own `join` (file) or `write_index` (folder), in a stage process: the "extract" of a
throwaway DVC project per form (`dvc init --no-scm`, the cache its one `persist: true` output, DVC's default
cache type unless `--cache-type`), run by `dvc repro` once with N clips and once with N + 10%.

    python bench/scale.py --part grow [--clips 2000] [--frames 30] [--channels 512] [--grid 7] [--grow 0.1]
                                      [--shard-clips 32] [--no-dvc] [--cache-type hardlink] [--workdir DIR]

Bytes written are counted three ways, each named in the output: `write_bytes` from the stage process's own
/proc/self/io (bytes it caused to be sent to storage, counted when pages are dirtied; every file is fsynced),
`files_bytes` (sizes of the files in the cache that are new or were replaced: new inode or mtime), and for
`dvc repro` the write_bytes of dvc and its stage together (getrusage of the children, ru_oublock x 512) and the
apparent size of the objects .dvc/cache gained. `--no-dvc` runs the stage process directly instead.
Needs about 4.5x the cache's size in free disk for the file form under DVC (old + new file, both copied into
.dvc/cache); each project is deleted after its form.

Section "ddp" (`--part ddp`): an epoch of the head on 1 process against `torchrun --nproc-per-node 2` (gloo, CPU),
both as a user types them (`python -m pipeline train ...` and `torchrun ... -m pipeline train ...`, code
defaults: head channels 48, batch 16), on one synthetic cache of `--clips` (default 730, the source study's
train split) clips of (T=30, 512, 7, 7) float16 plus 64 validation clips, in memory; `--epochs` epochs a run,
`--repeat` interleaved rounds. Reported: the mean training epoch (`<model>.timings.json` `seconds_per_epoch`:
the training pass, validation not included) and the whole command's wall time (start-up included). The one
process runs with torch's default threads (all cores) and again with OMP_NUM_THREADS=1; torchrun gives each
rank OMP_NUM_THREADS=1.

    python bench/scale.py --part ddp [--clips 730] [--epochs 3] [--repeat 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe  # bench/ is the script's folder

REPO = Path(__file__).resolve().parents[1]


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
    result = {"part": "ray", "machine": describe(),
              "settings": {"clips": args.clips, "length": args.length, "size": f"{args.width}x{args.height}",
                           "frames": args.frames, "image_size": args.image_size, "batch_size": args.batch_size,
                           "local_workers": args.workers, "weights": "random:0", "precision": "auto",
                           "ray_cpus": cfg.ray_cpus or os.cpu_count() or 1},
              "as_typed": {}, "rounds": {}}
    real_extract, outcomes = ray_extract.extract, []

    def keep(*a, **k):  # the start-up split, which the stage's summary folds into one number
        outcomes.append(real_extract(*a, **k))
        return outcomes[-1]

    def one(videos: Path, cache: Path, engine: str, threads: int | None = None) -> dict:
        run_cfg = dataclasses.replace(cfg, ray_threads=threads or 0)
        t = time.monotonic()
        fig = _figures(extract.run(videos, cache, run_cfg, progress=False, engine=engine), time.monotonic() - t)
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


# --- grow: adding clips to a large cache, one file vs a folder ------------------------------------------


def proc_io() -> dict[str, int]:
    """This process's /proc/self/io counters (wchar: bytes passed to write(); write_bytes: bytes it caused to
    be sent to storage)."""
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, value = line.split(":")
        out[key.strip()] = int(value)
    return out


def _io_delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in ("wchar", "write_bytes", "read_bytes")}


def synthetic_clips(indices, frames: int, channels: int, grid: int, pool: int = 16):
    """ClipFeatures of clip numbers `indices`: float16 noise from a pool of `pool` random clips, each made unique
    by its number in its first two values (so every shard has its own bytes, as DVC's content addressing needs)."""
    import numpy as np

    from pipeline.features.shards import ClipFeatures

    rng = np.random.default_rng(0)
    shape = (frames, channels, grid, grid)
    noise = [rng.standard_normal(shape, dtype=np.float32).astype(np.float16) for _ in range(pool)]
    for i in indices:
        feats = noise[i % pool].copy()
        feats.view(np.uint16).flat[:2] = [i // 30000, i % 30000]  # finite float16 bit patterns
        yield ClipFeatures(clip_key(i), clip_key(i).split("/")[0], feats, np.arange(frames, dtype=np.int32) * 3,
                           frames * 3, 30.0, 240, 320, f"sha256:{i:064x} size:1 mtime_ns:0", "decord", "fp32")


def clip_key(i: int) -> str:
    return f"class{i % 51:02d}/clip{i:07d}.avi"


def grow_settings(frames: int) -> dict:
    return {"backbone": "vgg16", "layer": "pool5", "weights": "random:0 sha256:synthetic", "image_size": 224,
            "frames": frames, "sampling": "uniform", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "dtype": "float16"}


def write_stage(args) -> None:
    """The stage process: bring the cache at `--write-stage` to `--clips` clips the way extract does (new shards,
    then join or write_index), timing and counting both steps into the JSON file `--report`."""
    from pipeline.features.cache import is_folder, main_file
    from pipeline.features.reader import open_cache
    from pipeline.features.shards import join, parts_dir_for, write_shard

    cache = Path(args.write_stage)
    settings = grow_settings(args.frames)
    t0, io0 = time.monotonic(), proc_io()
    have = set()
    if main_file(cache).exists():
        with open_cache(cache) as old:
            have = set(old.videos)
    todo = [i for i in range(args.clips) if clip_key(i) not in have]
    parts = parts_dir_for(cache)
    parts.mkdir(parents=True, exist_ok=True)
    batch = []
    for clip in synthetic_clips(todo, args.frames, args.channels, args.grid):
        batch.append(clip)
        if len(batch) == args.shard_clips:
            write_shard(parts, batch, [], settings)
            batch = []
    if batch:
        write_shard(parts, batch, [], settings)
    t1, io1 = time.monotonic(), proc_io()
    join(cache, parts, dict(settings, precision="fp32", dataset_root="/synthetic", created="synthetic",
                            versions={}))
    t2, io2 = time.monotonic(), proc_io()
    report = {"form": "folder" if is_folder(cache) else "file", "clips_before": len(have), "added": len(todo),
              "clips_after": args.clips, "seconds": round(t2 - t0, 2), "shards_seconds": round(t1 - t0, 2),
              "finish_seconds": round(t2 - t1, 2), "finish": "write_index" if is_folder(cache) else "join",
              "shards_io": _io_delta(io0, io1), "finish_io": _io_delta(io1, io2), "io": _io_delta(io0, io2)}
    Path(args.report).write_text(json.dumps(report))


def _files(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, mtime_ns, size) of the cache's files (the file itself, or the folder's)."""
    if path.is_dir():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
                for p in path.iterdir() if p.is_file()}
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns, path.stat().st_size)} if path.exists() else {}


def _du(path: Path) -> tuple[int, int]:
    """(files, apparent bytes) under `path`."""
    sizes = [p.stat().st_size for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return len(sizes), sum(sizes)


class GrowProject:
    """One form's throwaway project: the stage run directly (`--no-dvc`) or as the only stage of a DVC project."""

    def __init__(self, root: Path, form: str, args):
        self.root, self.args, self.dvc = root, args, not args.no_dvc
        self.cache = root / ("cache/features.h5" if form == "file" else "cache/features")
        root.mkdir(parents=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
        for name in ("dvc-global", "dvc-system"):
            (root.parent / f"{root.name}-{name}").mkdir()
        self.env.update(DVC_NO_ANALYTICS="1", DVC_GLOBAL_CONFIG_DIR=str(root.parent / f"{root.name}-dvc-global"),
                        DVC_SYSTEM_CONFIG_DIR=str(root.parent / f"{root.name}-dvc-system"),
                        DVC_SITE_CACHE_DIR=str(root / ".dvc" / "site_cache"), PYTHONPATH=str(REPO))
        if self.dvc:
            self._call("dvc", "init", "--no-scm", "-q")
            for key, value in (("core.analytics", "false"), ("core.check_update", "false")) + \
                    ((("cache.type", args.cache_type),) if args.cache_type else ()):
                self._call("dvc", "config", key, value)
            stage = self._command("${clips}", root.parent / f"{root.name}-report.json")
            (root / "dvc.yaml").write_text(json.dumps({"stages": {"extract": {
                "cmd": stage, "params": ["clips"],
                "outs": [{str(self.cache.relative_to(root)): {"persist": True}}]}}}, indent=1))

    def _command(self, clips: str, report: Path) -> str:
        a = self.args
        return (f"{sys.executable} {Path(__file__).resolve()} --write-stage {self.cache.relative_to(self.root)} "
                f"--clips {clips} --frames {a.frames} --channels {a.channels} --grid {a.grid} "
                f"--shard-clips {a.shard_clips} --report {report}")

    def _call(self, *argv: str) -> None:
        proc = subprocess.run([shutil.which(argv[0]) or argv[0], *argv[1:]], cwd=self.root, env=self.env,
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")

    def run(self, clips: int) -> dict:
        """Bring the cache to `clips` clips; what the stage reported, plus what was written around it."""
        report = self.root.parent / f"{self.root.name}-report.json"
        report.unlink(missing_ok=True)
        before, odb_before = _files(self.cache), self._odb()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
        t = time.monotonic()
        if self.dvc:
            (self.root / "params.yaml").write_text(f"clips: {clips}\n")
            self._call("dvc", "repro", "--quiet")
        else:
            self._call("sh", "-c", self._command(str(clips), report))
        wall = time.monotonic() - t
        written = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - children0) * 512
        out = json.loads(report.read_text())
        after = _files(self.cache)
        fresh = {k: v for k, v in after.items() if before.get(k, (None, None))[:2] != v[:2]}
        out["files_bytes"] = sum(v[2] for v in fresh.values())  # new or replaced files of the cache
        out["files_new_or_replaced"] = len(fresh)
        out["old_files_untouched"] = sum(before.get(k) == v for k, v in after.items())
        out["cache_bytes"] = sum(v[2] for v in after.values())
        out["wall_seconds"] = round(wall, 2)
        if self.dvc:
            odb_after = self._odb()
            gained = {k: v for k, v in odb_after.items() if k not in odb_before}
            out["dvc"] = {"repro_seconds": round(wall, 2),
                          "overhead_seconds": round(wall - out["seconds"], 2),
                          "write_bytes_dvc_and_stage": written,
                          "write_bytes_dvc_alone": written - out["io"]["write_bytes"],
                          "cache_gained_bytes": sum(v[2] for v in gained.values()),
                          "cache_gained_objects": len(gained),
                          "cache_objects_rewritten": sum(odb_before[k] != odb_after.get(k) for k in odb_before),
                          "cache_total_bytes": sum(v[2] for v in odb_after.values())}
        return out

    def _odb(self) -> dict[str, tuple[int, int, int]]:
        root = self.root / ".dvc" / "cache"
        return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
                for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def grow_part(args) -> dict:
    """Per form: build the cache with `--clips` clips, then add `--grow` of that; both steps measured."""
    clips = args.clips or 2000
    grown = clips + max(1, round(clips * args.grow))
    clip_bytes = args.frames * args.channels * args.grid ** 2 * 2
    result = {"part": "grow", "machine": describe(),
              "settings": {"clips": clips, "clips_after": grown, "clip_shape": [args.frames, args.channels,
                                                                                args.grid, args.grid],
                           "clip_bytes": clip_bytes, "cache_gb": round(clips * clip_bytes / 1e9, 2),
                           "shard_clips": args.shard_clips, "under_dvc": not args.no_dvc,
                           "dvc_cache_type": args.cache_type or ("reflink,copy (default)" if not args.no_dvc else None),
                           "filesystem": _filesystem(Path(args.workdir or tempfile.gettempdir()))},
              "forms": {}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for form in args.forms:
            project = GrowProject(Path(tmp) / form, form, args)
            try:
                build = project.run(clips)
                grow = project.run(grown)
            finally:
                shutil.rmtree(project.root, ignore_errors=True)
            result["forms"][form] = {"build": build, "grow": grow}
    return result


def ddp_part(args) -> dict:
    """One process vs two torchrun ranks training the same head on the same cache, rounds interleaved."""
    import statistics

    from pipeline.features.shards import join, write_shard

    clips, val = args.clips, 64
    work = Path(tempfile.mkdtemp(prefix="bench-ddp-", dir=args.workdir))
    try:
        cache, parts, splits = work / "features.h5", work / "features.h5.parts", work / "splits"
        parts.mkdir()
        every = list(synthetic_clips(range(clips + val), args.frames, 512, 7))
        for i in range(0, len(every), 64):
            write_shard(parts, every[i:i + 64], [], grow_settings(args.frames))
        join(cache, parts, dict(grow_settings(args.frames), dataset_root=str(work), created="bench", versions={}))
        splits.mkdir()
        (splits / "train.txt").write_text("".join(c.video + "\n" for c in every[:clips]))
        (splits / "val.txt").write_text("".join(c.video + "\n" for c in every[clips:]))
        torchrun = Path(sys.executable).parent / "torchrun"
        runners = {"1 process": [sys.executable, "-m", "pipeline"],
                   "1 process, 1 thread": ["env", "OMP_NUM_THREADS=1", sys.executable, "-m", "pipeline"],
                   "2 ranks": [str(torchrun) if torchrun.is_file() else sys.executable,
                               *([] if torchrun.is_file() else ["-m", "torch.distributed.run"]),
                               "--nproc-per-node", "2", "-m", "pipeline"]}
        rounds: dict[str, list[dict]] = {name: [] for name in runners}
        for r in range(max(1, args.repeat)):
            for name, runner in runners.items():
                out = work / f"{name.replace(' ', '-')}-{r}"
                argv = [*runner, "train", str(cache), str(splits), str(out / "head.pt"), "--metrics",
                        str(out / "train.json"), "--plots", str(out / "plots"), "--epochs", str(args.epochs),
                        "--patience", "1000", "--device", "cpu", "--no-progress",
                        "--params", "/nonexistent/params.yaml"]
                t0 = time.monotonic()
                subprocess.run(argv, check=True, capture_output=True, text=True, cwd=REPO)
                wall = time.monotonic() - t0
                timings = json.loads((out / "head.pt.timings.json").read_text())
                rounds[name].append({"seconds_per_epoch": timings["seconds_per_epoch"], "wall_seconds": round(wall, 2),
                                     "ranks": timings["ranks"]})
        med = {name: {k: statistics.median(x[k] for x in rs) for k in ("seconds_per_epoch", "wall_seconds")}
               for name, rs in rounds.items()}
        return {"part": "ddp", "machine": describe(),
                "settings": {"train_clips": clips, "val_clips": val, "frames": args.frames, "epochs": args.epochs,
                             "repeat": args.repeat, "head": "code defaults (convlstm, 48 channels, batch 16)"},
                "rounds": rounds, "median": med,
                "epoch_ratio_2_over_1": round(med["2 ranks"]["seconds_per_epoch"]
                                              / med["1 process"]["seconds_per_epoch"], 3)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _filesystem(path: Path) -> str:
    try:
        proc = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=False)
        return proc.stdout.splitlines()[-1].split()[1]
    except (OSError, IndexError):
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["ray", "grow", "ddp"], default="ray")
    parser.add_argument("--clips", type=int, default=None, help="ray: clips to extract (6); grow: clips in the "
                                                                "cache before it grows (2000)")
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
    parser.add_argument("--epochs", type=int, default=3, help="ddp: epochs a run")
    grow = parser.add_argument_group("--part grow")
    grow.add_argument("--channels", type=int, default=512)
    grow.add_argument("--grid", type=int, default=7, help="h = w of the feature grid")
    grow.add_argument("--grow", type=float, default=0.1, help="fraction of --clips added")
    grow.add_argument("--shard-clips", type=int, default=32, help="clips a shard (extract: extract.shard_clips)")
    grow.add_argument("--forms", nargs="+", choices=["file", "folder"], default=["file", "folder"])
    grow.add_argument("--no-dvc", action="store_true", help="run the stage process directly, not by dvc repro")
    grow.add_argument("--cache-type", default=None, help="DVC cache.type for the projects (default: DVC's)")
    grow.add_argument("--workdir", default=None, help="where the projects are made (default: the temp dir)")
    parser.add_argument("--write-stage", default=None, help=argparse.SUPPRESS)  # the stage process of --part grow
    parser.add_argument("--report", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_stage:
        write_stage(args)
        return
    if args.clips is None:
        args.clips = {"ray": 6, "ddp": 730}.get(args.part, args.clips)
    print(json.dumps({"ray": ray_part, "grow": grow_part, "ddp": ddp_part}[args.part](args), indent=2))


if __name__ == "__main__":
    main()
