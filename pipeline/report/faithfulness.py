"""Does the prediction depend on where the map looks? The deletion test, on any dataset (no boxes needed).

For each frame, zero the k cells of the cached features X that the unmodified run attended most (all
channels of those cells; the head then computes its own attention on what is left) and measure what is
left of the video accuracy and of the true class's mean probability; beside it, the same for k cells drawn
at random per frame, over many draws (mean and spread). A map that explains the model makes the first
drop larger than the second. It reruns only the head: seconds.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

K = (1, 3, 5)  # cells deleted per frame (DESIGN.md)


def applicable(ks: tuple[int, ...], cells: int) -> tuple[int, ...]:
    """The k that leave something: deleting every cell of a frame would test nothing."""
    return tuple(k for k in ks if k < cells)


def top_cells(attention: np.ndarray, k: int) -> np.ndarray:
    """Keep-mask (N, T, h, w) float32: 0 at the k most attended cells of every frame, 1 elsewhere."""
    n, t, h, w = attention.shape
    flat = attention.reshape(n, t, h * w)
    order = np.argsort(-flat, axis=2, kind="stable")[:, :, :k]  # ties: the first cells
    keep = np.ones((n, t, h * w), np.float32)
    np.put_along_axis(keep, order, 0.0, axis=2)
    return keep.reshape(n, t, h, w)


def random_cells(shape: tuple[int, int, int, int], k: int, rng: np.random.Generator) -> np.ndarray:
    """Keep-mask (N, T, h, w): 0 at k cells drawn without replacement for every frame."""
    n, t, h, w = shape
    order = np.argsort(rng.random((n, t, h * w)), axis=2)[:, :, :k]
    keep = np.ones((n, t, h * w), np.float32)
    np.put_along_axis(keep, order, 0.0, axis=2)
    return keep.reshape(n, t, h, w)


def _figures(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(video accuracy, mean probability of the true class) of (N, K) video probabilities."""
    return (float((probabilities.argmax(1) == labels).mean()),
            float(probabilities[np.arange(len(labels)), labels].mean()))


def deletion_test(run: Callable[[np.ndarray | None], np.ndarray], attention: np.ndarray, labels: np.ndarray,
                  draws: int = 20, seed: int = 0, ks: tuple[int, ...] = K,
                  on_pass: Callable[[], None] | None = None) -> dict:
    """`run(keep)` -> (N, K) video probabilities with the features multiplied by `keep` (None: unmodified).

    `attention` (N, T, h, w) are the maps of the unmodified run: the top cells come from them. `draws` >= 1
    random deletions per k (evaluate skips the whole test when its setting is 0).
    """
    if draws < 1:
        raise ValueError(f"the deletion test needs at least one random draw, got {draws}")
    n, t, h, w = attention.shape
    base_acc, base_prob = _figures(run(None), labels)
    report: dict = {"unmodified": {"video_accuracy": _r(base_acc), "true_probability": _r(base_prob)},
                    "random_draws": draws, "k": {}}
    rng = np.random.default_rng(seed)
    for k in applicable(ks, h * w):
        top_acc, top_prob = _figures(run(top_cells(attention, k)), labels)
        if on_pass:
            on_pass()
        random = np.array([_figures(run(random_cells((n, t, h, w), k, rng)), labels) for _ in range(draws)])
        if on_pass:
            on_pass()
        report["k"][str(k)] = {
            "top": {"video_accuracy": _r(top_acc), "true_probability": _r(top_prob)},
            "random": {"video_accuracy": _r(random[:, 0].mean()), "video_accuracy_std": _r(random[:, 0].std()),
                       "true_probability": _r(random[:, 1].mean()),
                       "true_probability_std": _r(random[:, 1].std())},
            # > 0: deleting what the map points at costs the true class more than deleting cells at random
            "probability_drop_vs_random": _r(random[:, 1].mean() - top_prob),
        }
    return report


def _r(value: float) -> float:
    return round(float(value), 6)
