"""Does attention on the actor pay, and does the head find it? Side by side in one run, on a real cache.

The same default head (params.yaml `head`/`train`, early stopping on val loss) is trained several times
from the same seed; only its attention scores Z_t differ:

* fixed maps, nothing learnt: Z_t = beta * (share of each grid cell inside the actor's box at frame t),
  so A_t = softmax(Z_t). beta = 0 is uniform attention, beta > 0 looks at the actor, beta < 0 away from it.
  The boxes are the dataset's ground truth (the embedded set's boxes.json), so these are oracles: they
  say what the loss would reward, not something the pipeline could do on unlabelled video.
* learned: docs/DESIGN.md's Z_t = w_z * tanh(W_xa * P_t + W_ha * H_{t-1} + b_a), what `train` fits.

If the on-actor oracle reaches a lower validation loss than uniform attention, looking at the actor pays;
the learned row then says whether training on class labels alone finds it (mass ratio >= 3 is the target
of the stage-two issue).

    python bench/attention_probe.py [cache/features.h5] [splits/] [--betas 0,3,-3] [--no-learned]

The ablation of the readout, the regulariser and the cell over seeds, trained and evaluated by the
pipeline's own stages, is `python bench/attention_ablation.py` (docs/BENCHMARKS.md has both tables).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
from machine import line  # bench/ is the script's folder


def box_covers(cache, rows: np.ndarray, truth: dict[str, np.ndarray]) -> np.ndarray:
    """(N, T, h, w) share of each grid cell inside the actor's box, at the very frames that were cached."""
    from pipeline.report.attention_quality import box_cover, boxes_at

    _, _, h, w = cache.feature_shape
    covers = []
    for row in rows:
        boxes = boxes_at(truth[cache.videos[row]], cache.frame_index[row])
        covers.append(box_cover(boxes, float(cache.height[row]), float(cache.width[row]), (h, w)))
    return np.stack(covers).astype(np.float32)


class ClipsWithBoxes:
    """A ClipSet whose batches carry the box cover as one extra input channel, for `BoxAttentionHead`."""

    def __init__(self, clips, cover: np.ndarray):
        import torch

        self.clips, self.cache, self.labels = clips, clips.cache, clips.labels
        self.cover = torch.from_numpy(cover)[:, :, None].half()  # (N, T, 1, h, w), like the cached features

    def __len__(self) -> int:
        return len(self.clips)

    def batches(self, batch_size: int, order=None):
        import torch

        from pipeline.head.batches import Batch

        for b in self.clips.batches(batch_size, order):
            yield Batch(b.rows, torch.cat([b.features, self.cover[b.rows]], dim=2), b.labels)


def box_attention_head(head_cfg, in_channels: int, num_classes: int, beta: float):
    """The default head with Z_t = beta * box cover; its input is the features plus the cover channel."""
    from torch import nn

    from pipeline.head.model import build_head

    class BoxAttention(nn.Module):
        """Fixed scores, one map per frame, handed over by the head before its recurrence starts."""

        def __init__(self):
            super().__init__()
            self.maps, self.step = None, 0

        def input_term(self, p):
            self.step = 0  # called once per forward, before the first step
            return p

        def forward(self, p_term, h_prev):
            z = beta * self.maps[:, self.step].flatten(1)  # attend() takes the softmax in float32
            self.step += 1
            return z

    class BoxAttentionHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = build_head(head_cfg, in_channels, num_classes)
            self.head.attention = BoxAttention()

        def forward(self, x):
            self.head.attention.maps = x[:, :, -1]
            return self.head(x[:, :, :-1])

    return BoxAttentionHead()


