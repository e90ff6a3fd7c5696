"""OOS detectors, threshold tuning and OOS metrics (pure numpy, no model)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from amess.metrics import detection_metrics, oos_metrics
from amess.ood import (
    DETECTORS,
    Detector,
    DOCDetector,
    MahalanobisDetector,
    OutputBundle,
    build_detector,
    evaluate_detector,
    predict_with_oos,
    register_detector,
    sigmoid,
    threshold_at_tpr,
    tune_threshold,
)

C = 4
H = 8


def make_bundle(rng: np.random.Generator, n_in: int, n_oos: int, with_sims: bool = True) -> OutputBundle:
    """Synthetic outputs: in-scope rows near their class mean with a peaked logit and a
    high similarity to the gold description; OOS rows far from every mean, flat logits,
    flat low similarities."""
    means = 4.0 * np.eye(C, H)
    y_in = rng.integers(0, C, n_in)
    f_in = means[y_in] + rng.normal(0, 1.0, (n_in, H))
    f_oos = -4.0 * np.ones((n_oos, H)) / np.sqrt(H) + rng.normal(0, 1.0, (n_oos, H)) + 3.0 * rng.normal(0, 1, (n_oos, 1))
    lg_in = rng.normal(0, 0.5, (n_in, C))
    lg_in[np.arange(n_in), y_in] += 5.0
    lg_oos = rng.normal(0, 0.5, (n_oos, C))
    s_in = rng.normal(0.1, 0.05, (n_in, C))
    s_in[np.arange(n_in), y_in] += 0.7
    s_oos = rng.normal(0.2, 0.05, (n_oos, C))
    return OutputBundle(
        logits=np.vstack([lg_in, lg_oos]),
        features=np.vstack([f_in, f_oos]),
        labels=np.concatenate([y_in, np.full(n_oos, C)]),
        desc_sims=np.vstack([s_in, s_oos]) if with_sims else None,
    )


@pytest.fixture(scope="module")
def splits() -> tuple[OutputBundle, OutputBundle, OutputBundle]:
    rng = np.random.default_rng(0)
    # train holds OOS rows too: fit() must ignore them
    return make_bundle(rng, 400, 50), make_bundle(rng, 200, 100), make_bundle(rng, 200, 100)


# ------------------------------------------------------------------------- metrics


def test_oos_metrics_hand_computed() -> None:
    # C = 2, OOS id 2
    y_true = np.array([0, 0, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0])
    m = oos_metrics(y_true, y_pred, 2)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp1 fp1 fn0 -> 2/3; class 2: tp1 fp0 fn1 -> 2/3
    assert m["oos_acc"] == pytest.approx(3 / 5)
    assert m["f1_is"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["f1_oos"] == pytest.approx(2 / 3)
    assert m["f1_overall"] == pytest.approx(11 / 18)


def test_oos_metrics_perfect_and_absent_class() -> None:
    y = np.array([0, 1, 2, 2])
    assert oos_metrics(y, y, 2) == {"oos_acc": 1.0, "f1_is": 1.0, "f1_oos": 1.0, "f1_overall": 1.0}
    # class 1 never occurs nor is predicted: counts as F1 0 (fixed label set, zero_division=0)
    m = oos_metrics(np.array([0, 2]), np.array([0, 2]), 2)
    assert m["f1_is"] == pytest.approx(0.5)
    assert m["f1_overall"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        oos_metrics(np.array([0, 3]), np.array([0, 2]), 2)


def test_detection_metrics_perfect_separation() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    is_in = np.array([True, True, True, False, False])
    m = detection_metrics(scores, is_in)
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    flipped = detection_metrics(-scores, is_in)
    assert flipped["auroc"] == 0.0 and flipped["fpr95"] == 1.0


def test_detection_metrics_four_samples_by_hand() -> None:
    # ranking: 0.9 in, 0.6 out, 0.4 in, 0.1 out
    scores = np.array([0.9, 0.4, 0.6, 0.1])
    is_in = np.array([True, True, False, False])
    m = detection_metrics(scores, is_in)
    assert m["auroc"] == pytest.approx(3 / 4)  # pairs (in > out): 3 of 4
    assert m["aupr_in"] == pytest.approx((1 + 2 / 3) / 2)  # precision 1 at rank 1, 2/3 at rank 3
    assert m["aupr_out"] == pytest.approx((1 + 2 / 3) / 2)  # negated: 0.1 out, 0.4 in, 0.6 out
    assert m["fpr95"] == pytest.approx(0.5)  # accept both in-scope -> cut 0.4 also accepts 0.6


def test_detection_metrics_need_both_classes() -> None:
    with pytest.raises(ValueError, match="both in-scope and out-of-scope"):
        detection_metrics(np.array([0.1, 0.2]), np.array([True, True]))
    with pytest.raises(ValueError, match="both in-scope and out-of-scope"):
        detection_metrics(np.array([0.1, 0.2]), np.array([False, False]))


# ------------------------------------------------------------------------ bundle


def test_bundle_validation_and_mask() -> None:
    b = OutputBundle(np.zeros((3, 2)), np.zeros((3, 5)), np.array([0, 2, 1]))
    assert b.in_scope_mask().tolist() == [True, False, True]
    assert b.num_labels == 2 and len(b) == 3
    assert len(b.subset(b.in_scope_mask())) == 2
    with pytest.raises(ValueError):
        OutputBundle(np.zeros((3, 2)), np.zeros((3, 5)), np.array([0, 3, 1]))
    with pytest.raises(ValueError):
        OutputBundle(np.zeros((3, 2)), np.zeros((2, 5)), np.array([0, 1, 1]))
    with pytest.raises(ValueError):
        OutputBundle(np.zeros((3, 2)), None, np.array([0, 1, 1]), desc_sims=np.zeros((3, 3)))


# ---------------------------------------------------------------------- detectors


def test_registry() -> None:
    assert {"msp", "maxlogit", "energy", "mahalanobis", "desc_sim", "doc"} <= set(DETECTORS)
    det = build_detector("energy", temperature=2.0)
    assert det.name == "energy" and det.temperature == 2.0
    assert build_detector("doc").natural_threshold == 0.0
    assert build_detector("msp").natural_threshold is None
    with pytest.raises(KeyError, match="unknown OOS detector"):
        build_detector("nope")

    @register_detector("_test_const")
    class Const(Detector):
        def _score(self, b: OutputBundle) -> np.ndarray:
            return np.zeros(len(b))

    try:
        assert isinstance(build_detector("_test_const"), Const)
    finally:
        DETECTORS.pop("_test_const")


@pytest.mark.parametrize("name", ["msp", "maxlogit", "energy", "mahalanobis", "desc_sim", "doc"])
def test_detector_separates_synthetic_oos(name: str, splits) -> None:
    train, _, test = splits
    det = build_detector(name).fit(train)
    s = det.score(test)
    assert s.shape == (len(test),) and np.all(np.isfinite(s))
    is_in = test.in_scope_mask()
    assert roc_auc_score(is_in, s) > 0.9
    # a detector with its sign flipped would fail
    assert roc_auc_score(is_in, -s) < 0.1


def test_mahalanobis_sign_and_singular_covariance() -> None:
    # 3 training rows in 10 dimensions, one dimension constant: covariance is singular
    feats = np.zeros((3, 10))
    feats[:, :3] = np.eye(3) * 5.0
    feats[0, 3] = 0.1
    train = OutputBundle(np.zeros((3, 3)), feats, np.array([0, 1, 2]))
    for normalize in (False, True):
        det = MahalanobisDetector(normalize=normalize).fit(train)
        probe = np.vstack([feats[1], feats[1] + 0.3, -20.0 * np.ones(10)])
        s = det.score(OutputBundle(np.zeros((3, 3)), probe, np.array([1, 1, 3])))
        assert np.all(np.isfinite(s))
        assert s[0] == pytest.approx(0.0, abs=1e-6)  # at a class mean: distance 0
        assert s[0] > s[1] > s[2]  # farther from every mean -> lower score


def test_fit_uses_only_in_scope_rows() -> None:
    rng = np.random.default_rng(1)
    b = make_bundle(rng, 100, 0)
    extra = make_bundle(rng, 0, 30)
    both = OutputBundle(np.vstack([b.logits, 100 * extra.logits]), np.vstack([b.features, 100 * extra.features]),
                        np.concatenate([b.labels, extra.labels]))
    for name in ("mahalanobis", "doc"):
        s1 = build_detector(name).fit(b).score(b)
        s2 = build_detector(name).fit(both).score(b)
        np.testing.assert_allclose(s1, s2)


def test_desc_sim_without_sims_raises(splits) -> None:
    train = splits[0]
    no_sims = OutputBundle(train.logits, train.features, train.labels)
    det = build_detector("desc_sim").fit(no_sims)
    with pytest.raises(ValueError, match="description similarities.*A-MESS"):
        det.score(no_sims)


def test_score_before_fit_raises(splits) -> None:
    with pytest.raises(RuntimeError):
        build_detector("msp").score(splits[0])


def test_doc_thresholds_by_hand() -> None:
    ln = np.log
    # sigmoid(ln 9) = 0.9, sigmoid(ln 3) = 0.75, sigmoid(0) = 0.5
    logits = np.full((7, 4), -5.0)
    labels = np.array([0, 0, 1, 1, 2, 2, 4])  # class 3 has no rows; last row OOS (ignored)
    logits[0, 0], logits[1, 0] = ln(9), ln(3)  # class 0: p = 0.9, 0.75
    logits[2, 1], logits[3, 1] = ln(9), ln(9)  # class 1: p = 0.9, 0.9
    logits[4, 2], logits[5, 2] = 0.0, ln(9)  # class 2: p = 0.5, 0.9
    logits[6, 0] = 10.0
    det = DOCDetector().fit(OutputBundle(logits, None, labels))
    # class 0: {0.9, 0.75, 1.1, 1.25}, mean 1, var (0.01 + 0.0625) / 2 = 0.03625
    std0 = np.sqrt(0.03625)
    # class 1: {0.9, 0.9, 1.1, 1.1} -> std 0.1 -> 0.8
    # class 2: {0.5, 0.9, 1.5, 1.1}, var (0.25 + 0.01) / 2 = 0.13 -> 1 - 2 * 0.36 < 0.5 -> 0.5
    np.testing.assert_allclose(det.stds_[:3], [std0, 0.1, np.sqrt(0.13)])
    np.testing.assert_allclose(det.thresholds_, [1 - 2 * std0, 0.8, 0.5, 0.5])
    # matches the official fit (scipy.stats.norm.fit on the mirrored set)
    assert det.stds_[0] == pytest.approx(norm.fit([0.9, 0.75, 1.1, 1.25])[1])

    probe = np.full((3, 4), -5.0)
    probe[0, 1] = ln(9)  # p 0.9 vs thr 0.8: kept
    probe[1, 1] = ln(3)  # p 0.75 vs thr 0.8: OOS
    probe[2, 2] = ln(3)  # p 0.75 vs thr 0.5: kept
    s = det.score(OutputBundle(probe, None, np.array([1, 4, 2])))
    np.testing.assert_allclose(s, [0.1, -0.05, 0.25])
    y = predict_with_oos(np.argmax(probe, 1), s, det.natural_threshold, 4)
    assert y.tolist() == [1, 4, 2]


# ---------------------------------------------------------------------- thresholds


def test_predict_with_oos() -> None:
    y = predict_with_oos(np.array([0, 1, 2, 1]), np.array([0.5, 0.2, 0.3, 0.9]), 0.3, 3)
    assert y.tolist() == [0, 3, 2, 1]


def test_tune_threshold_beats_bad_thresholds_and_is_pure(splits) -> None:
    _, dev, _ = splits
    scores = build_detector("msp").fit(splits[0]).score(dev)
    args = (scores.copy(), dev.preds(), dev.labels.copy(), C)
    thr, info = tune_threshold(*args)
    thr2, info2 = tune_threshold(*args)
    assert thr == thr2 and info == info2  # deterministic function of its inputs
    assert not info["fallback"] and info["n_candidates"] <= 400
    np.testing.assert_array_equal(args[0], scores)  # inputs untouched

    def f1(t: float) -> float:
        return oos_metrics(dev.labels, predict_with_oos(dev.preds(), scores, t, C), C)["f1_overall"]

    assert info["value"] == pytest.approx(f1(thr))  # fast counts agree with sklearn
    assert f1(thr) > f1(-np.inf) + 0.1  # accept everything
    assert f1(thr) > f1(np.inf) + 0.1  # reject everything
    assert f1(thr) >= max(f1(t) for t in np.quantile(scores, [0.1, 0.3, 0.5, 0.7, 0.9]))


def test_tune_threshold_fallback_without_oos() -> None:
    rng = np.random.default_rng(2)
    scores = rng.normal(size=200)
    labels = rng.integers(0, C, 200)
    thr, info = tune_threshold(scores, labels, labels, C)
    assert info["fallback"] and "no out-of-scope" in info["reason"]
    assert np.mean(scores >= thr) >= 0.95
    assert np.mean(scores >= thr) < 0.96
    assert thr == threshold_at_tpr(scores, np.ones(200, bool), 0.95)


def test_evaluate_detector_never_looks_at_test_for_threshold(splits) -> None:
    train, dev, test = splits
    rng = np.random.default_rng(3)
    other_test = make_bundle(rng, 50, 80)
    r1 = evaluate_detector(build_detector("energy"), train, dev, test)
    r2 = evaluate_detector(build_detector("energy"), train, dev, other_test)
    assert r1["threshold"] == r2["threshold"] and r1["tuned"] == 1.0
    for k in ("oos_acc", "f1_is", "f1_oos", "f1_overall", "auroc", "aupr_in", "aupr_out", "fpr95"):
        assert 0.0 <= r1[k] <= 1.0
    assert r1["f1_overall"] > 0.8 and r1["auroc"] > 0.9


def test_evaluate_detector_doc_natural_threshold(splits) -> None:
    train, dev, test = splits
    r = evaluate_detector(build_detector("doc"), train, dev, test)
    assert r["threshold"] == 0.0 and r["tuned"] == 0.0
    r_t = evaluate_detector(build_detector("doc"), train, dev, test, tune=True)
    assert r_t["tuned"] == 1.0
    with pytest.raises(ValueError, match="no natural threshold"):
        evaluate_detector(build_detector("msp"), train, dev, test, tune=False)


def test_sigmoid_stable() -> None:
    s = sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_allclose(s, [0.0, 0.5, 1.0])
