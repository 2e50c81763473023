"""What runs inside Ray's workers for `extract --engine ray`: the decode task, the backbone actor, the progress
counter and the shard Datasink. The design, the sizing and the driver that wires these into a Ray Data
pipeline: pipeline/engines/ray_extract.py.

Every row between the stages has the same columns (Ray requires it); a clip that fails anywhere is a row with
`ok` False and its reason, so a Python error is that clip's failure, never a lost block or a failed task.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import first_line

# --- stage 1: decode (Ray tasks) --------------------------------------------------------------------------

_POOL = None  # one TimedPool per Ray worker process, kept between tasks (spawning one costs ~1 s)
_POOL_TIMEOUT = None


def _timed_pool(timeout: float):
    global _POOL, _POOL_TIMEOUT
    from pipeline.features.extractor import decode_task
    from pipeline.workers import TimedPool

    if _POOL is None or _POOL_TIMEOUT != timeout:
        if _POOL is not None:
            _POOL.close()
        _POOL, _POOL_TIMEOUT = TimedPool(decode_task, 1, timeout), timeout
    return _POOL


def _column(values: list) -> np.ndarray:
    """A list of arrays as a 1-D object array (a tensor column of any shapes), never a stacked array."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def decode_batch(batch: dict[str, np.ndarray], frames: int, timeout: float) -> dict[str, np.ndarray]:
    """Decode every clip of `batch` under the per-clip time limit; a failure is a row with `ok` False."""
    from pipeline.features.extractor import fingerprint_or_blank

    pool = _timed_pool(timeout)
    keys, paths = [str(k) for k in batch["key"]], [str(p) for p in batch["path"]]
    results = {}
    for (path, _frames), result in pool.imap_unordered((p, frames) for p in paths):
        results[path] = result
    rows: dict[str, list] = {name: [] for name in ("ok", "error", "frames", "frame_index", "num_frames", "fps",
                                                   "height", "width", "decoder", "note", "source")}
    for path in paths:
        result = results.get(path, RuntimeError("decoder returned nothing"))
        if isinstance(result, BaseException):
            values = dict(ok=False, error=str(result) or result.__class__.__name__,
                          frames=np.zeros((0, 0, 0, 3), np.uint8), frame_index=np.zeros(0, np.int32), num_frames=0,
                          fps=0.0, height=0, width=0, decoder="", note="", source=fingerprint_or_blank(Path(path)))
        else:
            d, source = result
            values = dict(ok=True, error="", frames=d.frames, frame_index=np.asarray(d.frame_index, np.int32),
                          num_frames=d.num_frames, fps=d.fps, height=d.height, width=d.width, decoder=d.decoder,
                          note=d.note, source=source)
        for name, value in values.items():
            rows[name].append(value)
    out = {"key": np.array(keys), "path": np.array(paths), "label": np.array([str(v) for v in batch["label"]])}
    for name, values in rows.items():
        if name in ("frames", "frame_index"):
            out[name] = _column(values)
        elif name in ("num_frames", "height", "width"):
            out[name] = np.array(values, dtype=np.int64)
        elif name == "fps":
            out[name] = np.array(values, dtype=np.float64)
        elif name == "ok":
            out[name] = np.array(values, dtype=bool)
        else:
            out[name] = np.array(values, dtype=object).astype(str)
    return out


# --- stage 2: backbone (Ray actors) -----------------------------------------------------------------------


