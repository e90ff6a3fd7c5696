"""Plots as functions that return a matplotlib Figure (the caller saves it)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def training_curve(history: list[dict], monitor: str) -> Figure:
    """Train loss and dev `monitor` per epoch (whole-number epoch ticks)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    """Confusion matrix (rows: gold, columns: predicted), colour = share of the gold row
    (row-normalised, %), with the raw count written in every non-empty cell and a colour bar."""
    c = len(label_names)
    counts = np.zeros((c, c), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        if 0 <= t < c and 0 <= p < c:
            counts[t, p] += 1
    m = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = max(4.5, 0.42 * c + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(100 * m, cmap="Blues", vmin=0, vmax=100)
    fs = 7 if c <= 20 else 5.5
    for i in range(c):
        for j in range(c):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=fs,
                        color="white" if m[i, j] > 0.6 else "black")
    ax.set_xticks(range(c), label_names, rotation=90, fontsize=fs + 1)
    ax.set_yticks(range(c), label_names, fontsize=fs + 1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("share of the gold class (%)")
    n = int(counts.sum())
    ax.set_title((title + "\n" if title else "") + f"colour: row-normalised; numbers: counts (n={n})", fontsize=9)
    fig.tight_layout()
    return fig


def method_bars(summaries: dict[str, dict], split: str, key: str) -> Figure:
    """One bar per method: the mean of `key` on `split` over seeds (%), error bars = std,
    the value written above each bar."""
    names = [n for n in summaries if key in summaries[n].get(split, {})]
    means = [100 * summaries[n][split][key]["mean"] for n in names]
    stds = [100 * summaries[n][split][key]["std"] for n in names]
    seeds = [len(summaries[n].get("seeds", [])) for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.8))
    colours = _label_colours(max(1, len(names)))
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colours[: len(names)], edgecolor="black",
           linewidth=0.6)
    for i, (mu, sd) in enumerate(zip(means, stds)):
        ax.text(i, mu + sd + 0.5, f"{mu:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel(f"{key} on {split} (%)")
    ax.set_ylim(0, min(100.0, max([m + s for m, s in zip(means, stds)] + [1.0]) * 1.15))
    ax.set_title(f"mean ± std over {max(seeds) if seeds else 0} seed(s)", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def _label_colours(c: int) -> list:
    """c distinct colours: tab10 / tab20 when they suffice, else evenly spaced on `turbo`."""
    if c <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(c)]
    if c <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(c)]
    return [plt.get_cmap("turbo")(x) for x in np.linspace(0.03, 0.97, c)]


def _pca2(x: np.ndarray) -> np.ndarray:
    """(n, p) -> (n, 2): the two leading principal components (zero-padded when p < 2)."""
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    y = x @ vt[:2].T
    return np.pad(y, ((0, 0), (0, 2 - y.shape[1]))) if y.shape[1] < 2 else y


def _declutter(fig: Figure, ax, texts: list, iters: int = 60) -> None:
    """Move overlapping text labels apart vertically (in display space, so the check is on
    the drawn boxes), each a little away from the one it collides with."""
    if len(texts) < 2:
        return
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    extent = lambda t: Text.get_window_extent(t, renderer).expanded(1.04, 1.2)  # noqa: E731 (the words, not the arrow)
    for _ in range(iters):
        moved = False
        boxes = [extent(t) for t in texts]
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if not boxes[i].overlaps(boxes[j]):
                    continue
                up = boxes[j].y0 >= boxes[i].y0
                dy = (boxes[i].y1 - boxes[j].y0 + 1) if up else (boxes[i].y0 - boxes[j].y1 - 1)
                x, y = ax.transData.transform(texts[j].xyann)
                texts[j].xyann = tuple(ax.transData.inverted().transform((x, y + dy)))
                boxes[j] = extent(texts[j])
                moved = True
        if not moved:
            return


