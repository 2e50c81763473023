"""The model online: the backbone once per sampled frame, the head over a sliding window of the last T of them.

The head is the soft-attention ConvLSTM of docs/DESIGN.md ("The head"), trained on clips of T frames whose
state starts from the clip's mean feature (H_0, C_0 = tanh(conv(mean_t P_t))) and whose motion map compares
each frame with the one before. So it is not run recurrently frame by frame forever (its state would drift
away from anything it was trained on) but, every S sampled frames, over the last T of them as if they were a
clip: the window is the reset. Each frame's features are computed once, rounded to float16 like the cache's,
and kept while they are in the window; a window costs one head pass (T ConvLSTM steps on h x w cells), small
beside the backbone's frame.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError


class WatchError(UserError):
    """watch cannot start as asked (the model, an option); the message says what to do."""


@dataclass
class Window:
    """What the head says about one window of sampled frames."""

    start: float  # time of its first frame, seconds from the source's start
    end: float  # time of its last frame
    probabilities: np.ndarray  # (K,) mean over its frames of the per-frame softmax (video_probabilities)
    attention: np.ndarray  # (T, h, w) float32, each map sums to 1, one per frame of the window
    times: list[float]  # (T,) the frames' times
    new: int  # how many of its last frames no earlier window scored
    classes: list[str]  # (K,) the model's, in the order of `probabilities`

    @property
    def time(self) -> float:
        """The window's time: its centre (a class present over a segment is scored there half in, half out)."""
        return (self.start + self.end) / 2

    def top(self, k: int) -> list[tuple[str, float]]:
        """Its k likeliest (class, probability), best first."""
        from pipeline.head.infer import top_classes

        return top_classes(self.probabilities, self.classes, k)


class OnlineModel:
    """A checkpoint's backbone and head, fed sampled frames one (or a few) at a time."""

    def __init__(self, backbone, head, classes: list[str], window: int, stride: int, device) -> None:
        self.backbone, self.head, self.classes = backbone, head, list(classes)
        self.window, self.stride, self.device = window, stride, device
        self._features: deque = deque(maxlen=window)  # (C, h, w) float16 tensors of the last frames
        self._times: deque = deque(maxlen=window)
        self._since = 0  # frames added since the last scored window

    def embed(self, images: list[np.ndarray]):
        """uint8 RGB frames, each (H, W, 3) -> float16 features (B, C, h, w), as the cache stores them.

        Frames of different sizes (a folder of files) go through the backbone one size at a time."""
        import torch

        out, start = [], 0
        while start < len(images):
            stop = start + 1
            while stop < len(images) and images[stop].shape == images[start].shape:
                stop += 1
            batch = torch.from_numpy(np.stack(images[start:stop]))  # (B, H, W, 3)
            out.append(self.backbone.embed(batch).to(torch.float16).cpu())  # (B, C, h, w)
            start = stop
        return out[0] if len(out) == 1 else torch.cat(out)

    def add(self, features, times: list[float]) -> list[Window]:
        """Append the features (B, C, h, w) of frames at `times`; the windows that became due, in order."""
        windows = []
        for feature, t in zip(features, times):
            self._features.append(feature)
            self._times.append(t)
            self._since += 1
            if len(self._features) == self.window and self._since >= self.stride:
                windows.append(self.score())
        return windows

    @property
    def held(self) -> int:
        """Frames in the window now (T once it has filled)."""
        return len(self._features)

    @property
    def pending(self) -> int:
        """Frames added since the last scored window (all of them before the first)."""
        return self._since

    def score(self) -> Window:
        """The head over the frames held now (T, or fewer before the window first fills)."""
        import torch

        from pipeline.head.infer import infer_clip

        features = torch.stack(list(self._features))  # (T, C, h, w) float16
        probabilities, attention = infer_clip(self.head, features, self.device)  # (K,), (T, h, w)
        times = list(self._times)
        new, self._since = min(self._since, len(times)), 0
        return Window(times[0], times[-1], probabilities, attention, times, new, self.classes)


def load_online(model_path, device: str, weights: str | None, window: int, stride: int):
    """(OnlineModel, checkpoint, sample interval in seconds, note or None) for a checkpoint written by train.

    The backbone is the checkpoint's own, rebuilt and checked (`rebuild_backbone`, as predict does)."""
    from pipeline.features.rebuild import rebuild_backbone
    from pipeline.head import checkpoint as ck
    from pipeline.head.runtime import pick_device

    ckpt = ck.load(model_path)
    dev = pick_device(device)
    backbone = rebuild_backbone(ckpt.extraction, str(dev), weights, ckpt.feature_shape, str(model_path))
    frames = int(ckpt.feature_shape[0])
    window = window or frames
    if window < 2 and ckpt.head.uses_motion:
        raise WatchError(f"watch.window = {window}: a motion-guided head needs at least 2 frames a window")
    interval, note = ck.sample_interval(ckpt)
    head = ckpt.build().to(dev)
    return OnlineModel(backbone, head, ckpt.classes, window, stride, dev), ckpt, interval, note