def fit_best(model, train_set, val_set, cfg, device) -> tuple[object, int, float]:
    """Train like `train` does (pipeline.head.fit.fit: early stopping on val loss); the best epoch's model."""
    from pipeline.head.fit import fit

    best = {}
    state = fit(model, train_set, val_set, cfg, device,
                on_best=lambda epoch: best.update(weights=copy.deepcopy(model.state_dict())))
    model.load_state_dict(best.get("weights"))
    return model, state.best_epoch, state.best_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", nargs="?", default="cache/features.h5")
    parser.add_argument("splits", nargs="?", default="splits")
    parser.add_argument("--boxes", default=None, help="boxes.json (default: the one beside the cached dataset)")
    parser.add_argument("--params", default="params.yaml", help="head and train settings (the graph's)")
    parser.add_argument("--betas", default="0,3,-3", help="fixed-map strengths to compare")
    parser.add_argument("--no-learned", action="store_true", help="skip the learned-attention run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from pipeline.config import load_section
    from pipeline.errors import first_line
    from pipeline.features.cache import CacheError
    from pipeline.features.reader import open_cache
    from pipeline.head.batches import open_split
    from pipeline.head.infer import accuracies, infer, loss_of
    from pipeline.head.model import build_head
    from pipeline.head.runtime import pick_device, seed_everything
    from pipeline.report.metrics import attention_report
    from pipeline.video.splits import SplitError
    from pipeline.video.synthetic import BOXES_FILE, read_boxes_file

    try:  # bad input: one line, before any training
        head_cfg = load_section("head", args.params)
        cfg = load_section("train", args.params, device=args.device)
        runs = [("fixed", float(b)) for b in args.betas.split(",") if b.strip()]
        runs += [] if args.no_learned else [("learned", None)]
        if not runs:
            raise ValueError("nothing to compare: give --betas, or leave out --no-learned")
        cache = open_cache(args.cache)
        boxes_path = Path(args.boxes or Path(cache.attrs.get("dataset_root", ".")) / BOXES_FILE)
        if not boxes_path.is_file():
            raise ValueError(f"{boxes_path}: no boxes file; the probe needs ground-truth boxes (--boxes)")
        truth = read_boxes_file(boxes_path)
        sets = {name: open_split(cache, args.splits, name) for name in ("train", "val", "test")}
        head_cfg = head_cfg.for_train_split(sets["train"].clips_a_class)  # as train resolves auto
        missing = [cache.videos[i] for s in sets.values() for i in s.index if cache.videos[i] not in truth]
        if missing:
            raise ValueError(f"{boxes_path}: no boxes for {len(missing)} clips of the splits, e.g. '{missing[0]}'")
    except (CacheError, SplitError, ValueError) as exc:  # ConfigError is a ValueError
        parser.error(first_line(exc))
    device = pick_device(args.device)
    results = []
    with cache:
        covers = {name: box_covers(cache, s.index, truth) for name, s in sets.items()}
        shape, classes = cache.feature_shape, list(cache.classes)
        for kind, beta in runs:
            start = time.perf_counter()
            seed_everything(cfg.seed)
            if kind == "learned":
                model, data = build_head(head_cfg, shape[1], len(classes)), sets
            else:
                model = box_attention_head(head_cfg, shape[1], len(classes), beta)
                data = {name: ClipsWithBoxes(s, covers[name]) for name, s in sets.items()}
            model, best_epoch, val_loss = fit_best(model.to(device), data["train"], data["val"], cfg, device)
            test = infer(model, data["test"], cfg.batch_size, device)
            rows = sets["test"].index
            att = attention_report(test.attention, [cache.videos[i] for i in rows], truth,
                                   cache.frame_index[rows], cache.height[rows], cache.width[rows])
            results.append({"attention": "learned" if kind == "learned" else f"fixed, beta {beta:g}",
                            "best_epoch": best_epoch, "val_loss": round(val_loss, 4),
                            "test_loss": round(loss_of(test, cfg.attention_reg), 4),
                            "test_video_accuracy": accuracies(test)[0], "mass_ratio": att["mass_ratio"],
                            "pointing": att["pointing"], "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(results[-1]), flush=True)
    print("\n| attention | best epoch | val loss | test loss | test video acc | mass in box / uniform | pointing |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['attention']} | {r['best_epoch']} | {r['val_loss']:.3f} | {r['test_loss']:.3f} | "
              f"{r['test_video_accuracy']:.1%} | {r['mass_ratio']:.2f}x | {r['pointing']:.1%} |")
    print(f"\n{platform.node()}, {line()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": args.params, "results": results}, indent=2))


if __name__ == "__main__":
    main()