def embedding_projection(z: np.ndarray, labels: np.ndarray, desc: np.ndarray | None, label_names: list[str],
                         method: str = "tsne", seed: int = 0, normalize: bool = True, title: str = "") -> Figure:
    """2-D map of utterance embeddings `z` (N, p) and label-description embeddings `desc`
    (C, p), projected together so that both share one map (SS 3: one space).

    Utterances are small dots coloured by gold label (`labels` (N,), ids < C; ids >= C are
    out-of-scope, grey); descriptions are large stars in their label's colour, with the
    label name beside them. `method`: `tsne` (sklearn, perplexity min(30, (N+C-1)//3)) or
    `pca`; t-SNE falls back to PCA below 10 points, where a perplexity is meaningless.
    Rows are L2-normalised first when `normalize` (SS compares cosines).
    """
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be `tsne` or `pca`, got {method!r}")
    z = np.asarray(z, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    c = len(label_names)
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"expected z (N, p) and labels (N,), got {z.shape} and {labels.shape}")
    d = np.zeros((0, z.shape[1])) if desc is None else np.asarray(desc, dtype=np.float64)
    if d.shape[0] and d.shape != (c, z.shape[1]):
        raise ValueError(f"desc must be (C={c}, p={z.shape[1]}), got {d.shape}")
    x = np.concatenate([z, d], 0)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n_all = x.shape[0]
    if method == "tsne" and n_all >= 10:
        from sklearn.manifold import TSNE

        y = TSNE(n_components=2, perplexity=float(min(30, (n_all - 1) // 3)), init="pca",
                 random_state=seed).fit_transform(x)
        used = "t-SNE"
    else:
        y = _pca2(x)
        used = "PCA"
    yz, yd = y[: len(z)], y[len(z):]
    colours = _label_colours(c)
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    oos = labels >= c
    if oos.any():
        ax.scatter(yz[oos, 0], yz[oos, 1], s=10, color="0.6", alpha=0.6, label="out-of-scope", zorder=1)
    for k in range(c):
        sel = labels == k
        if sel.any():
            ax.scatter(yz[sel, 0], yz[sel, 1], s=12, color=colours[k], alpha=0.75, label=label_names[k], zorder=2)
    if len(yd):
        import matplotlib.patheffects as pe

        ax.scatter(yd[:, 0], yd[:, 1], s=260, marker="*", c=colours, edgecolors="black", linewidths=0.8,
                   zorder=4)
        # a neutral proxy: the stars themselves carry every label's colour
        ax.scatter([], [], s=120, marker="*", color="white", edgecolors="black", label="label description")
        # names moved apart until no two overlap, each tied to its star by a thin line
        span = float(np.ptp(y, axis=0).max()) if len(y) > 1 else 1.0
        names = [ax.annotate(label_names[k], yd[k], xytext=yd[k] + 0.02 * span, textcoords="data", fontsize=8,
                             zorder=5, path_effects=[pe.withStroke(linewidth=2.5, foreground="white")],
                             arrowprops=dict(arrowstyle="-", color="0.4", linewidth=0.5, shrinkA=0, shrinkB=3))
                 for k in range(c)]
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{used} 1")
    ax.set_ylabel(f"{used} 2")
    ax.set_title(title or f"utterances and label descriptions ({used})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, ncol=1 if c <= 24 else 2,
              markerscale=1.0, frameon=False)
    fig.tight_layout()
    if len(yd):
        _declutter(fig, ax, names)
    return fig


def anchor_tokens(tokens: list[list[str]], anchors: list[list[int]], titles: list[str],
                  width: int = 88) -> Figure:
    """Which tokens became anchors (A-ME 3), one block per sample.

    `tokens[i]` are sample i's tokens in input order, `anchors[i]` positions into them
    (-1 entries ignored). Anchor tokens are drawn on an orange box; a position beyond the
    token list (an anchor inserted into the sequence, `learned` mode) adds one `[anchor]`
    box at the end of the row. Special tokens (`[CLS]`, `[SEP]`, ...) are grey. Text is
    monospace and wrapped at `width` characters. Highlighted texts carry the gid `anchor`
    (and `anchor-extra` for the inserted ones), so tests and callers can find them.
    """
    if not (len(tokens) == len(anchors) == len(titles)):
        raise ValueError(f"tokens, anchors and titles differ in length: {len(tokens)}, {len(anchors)}, {len(titles)}")
    fs = 10.0
    blocks = []  # per sample: list of lines, each a list of (x, text, kind)
    for toks, pos in zip(tokens, anchors):
        valid = {int(p) for p in pos if int(p) >= 0}
        items = [(t, "anchor" if j in valid else ("special" if t.startswith("[") and t.endswith("]") else "token"))
                 for j, t in enumerate(toks)]
        items += [("[anchor]", "anchor-extra") for p in sorted(valid) if p >= len(toks)]
        lines, line, x = [], [], 0.0
        for t, kind in items:
            w = len(t) + 1.5  # a character of gap plus the box padding
            if line and x + w > width:
                lines.append(line)
                line, x = [], 0.0
            line.append((x, t, kind))
            x += w
        lines.append(line)
        blocks.append(lines)
    n_lines = sum(len(b) + 1.6 for b in blocks)
    line_h = 2.0 * fs / 72  # inches per text line
    fig = plt.figure(figsize=(width * 0.6 * fs / 72 + 0.6, n_lines * line_h + 0.4))
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.96))
    ax.set_xlim(0, width)
    ax.set_ylim(n_lines, 0)
    ax.axis("off")
    styles = {"anchor": dict(bbox=dict(boxstyle="round,pad=0.2", facecolor="#ffb347", edgecolor="#c05600")),
              "anchor-extra": dict(color="#7a2e00", style="italic",
                                   bbox=dict(boxstyle="round,pad=0.2", facecolor="#ffe0b3", edgecolor="#c05600",
                                             linestyle="--")),
              "special": dict(color="0.55"), "token": dict(color="black")}
    y = 0.0
    for title, lines in zip(titles, blocks):
        ax.text(0, y + 0.5, title, fontsize=fs + 1, fontweight="bold", va="center", ha="left")
        y += 1.3
        for line in lines:
            for x, t, kind in line:
                txt = ax.text(x, y + 0.5, t, fontsize=fs, family="monospace", va="center", ha="left",
                              **styles[kind])
                if kind.startswith("anchor"):
                    txt.set_gid(kind)
            y += 1.0
        y += 0.3
    return fig


