"""Plots as functions that return a matplotlib Figure (the caller saves it)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def training_curve(history: list[dict], monitor: str) -> Figure:
    """Train loss and dev `monitor` per epoch."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(ep, [100 * h["dev"][monitor] for h in history], "s-", color="tab:orange", label=f"dev {monitor}")
    ax2.set_ylabel(f"dev {monitor} (%)")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [l.get_label() for l in lines], loc="center right")
    fig.tight_layout()
    return fig


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str], title: str = "") -> Figure:
    """Row-normalised confusion matrix (rows: gold, columns: predicted)."""
    c = len(label_names)
    m = np.zeros((c, c), dtype=np.float64)
    for t, p in zip(y_true, y_pred):
        if 0 <= t < c and 0 <= p < c:
            m[t, p] += 1
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = max(4.0, 0.35 * c + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(c), label_names, rotation=90, fontsize=7)
    ax.set_yticks(range(c), label_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
