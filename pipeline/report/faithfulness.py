"""Does the prediction depend on where the map looks? The deletion test, on any dataset (no boxes needed).

For each frame, zero the k cells of the cached features X that the unmodified run attended most (all
channels of those cells; the head then computes its own attention on what is left) and measure what is
left of the video accuracy and of the true class's mean probability; beside it, the same for k cells drawn
at random per frame, over `draws` draws (mean and spread). A map that explains the model makes the first
drop larger than the second. It reruns only the head.

The curve: k runs over `curve_ks(h * w)`, 1 to ceil(h*w / 2) (1, 2, 3, 5, 9, 15, 25 on a 7x7 grid; 1, 2, 3,
5, 9, 16, 30, 54, 98 on 14x14), always with K = 1, 3, 5, whose rows `"k"` keeps as before. Summaries:
* area between the curves: the random curve minus the top curve, averaged over the fraction of cells
  deleted, k/(h*w), from the grid's first k to its last by the trapezoid rule (the integral over the
  fraction divided by the fraction's range; the same as the trapezoid over k divided by k_max - k_min). It
  reads as the mean probability (or accuracy) the top cells cost beyond as many random ones; grids of other
  sizes compare, each taken to half its cells.
* drop ratio: (unmodified - top) / (unmodified - random) at each k, and over the curve the same ratio of
  the curves' trapezoid means; None where the random drop is not above twice its standard error (the
  draws' sd / sqrt(draws) at k; over the curve, its trapezoid mean): random deletion then costs nothing
  measurable and a ratio would only divide noise.

Cost: 1 + len(ks) * (1 + draws) passes of the head over the split (`passes()` counts all but the first):
the random baseline gets all `draws` draws at every k of the curve; the grid's size, not fewer draws, keeps
the curve affordable. On 7x7 with 20 draws that is 147 passes, 2.3x the 63 that k = 1, 3, 5 alone took
(the embedded set's 64 test clips x 8 frames: about 0.2 s of one core a pass).
Draw d is one random order of the cells of every frame, its first k cells deleted at each k (as the top
cells, the deleted sets grow with k), so each draw's random curve is one consistent sequence of deletions.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from pipeline.head.infer import is_correct

K = (1, 3, 5)  # cells deleted per frame in the table (docs/DESIGN.md, "What evaluate measures"); also on the curve
SMALL = (1, 2, 3, 5)  # the curve's first k, where the top curve falls fastest


def applicable(ks: tuple[int, ...], cells: int) -> tuple[int, ...]:
    """The k that leave something: deleting every cell of a frame would test nothing."""
    return tuple(k for k in ks if k < cells)


def curve_ks(cells: int) -> tuple[int, ...]:
    """The curve's k for a grid of `cells` cells: SMALL, then k evenly spaced in log k from 5 up to
    ceil(cells / 2), each at most twice the one before, and K; sorted, distinct, each fewer than `cells`."""
    half = math.ceil(cells / 2)
    steps = math.ceil(math.log2(half / SMALL[-1])) if half > SMALL[-1] else 0
    ladder = {int(round(SMALL[-1] * (half / SMALL[-1]) ** (i / steps))) for i in range(1, steps + 1)}
    return applicable(tuple(sorted({k for k in SMALL if k <= half} | ladder | set(K))), cells)


def passes(cells: int, draws: int) -> int:
    """Head passes the deletion test runs on a grid of `cells` cells (the unmodified run not included)."""
    return len(curve_ks(cells)) * (1 + draws)


def top_cells(attention: np.ndarray, k: int) -> np.ndarray:
    """Keep-mask (N, T, h, w) float32: 0 at the k most attended cells of every frame, 1 elsewhere."""
    return _delete_first(top_order(attention), k, attention.shape)


def top_order(attention: np.ndarray) -> np.ndarray:
    """(N, T, h*w): the cells of every frame, most attended first (ties: the first cells)."""
    return np.argsort(-_flat(attention), axis=2, kind="stable")


def random_cells(shape: tuple[int, int, int, int], k: int, rng: np.random.Generator) -> np.ndarray:
    """Keep-mask (N, T, h, w): 0 at k cells drawn without replacement for every frame."""
    return _delete_first(random_order(shape, rng), k, shape)


def random_order(shape: tuple[int, int, int, int], rng: np.random.Generator) -> np.ndarray:
    """(N, T, h*w): a random order of the cells of every frame."""
    n, t, h, w = shape
    return np.argsort(rng.random((n, t, h * w)), axis=2)


def _flat(attention: np.ndarray) -> np.ndarray:
    n, t, h, w = attention.shape
    return attention.reshape(n, t, h * w)


def _delete_first(order: np.ndarray, k: int, shape: tuple[int, ...]) -> np.ndarray:
    """Keep-mask of `shape`: 0 at the first k cells of `order` (N, T, h*w) in every frame."""
    keep = np.ones(order.shape, np.float32)
    np.put_along_axis(keep, order[:, :, :k], 0.0, axis=2)
    return keep.reshape(shape)


def _figures(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(video accuracy, mean probability of the true class) of (N, K) video probabilities."""
    return (float(is_correct(probabilities, labels).mean()),
            float(probabilities[np.arange(len(labels)), labels].mean()))