def score_distributions(scores: np.ndarray, is_in: np.ndarray, title: str, threshold: float | None = None,
                        bins: int = 40) -> Figure:
    """Overlaid density histograms of an OOD detector's scores (higher = in-scope) for
    in-scope and out-of-scope rows, with the decision threshold as a vertical line.
    Non-finite scores are dropped (their count goes into the legend)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_in = np.asarray(is_in, dtype=bool).ravel()
    if scores.shape != is_in.shape:
        raise ValueError(f"scores {scores.shape} and is_in {is_in.shape} differ in length")
    finite = np.isfinite(scores)
    dropped = int((~finite).sum())
    s, m = scores[finite], is_in[finite]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    edges = np.histogram_bin_edges(s, bins=bins) if s.size else np.linspace(0, 1, bins + 1)
    for sel, name, colour in ((m, "in-scope", "tab:blue"), (~m, "out-of-scope", "tab:red")):
        if sel.any():
            ax.hist(s[sel], bins=edges, density=True, alpha=0.5, color=colour, label=f"{name} (n={int(sel.sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold = {threshold:.3g}")
    ax.set_xlabel("score (higher = in-scope)")
    ax.set_ylabel("density")
    ax.set_title(title + (f" ({dropped} non-finite dropped)" if dropped else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
