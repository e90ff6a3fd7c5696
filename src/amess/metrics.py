"""Metrics as pure functions over label arrays. Fractions in [0, 1]; tables print percent.

In-scope metrics are computed over the in-scope classes `0..C-1` (labels outside that
range are ignored in the per-class averages, as the official frameworks do).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

CLASSIFICATION_KEYS = ("acc", "f1_macro", "precision_macro", "recall_macro",
                       "f1_weighted", "precision_weighted", "recall_weighted")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy, and macro / weighted F1, precision and recall over classes 0..num_labels-1.

    Macro averages run over the in-scope classes that occur in `y_true`, so a class
    absent from a small split does not count as an F1 of 0.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if y_true.size == 0:
        raise ValueError("no samples to score")
    labels = np.array(sorted(set(int(c) for c in y_true if 0 <= c < num_labels)))
    out = {"acc": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out[f"precision_{avg}"] = float(p)
        out[f"recall_{avg}"] = float(r)
        out[f"f1_{avg}"] = float(f)
    return out


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}
