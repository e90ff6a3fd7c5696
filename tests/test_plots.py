"""Plot functions: each returns a Figure that saves to a non-empty PNG and shows what it claims."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from amess import plots


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _save(fig, path):
    fig.savefig(path, dpi=60)
    assert path.is_file() and path.stat().st_size > 0


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_embedding_projection_colours_labels_and_marks_out_of_scope(tmp_path, method):
    rng = np.random.default_rng(0)
    names = ["greet", "thank", "complain", "ask for help"]
    labels = rng.integers(0, len(names) + 1, size=40)  # id 4 == C: out-of-scope
    labels[:5] = [0, 1, 2, 3, 4]
    z = rng.normal(size=(40, 8))
    desc = rng.normal(size=(len(names), 8))
    fig = plots.embedding_projection(z, labels, desc, names, method=method, seed=0)
    _save(fig, tmp_path / f"proj_{method}.png")
    legend = _legend_texts(fig)
    assert set(names) <= set(legend) and "out-of-scope" in legend and "label description" in legend
    ax = fig.axes[0]
    annotated = {t.get_text() for t in ax.texts}
    assert set(names) <= annotated  # every star carries its label name
    assert ax.get_xlabel().startswith("t-SNE" if method == "tsne" else "PCA")


def test_embedding_projection_tiny_input_falls_back_to_pca_and_desc_is_optional(tmp_path):
    z = np.random.default_rng(1).normal(size=(4, 3))
    fig = plots.embedding_projection(z, np.array([0, 1, 0, 1]), None, ["a", "b"], method="tsne")
    _save(fig, tmp_path / "tiny.png")
    assert fig.axes[0].get_xlabel().startswith("PCA")
    assert "out-of-scope" not in _legend_texts(fig)
    with pytest.raises(ValueError, match="desc must be"):
        plots.embedding_projection(z, np.zeros(4), np.zeros((3, 3)), ["a", "b"])


def test_anchor_tokens_highlights_exactly_the_anchor_positions(tmp_path):
    tokens = [["[CLS]", "i", "am", "so", "sorry", "about", "that", "[SEP]"],
              ["[CLS]", "thanks", "a", "lot", "[SEP]"],
              ["[CLS]"] + [f"word{i}" for i in range(40)] + ["[SEP]"]]
    anchors = [[4, 1, -1, 4],  # duplicate and padding entries count once / not at all
               [2, 7, 9],  # 7 and 9 lie beyond the tokens: two inserted [anchor] markers
               [1, 20, 40]]
    fig = plots.anchor_tokens(tokens, anchors, ["sample a", "sample b", "long sample"])
    _save(fig, tmp_path / "anchors.png")
    texts = fig.axes[0].texts
    hit = [t.get_text() for t in texts if t.get_gid() == "anchor"]
    extra = [t.get_text() for t in texts if t.get_gid() == "anchor-extra"]
    assert sorted(hit) == sorted(["i", "sorry", "a", "word0", "word19", "word39"])
    assert extra == ["[anchor]", "[anchor]"]
    assert all(t.get_bbox_patch() is not None for t in texts if t.get_gid())
    assert all(t.get_bbox_patch() is None for t in texts if not t.get_gid())
    assert {"sample a", "sample b", "long sample"} <= {t.get_text() for t in texts}
    # the 42-token sample wraps: its tokens use more than one distinct line
    ys = {t.get_position()[1] for t in texts if t.get_text().startswith("word")}
    assert len(ys) > 1


def test_score_distributions_draws_both_groups_and_the_threshold(tmp_path):
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.normal(2, 1, 80), rng.normal(-1, 1, 30), [np.nan]])
    is_in = np.array([True] * 80 + [False] * 31)
    fig = plots.score_distributions(scores, is_in, "energy", threshold=0.5)
    _save(fig, tmp_path / "scores.png")
    legend = _legend_texts(fig)
    assert "in-scope (n=80)" in legend and "out-of-scope (n=30)" in legend and "threshold = 0.5" in legend
    ax = fig.axes[0]
    assert any(np.allclose(line.get_xdata(), 0.5) for line in ax.get_lines())
    assert "1 non-finite dropped" in ax.get_title()
