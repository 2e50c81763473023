"""`extract --engine ray`: stage one on Ray Data, over the same plan and into the same shards as the local engine.

The stage (stages/extract.py) plans as always (only the clips the cache lacks), then hands that `todo` list
here instead of to the local extractor; the shards this writes (into `<cache>.parts/`, or a folder cache
itself) are joined or indexed by the stage exactly like the local engine's. The pipeline (the operators that
run inside Ray's workers are in pipeline/engines/ray_operators.py):

1. `ray.data.from_items` rows (key, absolute path, label) in small blocks (`CLIPS_PER_BLOCK` clips each: a
   block is the unit Ray retries).
2. **Decode stage**, CPU tasks (`map_batches` with a function, `TaskPoolStrategy`, `num_cpus=1`, and a memory
   request that also keeps Ray from fusing it into the actors, which would run decoding inside them): each clip goes
   through the project's timed decoder (`TimedPool(decode_task, 1, timeout)`, one long-lived pool per Ray
   worker process), so a hung or crashing decoder is one failure row, never a lost block or a failed task.
   Every row has the same columns (Ray requires it): key, path, label, ok, error, frames ((T, H, W, 3) uint8,
   empty when failed), frame_index, num_frames, fps, height, width, decoder, note, source (fingerprint).
3. **Backbone actor pool** (`ActorPoolStrategy`, a callable class that builds the `Backbone` once per actor):
   the frames of all clips in a Ray batch are preprocessed and run through the trunk together in chunks of
   `batch_size` frames (like the local `_Batcher`), out come float16 (T, C, h, w) cubes. A Python error in a
   batch falls back clip by clip; a clip that still fails is a failure row, not the run's end. With CUDA GPUs
   in the cluster: one GPU per actor (`num_gpus=1`), as many actors as GPUs.
4. **`ShardSink`**, a `ray.data.Datasink`: each `write()` writes one atomic shard with `write_shard` (temp name,
   fsync, rename) of up to `extract.shard_clips` rows (default 32, `min_rows_per_write`) and returns a small
   summary; `on_write_complete` collects them on the driver.

Sizing (`plan_resources`). Actors are never allowed every CPU (Ray Data hangs when actors hold all CPU slots
and no decode task can run: ray#44687): at least one CPU, and 1/8 of the cluster's, stays with decoding.
CPU-only: the rest goes to backbone actors of at most 8 CPUs each. Torch threads per actor: its share of
*all* the CPUs (cpus // actors: 2 on a 2-core box, where the actor reserves 1 CPU), more than its Ray
reservation, on purpose: Ray sets OMP_NUM_THREADS to the reservation, the actor then calls
`torch.set_num_threads` with the larger number, so the trunk also uses the cycles the decode slots leave
idle (decoding 30 frames is a few % of a VGG-16 pass on a CPU), oversubscribing like the local engine (its
2-thread trunk beside 2 decode workers). `extract.ray_threads` overrides it. Why the larger number: with
the reservation alone the trunk runs on one core of a 2-core box, and the larger one brings Ray close to the
local engine (docs/BENCHMARKS.md, "`extract --engine ray` vs the local engine"). With GPUs: one actor per
GPU, 1 CPU and 1 thread each (the GPU does the maths), the rest decode.

Fault tolerance, Ray Data's defaults on 2.60 (checked in its source, and not overridden: passing remote
args such as `max_restarts` to `map_batches` is deprecated there and goes in 2.64): tasks (decode, write) are
retried without limit on system failures (`max_retries=-1`, RaySystemError retried), backbone actors are
restarted without limit when killed (`max_restarts=-1`) and their lost batches resubmitted
(`max_task_retries=-1`). A batch lost with a killed actor is recomputed from its decoded block on the new
actor, so no clip is lost (tests/test_ray_extract.py kills one). The price of "without limit": a batch that
kills its actor every time (say the OOM killer on a huge clip) is retried forever; Ray Data's 30-minute
no-progress timeout is the backstop. Python errors never reach Ray: decoding and the backbone turn them into
failure rows. A write task retried after its shard was renamed writes those rows again in a second shard:
the join keeps one row per video (later wins), so that only duplicates work, never rows in the cache.

Ray's own progress bars and logs are off (DataContext, `log_to_driver=False`, its loggers at ERROR; its C++
core writes straight to fd 2, so fd 2 points at a temporary log file while Ray runs, kept and named only
when the run fails, while Python's stderr still reaches the terminal); the project's progress bar
advances as shards are written (a tiny counter actor that the driver polls while `write_datasink` runs in a
thread). Start-up (ray.init, the dataset plan, the first backbone actor ready) is timed apart from extraction.

Clusters: `--address auto` (or `ray://host:10001`) joins an existing cluster, else a local one is started
with `os.cpu_count()` CPUs (`extract.ray_cpus` pins it); Ray is shut down at the end only if this run
started it. Paths handed to the dataset are absolute; on a real cluster the videos, the cache folder and this
project (installed in the same environment) must be on every node, i.e. on shared storage.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from pipeline.engines.ray_operators import BackboneActor, Counter, decode_batch, sink_class
from pipeline.errors import UserError, first_line

CLIPS_PER_BLOCK = 4  # clips per input block: the unit Ray retries; small so a retry redoes little
DECODE_MEMORY = 512 << 20  # bytes reserved per decode task: its decoder process and a block of frames
MAX_ACTOR_CPUS = 8  # CPU-only: more threads than this in one trunk scale poorly; more actors instead
MISSING_RAY = "--engine ray needs Ray: pip install -e '.[ray]'"


class RayEngineError(UserError):
    """The Ray engine cannot start or had to stop; the message says what to do."""


def import_ray():
    """ray, or the one-line error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] extra
    except ImportError:
        raise RayEngineError(MISSING_RAY) from None
    return ray


