"""The baseline a sceptic runs first: a linear probe on each clip's mean cached feature.

Logistic regression (scikit-learn's, not a solver of our own) on the clip's features averaged over t, h and w
(C numbers a clip), standardised with the train split's mean and spread, its L2 strength chosen on the val
split, fitted on the train split and scored on the split evaluate reports. It reads the same cache and the same
lists as the head, so a head below it has learnt less than one linear map of the features' mean says is there
(docs/DESIGN.md, "Small real datasets"): the clip's appearance decides its class, and the head has not found it.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from pipeline.head.batches import ClipSet

# inverse L2 strengths tried on val (scikit-learn's C): 1e-4 (a near-constant model) to 1e2 (almost none)
STRENGTHS = tuple(float(10.0 ** e) for e in range(-4, 3))
FALLBACK_C = 1.0  # no val clips to choose with: scikit-learn's own default


def mean_features(clips: ClipSet, batch_size: int = 32) -> np.ndarray:
    """(N, C) float64: each clip's features averaged over t, h and w, read a batch at a time (a split larger
    than memory streams)."""
    out = [batch.features.double().mean(dim=(1, 3, 4)).numpy() for batch in clips.batches(batch_size)]
    return np.concatenate(out) if out else np.zeros((0, clips.cache.feature_shape[1]))


def linear_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Fit on `train` (features (N, C), labels (N,)), choose C on `val`, score `test`; eval.json's
    `baselines.linear_probe`. Ties in val accuracy go to the lower val log-loss, then the stronger L2."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train, val, test
    if len(np.unique(y_train)) < 2:
        return {"video_accuracy": None, "note": "the train split holds fewer than two classes"}
    scaler = StandardScaler().fit(x_train)
    x_train, x_val, x_test = (scaler.transform(x) if len(x) else x for x in (x_train, x_val, x_test))
    classes = np.unique(y_train)

    def fit(c: float):
        with warnings.catch_warnings():  # a probe that stops at max_iter is still the probe; say nothing
            warnings.simplefilter("ignore", ConvergenceWarning)
            return LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)

    chosen, val_accuracy = FALLBACK_C, None
    if len(y_val):
        scored = []
        for c in STRENGTHS:
            model = fit(c)
            accuracy = float((model.predict(x_val) == y_val).mean())
            loss = log_loss(y_val, model.predict_proba(x_val), labels=classes)
            scored.append((-accuracy, loss, c))
        best = min(scored)
        chosen, val_accuracy = best[2], -best[0]
    model = fit(chosen)
    accuracy = float((model.predict(x_test) == y_test).mean()) if len(y_test) else math.nan
    return {"video_accuracy": None if math.isnan(accuracy) else round(accuracy, 6),
            "val_accuracy": None if val_accuracy is None else round(val_accuracy, 6),
            "C": chosen, "train_clips": int(len(y_train)), "features": int(x_train.shape[1]),
            "chosen_on": "val" if len(y_val) else "none (no val clips: C = 1)"}
