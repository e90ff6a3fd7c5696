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


# --------------------------------------------------------------------------------------
# Out-of-scope (open intent) metrics, MIntRec2.0 / MIntOOD style.
# sklearn imports are local so the module header above stays untouched.
# --------------------------------------------------------------------------------------

OOS_KEYS = ("oos_acc", "f1_is", "f1_oos", "f1_overall")
DETECTION_KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95")


def oos_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> dict[str, float]:
    """Open intent metrics over C+1 classes, as the MIntRec2.0 framework reports them.

    Args:
        y_true: `(N,)` int gold labels, in-scope `0..C-1`, out-of-scope `== C`.
        y_pred: `(N,)` int predictions over the same `C+1` ids.
        num_labels: `C`, the number of in-scope classes (the OOS id is `C`).

    Returns:
        `oos_acc` (accuracy over all rows), `f1_is` (mean per-class F1 over classes
        `0..C-1`), `f1_oos` (F1 of class `C`) and `f1_overall` (mean per-class F1 over
        all `C+1` classes). Per-class F1 uses a fixed label set `range(C+1)` with
        `zero_division=0`, so a class neither present nor predicted scores 0.
    """
    from sklearn.metrics import f1_score

    y_true = np.asarray(y_true).astype(np.int64).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if y_true.size == 0:
        raise ValueError("no samples to score")
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    for name, arr in (("y_true", y_true), ("y_pred", y_pred)):
        if arr.min() < 0 or arr.max() > num_labels:
            raise ValueError(f"{name} holds ids outside 0..{num_labels} (OOS id is {num_labels})")
    per_class = f1_score(y_true, y_pred, labels=list(range(num_labels + 1)), average=None, zero_division=0)
    return {
        "oos_acc": float(np.mean(y_true == y_pred)),
        "f1_is": float(np.mean(per_class[:num_labels])),
        "f1_oos": float(per_class[num_labels]),
        "f1_overall": float(np.mean(per_class)),
    }


def detection_metrics(scores: np.ndarray, is_in: np.ndarray, tpr_level: float = 0.95) -> dict[str, float]:
    """Threshold-free OOS detection quality (MIntOOD): AUROC, AUPR-In, AUPR-Out, FPR@95%TPR.

    Args:
        scores: `(N,)` float, higher = more in-scope.
        is_in: `(N,)` bool, True for in-scope rows (the positive class of AUROC / AUPR-In).
        tpr_level: in-scope acceptance rate at which `fpr95` is read (default 0.95).

    Returns:
        `auroc`; `aupr_in` (average precision, in-scope positive); `aupr_out` (average
        precision, OOS positive, scores negated); `fpr95` (fraction of OOS rows accepted
        at the highest threshold that accepts at least `tpr_level` of in-scope rows).

    Raises:
        ValueError: shapes differ, scores are not finite, or either class is absent.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_in = np.asarray(is_in).astype(bool).ravel()
    if scores.shape != is_in.shape:
        raise ValueError(f"scores {scores.shape} and is_in {is_in.shape} differ in shape")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    n_in = int(is_in.sum())
    n_out = int(is_in.size - n_in)
    if n_in == 0 or n_out == 0:
        raise ValueError(
            f"detection metrics need both in-scope and out-of-scope rows (got {n_in} in-scope, {n_out} OOS)")
    fpr, tpr, _ = roc_curve(is_in.astype(int), scores, drop_intermediate=False)
    idx = int(np.searchsorted(tpr, tpr_level - 1e-12, side="left"))
    return {
        "auroc": float(roc_auc_score(is_in.astype(int), scores)),
        "aupr_in": float(average_precision_score(is_in.astype(int), scores)),
        "aupr_out": float(average_precision_score((~is_in).astype(int), -scores)),
        "fpr95": float(fpr[min(idx, fpr.size - 1)]),
    }