# --- sizing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    actors: int  # backbone actors
    actor_cpus: float  # CPUs reserved per actor (0.5 only on a 1-CPU cluster)
    actor_gpus: int  # GPUs per actor (0 or 1)
    threads: int  # torch threads per actor
    decoders: int  # concurrent decode tasks
    decode_cpus: float = 1.0  # CPUs reserved per decode task


def plan_resources(cpus: float, gpus: float = 0.0, threads: int = 0) -> Resources:
    """How the cluster's CPUs (and GPUs) are split between backbone actors and decode tasks; see the module
    docstring. Actors never take every CPU: at least one (and 1/8 of them) stays with decoding. `threads`
    (extract.ray_threads) fixes the torch threads per actor; 0 sizes them."""
    if cpus < 2:  # one CPU: halves, so that a decode task can always run beside the actor
        return Resources(1, 0.5, 1 if gpus >= 1 else 0, threads or 1, 1, 0.5)
    cpus = int(cpus)
    reserve = max(1, cpus // 8)
    if gpus >= 1:
        actors = max(1, min(int(gpus), cpus - reserve))
        return Resources(actors, 1, 1, threads or 1, max(1, cpus - actors))
    avail = cpus - reserve
    actors = math.ceil(avail / MAX_ACTOR_CPUS)
    actor_cpus = avail // actors
    # torch threads: the actors' share of *all* the CPUs, decode slots included (decoding is a few % of the work,
    # so its reserved cores would otherwise idle); the reservation alone stays below every CPU (ray#44687)
    threads = threads or max(actor_cpus, cpus // actors)
    return Resources(actors, actor_cpus, 0, max(1, threads), cpus - actors * actor_cpus)


# --- the driver -------------------------------------------------------------------------------------------


@dataclass
class RayOutcome:
    """What the stage's summary needs."""

    extracted: int = 0
    frames: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    redecoded: list[tuple[str, str]] = field(default_factory=list)
    extract_seconds: float = 0.0  # first backbone actor ready -> last shard written
    steady_frames_per_second: float = 0.0  # after the first backbone batch
    startup_seconds: float = 0.0  # ray.init + dataset plan + the first backbone actor ready
    init_seconds: float = 0.0  # of which ray.init
    plan_seconds: float = 0.0  # of which building the dataset
    actor_seconds: float = 0.0  # of which waiting for the first backbone actor (process, torch, weights)


def _quiet(ray) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("enable_operator_progress_bars", "enable_rich_progress_bars"):
        if hasattr(ctx, name):
            setattr(ctx, name, False)
    for name in ("ray", "ray.data", "ray.util"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _stderr_aside() -> Iterator[Path]:
    """Point fd 2 at a log file while Ray runs (its C++ core writes warnings straight to fd 2, across the
    progress bar), keeping Python's sys.stderr (the bar, errors) on the real stderr; the file is removed
    afterwards unless the run failed."""
    import sys
    import tempfile

    fd, name = tempfile.mkstemp(prefix="pipeline-ray-", suffix=".log")
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    saved = os.dup(2)
    old = sys.stderr
    try:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                               errors="backslashreplace")
    except OSError:
        sys.stderr = old
    os.dup2(fd, 2)
    os.close(fd)
    failed = False
    try:
        yield Path(name)
    except BaseException:
        failed = True
        raise
    finally:
        if sys.stderr is not old:
            try:
                sys.stderr.flush()
                sys.stderr.close()
            except (OSError, ValueError):
                pass
            sys.stderr = old
        os.dup2(saved, 2)
        os.close(saved)
        if not failed:
            Path(name).unlink(missing_ok=True)


def start_ray(address: str | None, cpus: int = 0):
    """Connect to `address` (auto, ray://...) or start a local Ray on `cpus` CPUs (0: every core); returns
    (ray, whether we started it)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            cpus = cpus or os.cpu_count() or 1
            # "local": always a new single-node Ray here, never a cluster another process left running
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayEngineError(f"cannot start Ray{f' at {address}' if address else ''}: {first_line(exc)}") from None
    return ray, True


def _actor_precision(precision: str, settings: dict[str, Any]) -> str:
    """int8 with the driver's calibration record; where the driver fell back from int8, what auto gives."""
    if settings.get("quantization", "none") != "none":
        return "int8"
    return "auto" if precision == "int8" else precision


def extract(todo: Sequence, cfg, parts_dir: Path, settings: dict[str, Any], *, address: str | None = None,
            progress: bool = True) -> RayOutcome:
    """Extract every clip of `todo` (objects with .video, .label, .path) into shards in `parts_dir`."""
    with _stderr_aside() as log:
        try:
            return _run(todo, cfg, parts_dir, settings, address, progress)
        except RayEngineError as exc:
            raise RayEngineError(f"{exc} (Ray's log: {log})") from None


def _run(todo: Sequence, cfg, parts_dir: Path, settings: dict[str, Any], address: str | None,
         progress: bool) -> RayOutcome:
    from pipeline.progress import progress_bar

    t0 = time.monotonic()
    ray, started = start_ray(address, cfg.ray_cpus)
    init_seconds = time.monotonic() - t0
    try:
        _quiet(ray)
        res = ray.cluster_resources()
        plan = plan_resources(res.get("CPU", 1), 0 if cfg.device == "cpu" else res.get("GPU", 0), cfg.ray_threads)
        counter = ray.remote(num_cpus=0)(Counter).remote()
        rows = [{"key": c.video, "path": str(Path(c.path).resolve()), "label": c.label} for c in todo]
        clips_per_batch = max(1, math.ceil(cfg.batch_size / cfg.frames))
        shard_clips = cfg.shard_clips
        device = cfg.device if plan.actor_gpus else "cpu"
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / CLIPS_PER_BLOCK)))
        # the memory request (the decoder child plus a block of frames) also keeps Ray from fusing decoding into
        # the backbone actors (fusion needs equal resource requests): it must run beside them, not inside them
        ds = ds.map_batches(decode_batch, batch_size=CLIPS_PER_BLOCK, batch_format="numpy",
                            fn_kwargs={"frames": cfg.frames, "timeout": cfg.timeout},
                            compute=ray.data.TaskPoolStrategy(size=plan.decoders), num_cpus=plan.decode_cpus,
                            memory=DECODE_MEMORY)
        actor_args: dict[str, Any] = dict(num_cpus=plan.actor_cpus)
        if plan.actor_gpus:
            actor_args["num_gpus"] = plan.actor_gpus
        ds = ds.map_batches(BackboneActor, batch_size=clips_per_batch, batch_format="numpy",
                            fn_constructor_kwargs=dict(weights=cfg.weights, layer=cfg.layer,
                                                       image_size=cfg.image_size, device=device,
                                                       precision=_actor_precision(cfg.precision, settings),
                                                       quantization=settings.get("quantization", "none"),
                                                       batch_size=cfg.batch_size,
                                                       threads=plan.threads, counter=counter, compile=cfg.compile,
                                                       frames=len(rows) * cfg.frames // plan.actors),
                            compute=ray.data.ActorPoolStrategy(size=plan.actors), **actor_args)
        sink = sink_class(ray)(parts_dir, settings, shard_clips, counter)
        plan_done = time.monotonic()
        box: dict[str, BaseException] = {}

        def write() -> None:
            try:
                ds.write_datasink(sink)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the driver's thread
                box["error"] = exc

        writing = threading.Thread(target=write, name="ray dataset", daemon=True)
        w0, w0_wall = time.monotonic(), time.time()
        writing.start()
        seen = 0
        with progress_bar("extract (ray)", len(todo), "clips", enabled=progress) as bar:
            while True:
                writing.join(0.25 if progress else 1.0)
                snap = ray.get(counter.snapshot.remote())
                if snap["clips"] > seen:
                    span = time.time() - (snap["ready"] or w0_wall)
                    bar.advance(int(snap["clips"] - seen), note=f"{snap['frames'] / max(span, 1e-9):.1f} frames/s")
                    seen = int(snap["clips"])
                if not writing.is_alive():
                    break
        end = time.monotonic()
        if "error" in box:
            why = re.sub(r"\x1b\[[0-9;]*m", "", first_line(box["error"]))
            raise RayEngineError(f"the Ray dataset failed: {why}; finished shards are kept, "
                                 "rerun to resume")
        snap = ray.get(counter.snapshot.remote())
        out = RayOutcome()
        for r in sink.results:
            out.extracted += r["clips"]
            out.frames += r["frames"]
            out.failed += [tuple(f) for f in r["failed"]]
            out.redecoded += [tuple(f) for f in r["redecoded"]]
        ready = (snap["ready"] - w0_wall) if snap["ready"] else 0.0  # wall clock: actors may live elsewhere
        ready = min(max(ready, 0.0), end - w0)
        out.startup_seconds = (plan_done - t0) + ready
        out.init_seconds, out.plan_seconds, out.actor_seconds = init_seconds, plan_done - t0 - init_seconds, ready
        out.extract_seconds = (end - w0) - ready
        span, frames = snap["last_batch"] - snap["first_batch"], snap["frames"] - snap["first_batch_frames"]
        out.steady_frames_per_second = frames / span if span > 0 and frames > 0 else 0.0
        return out
    finally:
        if started:
            ray.shutdown()
