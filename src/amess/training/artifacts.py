"""What a run writes: files (always atomically, through `amess.fileio`), figures, tables
and summaries.

Every file goes to a temporary name in the same folder and is renamed into place, so a
killed run never leaves a truncated `summary.json`, checkpoint or table: a reader sees the
old file or the new one.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from amess.fileio import atomic_path, write_json, write_text  # noqa: F401  (re-exported: the one writer)
from amess.metrics import mean_std

FIGURE_FORMATS = (("pdf", None), ("png", 300))
"""Every figure is written as a vector PDF beside a 300-dpi PNG."""


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_figure(fig, folder: str | Path, stem: str) -> list[Path]:
    """Write `fig` as `stem.pdf` (vector) and `stem.png` (300 dpi); returns the paths."""
    import matplotlib.pyplot as plt

    out = []
    for ext, dpi in FIGURE_FORMATS:
        path = Path(folder) / f"{stem}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches="tight")
        out.append(path)
    plt.close(fig)
    return out


@dataclass
class Diagnostics:
    """What a method's diagnostics hook (`IntentModel.diagnostics`) is given: one split's
    outputs, its samples in the same order, and `save(fig, stem)` to write a figure."""

    folder: Path
    result: Any  # EvalResult
    samples: Sequence[Any]
    label_names: list[str]
    seed: int
    text_max_len: int

    def save(self, fig, stem: str) -> list[Path]:
        return save_figure(fig, self.folder, stem)


def write_predictions(path: Path, results: list, label_names: list[str]) -> None:
    """One row per sample and split: id, gold and predicted label names, per-class probabilities."""
    names = label_names + ["UNK"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["split", "id", "gold", "pred"] + [f"p_{n}" for n in label_names])
    for r in results:
        for i, sid in enumerate(r.ids):
            w.writerow([r.split, sid, names[min(int(r.labels[i]), len(label_names))],
                        names[int(r.preds[i])]] + [f"{p:.5f}" for p in r.scores[i]])
    write_text(path, buf.getvalue())


def summarise(per_seed: dict[int, dict]) -> dict:
    """`{split: {metric: {mean, std, n}}}` over seeds; nested groups (`ood.<detector>`) keep
    their nesting."""

    def merge(dicts: list[dict]) -> dict:
        keys = sorted({k for d in dicts for k in d})
        out = {}
        for k in keys:
            vals = [d[k] for d in dicts if k in d]
            out[k] = merge(vals) if isinstance(vals[0], dict) else mean_std([float(v) for v in vals])
        return out

    out = merge(list(per_seed.values()))
    out["seeds"] = sorted(per_seed)
    return out


CORE_KEYS = ("acc", "f1_macro", "precision_macro", "recall_macro", "f1_weighted")
OOD_KEYS = ("oos_acc", "f1_is", "f1_oos", "f1_overall", "auroc", "aupr_in", "aupr_out", "fpr95")


def _cell(m: dict, k: str) -> str:
    return f"{100 * m[k]['mean']:.2f} ± {100 * m[k]['std']:.2f}" if k in m else "–"


def format_table(rows: dict[str, dict], split: str, keys: tuple[str, ...] = CORE_KEYS) -> str:
    """A markdown table, percentages with two decimals: `rows` maps a row name to a summary."""
    lines = ["| run | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, summ in rows.items():
        m = summ.get(split, {})
        lines.append(f"| {name} | " + " | ".join(_cell(m, k) for k in keys) + " |")
    return "\n".join(lines)


def format_ood_table(summary: dict, split: str, keys: tuple[str, ...] = OOD_KEYS) -> str | None:
    """The out-of-scope table of one summary's split: one row per detector; None without one."""
    ood = summary.get(split, {}).get("ood")
    if not ood:
        return None
    lines = ["| detector | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for det, m in ood.items():
        lines.append(f"| {det} | " + " | ".join(_cell(m, k) for k in keys) + " |")
    return "\n".join(lines)


def write_seed_plots(seed_dir: Path, history: list[dict], monitor: str, report: Any, report_samples: Sequence[Any],
                     label_names: list[str], seed: int, ood_scores: dict, method_hook: Callable | None,
                     text_max_len: int) -> None:
    """Training curve, confusion matrix, out-of-scope score distributions, then the method's
    own plots (its diagnostics hook)."""
    from amess import plots

    save_figure(plots.training_curve(history, monitor), seed_dir, "training_curve")
    save_figure(plots.confusion_matrix(report.labels, report.preds, label_names,
                                       title=f"{report.split} (seed {seed})"), seed_dir, "confusion_matrix")
    for det, (scores, is_in, thr) in ood_scores.items():
        save_figure(plots.score_distributions(scores, is_in, title=f"{det} on {report.split} (seed {seed})",
                                              threshold=thr), seed_dir, f"ood_scores_{det}")
    if method_hook is not None:
        method_hook(Diagnostics(seed_dir, report, report_samples, label_names, seed, text_max_len))