class BackboneActor:
    """Built once per actor: the trunk; called on batches of decoded clips, returns their float16 cubes."""

    def __init__(self, weights: str, layer: str, image_size: int, device: str, precision: str, batch_size: int,
                 threads: int, counter=None, compile: str = "off", frames: int = 0,
                 quantization: str = "none") -> None:
        import torch

        from pipeline.features.backbone import Backbone

        torch.set_num_threads(max(1, threads))
        # int8: the driver's calibration record, so every actor quantises alike (and none calibrates)
        self.backbone = Backbone(weights, layer, image_size, device, precision,
                                 quantization if precision == "int8" else None)
        self.backbone.compile(compile, frames)  # `frames`: this actor's share of the run
        self.batch_size, self.counter = batch_size, counter
        if counter is not None:
            counter.actor_ready.remote(time.time())

    def _embed(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """Frames of all `clips` through the trunk together, `batch_size` frames at a time."""
        import torch

        x = torch.cat([self.backbone.preprocess(torch.from_numpy(np.ascontiguousarray(f))) for f in clips])
        feats = np.concatenate([self.backbone.forward(x[i:i + self.batch_size]).to(torch.float16).cpu().numpy()
                                for i in range(0, len(x), self.batch_size)])
        bounds = np.cumsum([0] + [len(f) for f in clips])
        return [feats[bounds[i]:bounds[i + 1]] for i in range(len(clips))]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        ok, error = batch["ok"].astype(bool).copy(), batch["error"].astype(object).copy()
        # failed rows: an empty cube of the same rank (Arrow cannot mix tensors of different ranks in a column)
        features: list[np.ndarray] = [np.zeros((0, *self.backbone.out_shape), np.float16)] * n
        todo = [i for i in range(n) if ok[i]]
        if todo:
            try:
                for i, f in zip(todo, self._embed([batch["frames"][i] for i in todo])):
                    features[i] = f
            except Exception:  # noqa: BLE001 - one bad clip must not sink the batch: go clip by clip
                for i in todo:
                    try:
                        features[i] = self._embed([batch["frames"][i]])[0]
                    except Exception as exc:  # noqa: BLE001 - recorded as this clip's failure
                        ok[i], error[i] = False, f"backbone failed: {first_line(exc)}"
        frames = int(sum(len(features[i]) for i in range(n) if ok[i]))
        if self.counter is not None and frames:
            self.counter.embedded.remote(time.time(), frames)
        out = {k: v for k, v in batch.items() if k != "frames"}
        out.update(ok=ok, error=error.astype(str), features=_column(features),
                   precision=np.array([self.backbone.precision] * n), trunk=np.array([self.backbone.trunk_form] * n))
        return out


# --- stage 3: shards (a Datasink) -------------------------------------------------------------------------


class Counter:
    """A tiny actor the driver polls for progress: shards written, frames embedded, when things happened."""

    def __init__(self) -> None:
        self.clips = self.frames = 0
        self.ready = self.first_batch = self.last_batch = 0.0
        self.first_batch_frames = 0

    def actor_ready(self, t: float) -> None:
        self.ready = t if not self.ready else min(self.ready, t)

    def embedded(self, t: float, frames: int) -> None:
        if not self.first_batch:
            self.first_batch, self.first_batch_frames = t, frames
        self.frames += frames
        self.last_batch = max(self.last_batch, t)

    def written(self, clips: int) -> None:
        self.clips += clips

    def snapshot(self) -> dict[str, float]:
        return dict(clips=self.clips, frames=self.frames, ready=self.ready, first_batch=self.first_batch,
                    first_batch_frames=self.first_batch_frames, last_batch=self.last_batch)


def sink_class(ray):
    """ShardSink, defined once ray is imported (its base class is Ray's)."""

    class ShardSink(ray.data.Datasink):
        """Each `write()` is one atomic shard in `parts_dir`; the summaries come back to the driver."""

        def __init__(self, parts_dir: Path, settings: dict[str, Any], shard_clips: int, counter=None) -> None:
            self.parts_dir, self.settings, self.shard_clips, self.counter = parts_dir, settings, shard_clips, counter
            self.results: list[dict[str, Any]] = []

        @property
        def min_rows_per_write(self) -> int:
            return self.shard_clips

        def get_name(self) -> str:
            return "Shards"

        def write(self, blocks, ctx) -> dict[str, Any]:
            from ray.data.block import BlockAccessor

            from pipeline.features.shards import ClipFeatures, write_shard

            clips, failed, failed_source, redecoded = [], [], [], []
            for block in blocks:
                for r in BlockAccessor.for_block(block).iter_rows(public_row_format=False):
                    if bool(r["ok"]):
                        clips.append(ClipFeatures(str(r["key"]), str(r["label"]), np.asarray(r["features"]),
                                                  np.asarray(r["frame_index"], np.int32), int(r["num_frames"]),
                                                  float(r["fps"]), int(r["height"]), int(r["width"]),
                                                  str(r["source"]), str(r["decoder"]), str(r["precision"]),
                                                  str(r["trunk"])))
                        if clips[-1].decoder != "decord":
                            redecoded.append((clips[-1].video, str(r["note"])))
                    else:
                        failed.append((str(r["key"]), str(r["error"])))
                        failed_source.append(str(r["source"]))
            if clips or failed:
                write_shard(Path(self.parts_dir), clips, failed, self.settings, failed_source)
                if self.counter is not None:
                    self.counter.written.remote(len(clips) + len(failed))
            return {"clips": len(clips), "frames": int(sum(len(c.features) for c in clips)), "failed": failed,
                    "redecoded": redecoded}

        def on_write_complete(self, write_result) -> None:
            self.results = [r for r in write_result.write_returns if r]

    return ShardSink
