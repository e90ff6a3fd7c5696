import numpy as np
import pytest

from amess.metrics import classification_metrics, mean_std


def test_classification_metrics_hand_computed():
    # 3 classes. gold: 0 0 1 1 2 2 ; pred: 0 1 1 1 2 0
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, p, 3)
    assert m["acc"] == pytest.approx(4 / 6)
    # class 0: P = 1/2, R = 1/2, F1 = 1/2 ; class 1: P = 2/3, R = 1, F1 = 0.8 ; class 2: P = 1, R = 1/2, F1 = 2/3
    assert m["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # weighted by support (2, 2, 2) equals macro here; check with unequal support below
    y2 = np.array([0, 0, 0, 1])
    p2 = np.array([0, 0, 1, 1])
    m2 = classification_metrics(y2, p2, 2)
    # class 0: P 1, R 2/3, F1 0.8 ; class 1: P 1/2, R 1, F1 2/3 ; weights 3/4, 1/4
    assert m2["f1_weighted"] == pytest.approx(0.75 * 0.8 + 0.25 * 2 / 3)
    assert m2["precision_weighted"] == pytest.approx(0.75 * 1 + 0.25 * 0.5)
    assert m2["recall_weighted"] == pytest.approx(0.75 * 2 / 3 + 0.25 * 1)


def test_metrics_ignore_classes_absent_from_gold_and_reject_bad_shapes():
    m = classification_metrics(np.array([0, 0]), np.array([0, 0]), 5)
    assert m["f1_macro"] == 1.0  # classes 1-4 have no support and are not averaged as zero
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 1]), np.array([0]), 2)
    with pytest.raises(ValueError):
        classification_metrics(np.array([]), np.array([]), 2)


def test_mean_std():
    r = mean_std([0.5, 0.7])
    assert r["mean"] == pytest.approx(0.6)
    assert r["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert mean_std([0.3])["std"] == 0.0