def curve_mean(ks: np.ndarray | list[int], values: np.ndarray | list[float]) -> float | None:
    """Trapezoid mean of `values` over k (equally over the fraction of cells deleted) from ks[0] to ks[-1];
    None with fewer than two k."""
    ks, values = np.asarray(ks, np.float64), np.asarray(values, np.float64)
    if len(ks) < 2:
        return None
    return float(((values[1:] + values[:-1]) / 2 * np.diff(ks)).sum() / (ks[-1] - ks[0]))


def drop_ratio(unmodified: float, top: float | None, random: float | None, error: float = 0.0) -> float | None:
    """(unmodified - top) / (unmodified - random): the top cells' cost in units of the random cells'; None
    where the random drop is not above 2 x `error` (its standard error) or there is no curve."""
    if top is None or random is None or unmodified - random <= max(2 * error, 1e-9):
        return None
    return (unmodified - top) / (unmodified - random)


def deletion_test(run: Callable[[np.ndarray | None], np.ndarray], attention: np.ndarray, labels: np.ndarray,
                  draws: int = 20, seed: int = 0, ks: tuple[int, ...] | None = None,
                  on_pass: Callable[[], None] | None = None) -> dict:
    """`run(keep)` -> (N, K) video probabilities with the features multiplied by `keep` (None: unmodified).

    `attention` (N, T, h, w) are the maps of the unmodified run: the top cells come from them. `draws` >= 1
    random deletions per k (evaluate skips the whole test when its setting is 0). `ks`: the curve's k
    (default `curve_ks(h * w)`); `"k"` holds the rows of those in K. `on_pass` is called after every pass
    of the head (`passes()` of them).
    """
    if draws < 1:
        raise ValueError(f"the deletion test needs at least one random draw, got {draws}")
    n, t, h, w = attention.shape
    ks = applicable(curve_ks(h * w) if ks is None else tuple(sorted(set(ks))), h * w)
    base_acc, base_prob = _figures(run(None), labels)

    def measure(keep: np.ndarray) -> tuple[float, float]:
        figures = _figures(run(keep), labels)
        if on_pass:
            on_pass()
        return figures

    order = top_order(attention)
    top = np.array([measure(_delete_first(order, k, attention.shape)) for k in ks]).reshape(len(ks), 2)
    rng = np.random.default_rng(seed)
    random = np.empty((draws, len(ks), 2))  # (draw, k, [accuracy, probability])
    for d in range(draws):
        order = random_order(attention.shape, rng)
        random[d] = [measure(_delete_first(order, k, attention.shape)) for k in ks]
    mean, std = random.mean(axis=0), random.std(axis=0)  # (k, 2)

    report: dict = {"unmodified": {"video_accuracy": _r(base_acc), "true_probability": _r(base_prob)},
                    "random_draws": draws, "k": {}}
    for i, k in enumerate(ks):
        if k in K:
            report["k"][str(k)] = {
                "top": {"video_accuracy": _r(top[i, 0]), "true_probability": _r(top[i, 1])},
                "random": {"video_accuracy": _r(mean[i, 0]), "video_accuracy_std": _r(std[i, 0]),
                           "true_probability": _r(mean[i, 1]), "true_probability_std": _r(std[i, 1])},
                # > 0: deleting what the map points at costs the true class more than deleting cells at random
                "probability_drop_vs_random": _r(mean[i, 1] - top[i, 1]),
            }
    error = std[:, 1] / math.sqrt(draws)  # standard error of the random curve's mean at each k
    ratios = [drop_ratio(base_prob, top[i, 1], mean[i, 1], error[i]) for i in range(len(ks))]
    report["curve"] = {"cells": h * w, "k": list(ks),
                       "top_probability": _rs(top[:, 1]), "random_probability": _rs(mean[:, 1]),
                       "random_probability_std": _rs(std[:, 1]),
                       "top_accuracy": _rs(top[:, 0]), "random_accuracy": _rs(mean[:, 0]),
                       "random_accuracy_std": _rs(std[:, 0]), "probability_drop_ratio": _rs(ratios)}
    report["area_between"] = {"probability": _r(curve_mean(ks, mean[:, 1] - top[:, 1])),
                              "accuracy": _r(curve_mean(ks, mean[:, 0] - top[:, 0]))}
    report["drop_ratio"] = {**{str(k): _r(ratios[i]) for i, k in enumerate(ks) if k in K},
                            "curve": _r(drop_ratio(base_prob, curve_mean(ks, top[:, 1]), curve_mean(ks, mean[:, 1]),
                                                   curve_mean(ks, error) or 0.0))}
    return report


def _r(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6) + 0.0  # + 0.0: no -0.0 in eval.json


def _rs(values) -> list[float | None]:
    return [_r(v) for v in values]
