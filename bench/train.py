"""Stage-two cost, measured side by side in one run: an epoch of the head from the cache vs the backbone.

* head epoch (in memory): `pipeline.head.fit.train_epoch` over N cached clips (random cubes of the cache's shape,
  written to a real HDF5 cache and loaded the way `train` loads them), default head and train settings
* head epoch (streamed): the same epoch with max_memory_gb=0, every batch read from the file
* backbone epoch: what one epoch would cost if it re-ran the VGG-16 trunk on the same clips instead of
  reading the cache: frames/s of `Backbone.forward` (batches of 32, this machine's best precision) on
  N*T frames, extrapolated from a timed sample; decoding is not counted, so the ratio is a lower bound

* readout: the ConvLSTM head with head.readout attention vs mean (the first design), epochs interleaved

    python bench/train.py [--clips 730] [--frames 30] [--cells convlstm,lstm,mean] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import line  # bench/ is the script's folder


def make_cache(path: Path, clips: int, frames: int, classes: int, seed: int = 0) -> Path:
    """A real feature cache of `clips` random (T, 512, 7, 7) float16 cubes, via the cache writer."""
    from pipeline.features.shards import ClipFeatures, join, write_shard

    rng = np.random.default_rng(seed)
    settings = {"backbone": "vgg16", "layer": "pool5", "weights": "random:0 sha256:bench", "image_size": 224,
                "frames": frames, "sampling": "segment-centre", "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225], "dtype": "float16"}
    parts = path.with_name(path.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    step = 64
    for start in range(0, clips, step):
        batch = []
        for i in range(start, min(start + step, clips)):
            cube = np.maximum(rng.standard_normal((frames, 512, 7, 7), dtype=np.float32), 0).astype(np.float16)
            batch.append(ClipFeatures(f"c{i % classes:02d}/clip{i:04d}.avi", f"c{i % classes:02d}", cube,
                                      np.arange(frames, dtype=np.int32), frames, 25.0, 240, 320))
        write_shard(parts, batch, [], settings)
    join(path, parts, dict(settings, dataset_root=str(path.parent), created="bench", versions={}))
    return path


def head_epoch(cache_path: Path, cell: str, max_memory_gb: float, device: str, epochs: int,
               readout: str = "attention") -> list[float]:
    """Seconds per epoch (after one warm-up batch) of the default head of kind `cell`."""
    import torch

    from pipeline.config import HeadConfig, TrainConfig
    from pipeline.features.reader import open_cache
    from pipeline.head.batches import ClipSet
    from pipeline.head.fit import make_optimiser, train_epoch
    from pipeline.head.model import build_head
    from pipeline.head.runtime import pick_device, seed_everything

    cfg = TrainConfig(device=device, max_memory_gb=max_memory_gb)
    dev = pick_device(device)
    with open_cache(cache_path) as cache:
        clips = ClipSet(cache, cache.videos, max_memory_gb)
        seed_everything(0)
        head = HeadConfig(cell=cell, readout=readout).for_train_split(clips.clips_a_class)
        model = build_head(head, cache.feature_shape[1], len(cache.classes)).to(dev)
        optimiser = make_optimiser(model, cfg)
        warm = next(iter(clips.batches(cfg.batch_size)))
        for _ in range(2):  # warm-up at the full batch shape: oneDNN builds its kernels per shape, once
            model(warm.features.to(dev)).logits.sum().backward()
        times = []
        for epoch in range(epochs):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(train_epoch(model, clips, optimiser, cfg, dev, epoch).seconds)
    return times


def backbone_fps(device: str, frames: int) -> tuple[float, str]:
    """Frames per second of the VGG-16 trunk at 224 px in batches of 32, and the precision it used."""
    import torch

    from pipeline.features.backbone import Backbone

    backbone = Backbone("random:0", "pool5", 224, device, "auto")
    x = torch.rand(32, 3, 224, 224)
    backbone.forward(x[:4])  # warm-up
    done, start = 0, time.perf_counter()
    while done < frames:
        backbone.forward(x)
        done += len(x)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start), str(backbone.provenance().get("precision"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=730, help="clips in the cache (the source study's train set)")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--classes", type=int, default=51)
    parser.add_argument("--cells", default="convlstm,lstm,mean")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per head (the median is reported)")
    parser.add_argument("--backbone-frames", type=int, default=96, help="frames timed through the trunk")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    results: dict = {"machine": line(), "clips": args.clips, "frames": args.frames, "device": args.device}
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_cache(Path(tmp) / "bench.h5", args.clips, args.frames, args.classes)
        fps, precision = backbone_fps(args.device, args.backbone_frames)
        backbone_epoch = args.clips * args.frames / fps
        results["backbone"] = {"frames_per_second": round(fps, 2), "precision": precision,
                               "epoch_seconds": round(backbone_epoch, 1)}
        for cell in args.cells.split(","):
            memory = float(np.median(head_epoch(cache, cell, 8.0, args.device, args.epochs)))
            results[cell] = {"epoch_seconds": round(memory, 2), "backbone_ratio": round(backbone_epoch / memory, 1)}
            print(f"{cell:9s} epoch {memory:6.2f} s in memory  ({backbone_epoch / memory:,.0f}x cheaper than the "
                  f"backbone's {backbone_epoch:,.0f} s)", flush=True)
        # the readout through the attention against the first design's avgpool, epochs interleaved A B A B
        paired = {"attention": [], "mean": []}
        for _ in range(args.epochs):
            for readout in paired:
                paired[readout] += head_epoch(cache, "convlstm", 8.0, args.device, 1, readout)
        ratio = float(np.median(paired["attention"]) / np.median(paired["mean"]))
        results["readout"] = {k: round(float(np.median(v)), 2) for k, v in paired.items()}
        results["readout"]["attention_over_mean"] = round(ratio, 3)
        print(f"convlstm  epoch {results['readout']['attention']:6.2f} s readout attention, "
              f"{results['readout']['mean']:6.2f} s readout mean (ratio {ratio:.3f})", flush=True)
        streamed = float(np.median(head_epoch(cache, "convlstm", 0.0, args.device, args.epochs)))
        results["convlstm_streamed"] = {"epoch_seconds": round(streamed, 2)}
        print(f"convlstm  epoch {streamed:6.2f} s streamed from the file", flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
