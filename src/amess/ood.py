"""Out-of-scope (OOS) detectors over model outputs, as pure numpy code.

A model run over a split is summarised by an :class:`OutputBundle`
(`logits (N, C)`, `features (N, h)`, `labels (N,)` with OOS rows `== C`, optional
`desc_sims (N, C)`). A :class:`Detector` is fitted on the in-scope rows of the
training bundle and gives every row a score, higher = more in-scope. A threshold on
that score turns argmax predictions into `C+1`-way predictions (`C` = UNK).

Thresholds are chosen on dev outputs only (:func:`tune_threshold` is a pure function
of the arrays it is given); DOC brings its own per-class thresholds from the official
MIntRec2.0 framework, so its natural cut on the score is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from amess.metrics import detection_metrics, oos_metrics

__all__ = [
    "OutputBundle", "Detector", "DETECTORS", "register_detector", "build_detector",
    "MSPDetector", "MaxLogitDetector", "EnergyDetector", "MahalanobisDetector",
    "DescSimDetector", "DOCDetector",
    "softmax", "sigmoid", "tune_threshold", "threshold_at_tpr", "predict_with_oos",
    "evaluate_detector", "TUNE_METRICS",
]


# ----------------------------------------------------------------------------- data


@dataclass
class OutputBundle:
    """Numpy outputs of one model over one split.

    Attributes:
        logits: `(N, C)` float, in-scope logits (no UNK column).
        features: `(N, h)` float, pooled representation (may be None for logit-only
            detectors; Mahalanobis needs it).
        labels: `(N,)` int, in-scope rows `0..C-1`, out-of-scope rows `== C`.
        desc_sims: `(N, C)` float cosine similarities to the label descriptions, or None.
    """

    logits: np.ndarray
    features: np.ndarray | None
    labels: np.ndarray
    desc_sims: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.logits = np.asarray(self.logits, dtype=np.float64)
        if self.logits.ndim != 2 or self.logits.shape[1] < 1:
            raise ValueError(f"logits must be (N, C) with C >= 1, got shape {self.logits.shape}")
        n, c = self.logits.shape
        self.labels = np.asarray(self.labels)
        if self.labels.shape != (n,):
            raise ValueError(f"labels must be ({n},), got shape {self.labels.shape}")
        if self.labels.size and not np.issubdtype(self.labels.dtype, np.integer):
            if not np.all(self.labels == np.round(self.labels)):
                raise ValueError("labels must be integers")
        self.labels = self.labels.astype(np.int64)
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() > c):
            raise ValueError(f"labels must lie in 0..{c} (OOS id is {c}), got "
                             f"{self.labels.min()}..{self.labels.max()}")
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float64)
            if self.features.ndim != 2 or self.features.shape[0] != n:
                raise ValueError(f"features must be ({n}, h), got shape {self.features.shape}")
        if self.desc_sims is not None:
            self.desc_sims = np.asarray(self.desc_sims, dtype=np.float64)
            if self.desc_sims.shape != (n, c):
                raise ValueError(f"desc_sims must be ({n}, {c}), got shape {self.desc_sims.shape}")

    @property
    def num_labels(self) -> int:
        """`C`, the number of in-scope classes (the OOS id)."""
        return int(self.logits.shape[1])

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def in_scope_mask(self) -> np.ndarray:
        """`(N,)` bool, True where the gold label is an in-scope class (`< C`)."""
        return self.labels < self.num_labels

    def preds(self) -> np.ndarray:
        """`(N,)` int in-scope argmax predictions from the logits."""
        return np.argmax(self.logits, axis=1).astype(np.int64)

    def subset(self, mask: np.ndarray) -> "OutputBundle":
        """A new bundle with the rows selected by a `(N,)` bool mask or index array."""
        return OutputBundle(
            logits=self.logits[mask],
            features=None if self.features is None else self.features[mask],
            labels=self.labels[mask],
            desc_sims=None if self.desc_sims is None else self.desc_sims[mask],
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of `(N, C)` logits, numerically stable."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Element-wise logistic function, numerically stable for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _logsumexp(z: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp of `(N, C)` -> `(N,)`."""
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


# ------------------------------------------------------------------------ detectors

DETECTORS: dict[str, type] = {}


def register_detector(name: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`Detector` subclass under `name`."""

    def deco(cls: type) -> type:
        if name in DETECTORS and DETECTORS[name] is not cls:
            raise ValueError(f"detector {name!r} is already registered")
        cls.name = name
        DETECTORS[name] = cls
        return cls

    return deco


def build_detector(name: str, **kw: Any) -> "Detector":
    """Instantiate the detector registered as `name` with keyword options `kw`."""
    if name not in DETECTORS:
        raise KeyError(f"unknown OOS detector {name!r}; known: {sorted(DETECTORS)}")
    return DETECTORS[name](**kw)


class Detector:
    """Base OOS detector: `fit` on training outputs, `score` rows, higher = in-scope.

    `natural_threshold` is the cut a detector defines by itself (DOC: 0.0), or None
    when the threshold has to be tuned on dev outputs.
    """

    name: str = "base"
    natural_threshold: float | None = None

    def __init__(self) -> None:
        self.num_labels_: int | None = None

    def fit(self, train: OutputBundle) -> "Detector":
        """Fit on the in-scope rows of the training outputs; returns self."""
        mask = train.in_scope_mask()
        if not mask.any():
            raise ValueError(f"{self.name}: training outputs hold no in-scope rows to fit on")
        self.num_labels_ = train.num_labels
        self._fit(train.subset(mask))
        return self

    def _fit(self, train_in: OutputBundle) -> None:
        """Subclass hook: fit on in-scope training rows only (default: nothing to fit)."""

    def score(self, b: OutputBundle) -> np.ndarray:
        """`(N,)` float scores for the rows of `b`, higher = more in-scope."""
        if self.num_labels_ is None:
            raise RuntimeError(f"{self.name}: call fit(train) before score()")
        if b.num_labels != self.num_labels_:
            raise ValueError(f"{self.name}: fitted with C={self.num_labels_}, got outputs with C={b.num_labels}")
        return np.asarray(self._score(b), dtype=np.float64)

    def _score(self, b: OutputBundle) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def state(self) -> dict[str, Any]:
        """JSON-able state: the constructor options and the fitted values (attributes ending
        in `_`), so that a fitted detector is saved in a run's `model_spec.json` and never
        refitted from the training data (`from_state`)."""
        def plain(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return [plain(x) for x in v.tolist()] if v.ndim else plain(v.item())
            if isinstance(v, list):
                return [plain(x) for x in v]
            if isinstance(v, float) and not np.isfinite(v):
                return None
            return v

        items = vars(self).items()
        return {"name": self.name,
                "options": {k: v for k, v in items if not k.endswith("_") and not k.startswith("_")},
                "fitted": {k: plain(v) for k, v in items if k.endswith("_")}}

    @staticmethod
    def from_state(state: dict[str, Any]) -> "Detector":
        """The fitted detector saved by `state()`."""
        det = build_detector(state["name"], **state.get("options", {}))
        for k, v in state.get("fitted", {}).items():
            if isinstance(v, list):
                flat = np.asarray(v, dtype=object).ravel()
                v = np.asarray(v, dtype=np.float64 if any(x is None or isinstance(x, float) for x in flat) else None)
            setattr(det, k, v)
        return det


@register_detector("msp")
class MSPDetector(Detector):
    """Maximum softmax probability: `max_c softmax(logits)_c`, `(N,)`."""

    def _score(self, b: OutputBundle) -> np.ndarray:
        return softmax(b.logits).max(axis=1)


@register_detector("maxlogit")
class MaxLogitDetector(Detector):
    """Maximum logit: `max_c logits_c`, `(N,)`."""

    def _score(self, b: OutputBundle) -> np.ndarray:
        return b.logits.max(axis=1)


@register_detector("energy")
class EnergyDetector(Detector):
    """Negative free energy: `T * logsumexp(logits / T)`, `(N,)` (higher = in-scope)."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _score(self, b: OutputBundle) -> np.ndarray:
        t = self.temperature
        return t * _logsumexp(b.logits / t)


@register_detector("mahalanobis")
class MahalanobisDetector(Detector):
    """Class-conditional Gaussians with one shared covariance over the features.

    Fit on in-scope training rows: class means `mu_c (C', h)` over the classes seen in
    training, pooled within-class covariance `S (h, h)`, shrunk towards a scaled
    identity, `S' = (1 - shrinkage) S + shrinkage * tr(S)/h * I + ridge * I`, so a
    singular `S` (fewer rows than dimensions, constant features) still inverts.
    Score: `-min_c (x - mu_c)^T S'^-1 (x - mu_c)` (negated squared distance), `(N,)`.

    Args:
        normalize: L2-normalise features (train and scored) before anything else.
        shrinkage: weight in [0, 1] of the scaled identity.
        ridge: absolute diagonal term added after shrinkage.
    """

    def __init__(self, normalize: bool = False, shrinkage: float = 0.1, ridge: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.normalize = bool(normalize)
        self.shrinkage = float(shrinkage)
        self.ridge = float(ridge)
        self.classes_: np.ndarray | None = None
        self.means_: np.ndarray | None = None
        self.whiten_: np.ndarray | None = None

    def _prep(self, b: OutputBundle) -> np.ndarray:
        if b.features is None:
            raise ValueError("mahalanobis: outputs carry no features; the method must provide pooled features")
        x = b.features
        if self.normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def _fit(self, train_in: OutputBundle) -> None:
        x = self._prep(train_in)
        y = train_in.labels
        h = x.shape[1]
        classes = np.unique(y)
        means = np.stack([x[y == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        cov = centred.T @ centred / max(x.shape[0], 1)
        scale = float(np.trace(cov)) / h
        if not scale > 0:
            scale = 1.0  # all rows sit on their class mean: fall back to the identity
        cov = (1.0 - self.shrinkage) * cov + self.shrinkage * scale * np.eye(h)
        cov = cov + max(self.ridge, 1e-12 * scale) * np.eye(h)
        cov = 0.5 * (cov + cov.T)
        # Whitening W with W W^T = cov^-1, via eigh (robust for PSD matrices).
        w, v = np.linalg.eigh(cov)
        w = np.maximum(w, 1e-12 * max(float(w.max()), 1e-300))
        self.whiten_ = v / np.sqrt(w)
        self.classes_ = classes
        self.means_ = means

    @property
    def precision(self) -> np.ndarray:
        """`(h, h)` the inverse of the shrunk covariance, `W W^T`."""
        return self.whiten_ @ self.whiten_.T

    def _score(self, b: OutputBundle) -> np.ndarray:
        x = self._prep(b)
        if x.shape[1] != self.means_.shape[1]:
            raise ValueError(f"mahalanobis: fitted on {self.means_.shape[1]}-d features, got {x.shape[1]}-d")
        z = x @ self.whiten_  # (N, h)
        m = self.means_ @ self.whiten_  # (C', h)
        d2 = (z * z).sum(1)[:, None] - 2.0 * z @ m.T + (m * m).sum(1)[None, :]
        return -np.maximum(d2, 0.0).min(axis=1)


@register_detector("desc_sim")
class DescSimDetector(Detector):
    """Maximum cosine similarity to the label descriptions: `max_c desc_sims_c`, `(N,)`."""

    def _score(self, b: OutputBundle) -> np.ndarray:
        if b.desc_sims is None:
            raise ValueError(
                "desc_sim detector needs description similarities (OutputBundle.desc_sims is None); "
                "the method must provide similarities to the label descriptions, e.g. A-MESS")
        return b.desc_sims.max(axis=1)


@register_detector("doc")
class DOCDetector(Detector):
    """DOC per-class thresholds, as in the official MIntRec2.0 framework.

    Fit: for each in-scope class `c`, take `p = sigmoid(logits)[rows of class c, c]`,
    mirror it around 1 (`p` and `2 - p`), `std_c` = its standard deviation (ddof=0, the
    maximum-likelihood fit the official code gets from `scipy.stats.norm.fit`), and
    `threshold_c = max(0.5, 1 - scale * std_c)`. A class without training rows gets 0.5.
    A row is OOS when `sigmoid(max logit) < threshold[argmax]`.

    Score: `sigmoid(max logit) - threshold[argmax]`, `(N,)`; the natural cut is 0.0.
    (The official code keeps a row only when the probability is strictly above the
    threshold; with `predict_with_oos` a row exactly at 0 is kept, a measure-zero case.)
    """

    natural_threshold = 0.0

    def __init__(self, scale: float = 2.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.stds_: np.ndarray | None = None
        self.thresholds_: np.ndarray | None = None

    def _fit(self, train_in: OutputBundle) -> None:
        probs = sigmoid(train_in.logits)
        c_total = train_in.num_labels
        stds = np.full(c_total, np.nan)
        thresholds = np.full(c_total, 0.5)
        for c in range(c_total):
            p = probs[train_in.labels == c, c]
            if p.size == 0:
                continue
            stds[c] = float(np.std(np.concatenate([p, 2.0 - p])))
            thresholds[c] = max(0.5, 1.0 - self.scale * stds[c])
        self.stds_ = stds
        self.thresholds_ = thresholds

    def _score(self, b: OutputBundle) -> np.ndarray:
        arg = np.argmax(b.logits, axis=1)
        pmax = sigmoid(b.logits[np.arange(len(b)), arg])
        return pmax - self.thresholds_[arg]


# ---------------------------------------------------------------------- thresholds

TUNE_METRICS = ("f1_overall", "f1_is", "f1_oos", "oos_acc")


def predict_with_oos(preds: np.ndarray, scores: np.ndarray, threshold: float, num_labels: int) -> np.ndarray:
    """`(N,)` int: `preds` where `scores >= threshold`, else `num_labels` (the UNK id).

    Args:
        preds: `(N,)` int in-scope predictions (argmax over the C in-scope classes).
        scores: `(N,)` float detector scores, higher = in-scope.
        threshold: the cut.
        num_labels: `C`; rejected rows get id `C`.
    """
    preds = np.asarray(preds).astype(np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if preds.shape != scores.shape:
        raise ValueError(f"preds {preds.shape} and scores {scores.shape} differ in shape")
    return np.where(scores >= threshold, preds, np.int64(num_labels))


def _per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """`(k,)` per-class F1 over ids `0..k-1` from counts (zero_division=0, like sklearn)."""
    tp = np.bincount(y_true[y_true == y_pred], minlength=k)[:k]
    n_pred = np.bincount(y_pred, minlength=k)[:k]
    n_true = np.bincount(y_true, minlength=k)[:k]
    denom = n_pred + n_true
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)


def _fast_metric(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int, metric: str) -> float:
    if metric == "oos_acc":
        return float(np.mean(y_true == y_pred))
    f1 = _per_class_f1(y_true, y_pred, num_labels + 1)
    if metric == "f1_overall":
        return float(f1.mean())
    if metric == "f1_is":
        return float(f1[:num_labels].mean())
    return float(f1[num_labels])  # f1_oos


def threshold_at_tpr(scores: np.ndarray, is_in: np.ndarray, tpr: float = 0.95) -> float:
    """Largest threshold among the in-scope scores that keeps at least `tpr` of them.

    Args:
        scores: `(N,)` float, higher = in-scope.
        is_in: `(N,)` bool, True for in-scope rows (at least one).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_in = np.asarray(is_in).astype(bool).ravel()
    s_in = np.sort(scores[is_in])
    if s_in.size == 0:
        raise ValueError("threshold_at_tpr needs at least one in-scope row")
    n_reject = int(np.floor((1.0 - tpr) * s_in.size + 1e-9))  # at most this many may fall below
    return float(s_in[min(n_reject, s_in.size - 1)])


def tune_threshold(
    scores: np.ndarray,
    preds: np.ndarray,
    labels: np.ndarray,
    num_labels: int,
    *,
    metric: str = "f1_overall",
    max_candidates: int = 400,
    fallback_tpr: float = 0.95,
) -> tuple[float, dict[str, Any]]:
    """Choose the cut on dev scores that maximises a `C+1`-way metric (overall macro F1).

    A pure function of its arguments: pass dev outputs, never test. Candidates are up to
    `max_candidates` quantiles of `scores` plus one value above the maximum (reject
    all); among equal-best candidates the lowest threshold (accept most) wins.
    If `labels` hold no OOS row, the metric cannot see rejections, so the threshold
    that keeps `fallback_tpr` of in-scope rows is returned instead (`info["fallback"]`).

    Args:
        scores: `(N,)` float detector scores on dev, higher = in-scope.
        preds: `(N,)` int in-scope argmax predictions on dev.
        labels: `(N,)` int dev gold labels, OOS rows `== num_labels`.
        num_labels: `C`.
        metric: one of `TUNE_METRICS` (key of `amess.metrics.oos_metrics`).

    Returns:
        `(threshold, info)`; info has `metric`, `value` (dev metric at the threshold),
        `n_candidates`, `fallback` (bool) and `reason`.
    """
    if metric not in TUNE_METRICS:
        raise ValueError(f"unknown tuning metric {metric!r}; choose from {TUNE_METRICS}")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    preds = np.asarray(preds).astype(np.int64).ravel()
    labels = np.asarray(labels).astype(np.int64).ravel()
    if not (scores.shape == preds.shape == labels.shape):
        raise ValueError(f"scores {scores.shape}, preds {preds.shape}, labels {labels.shape} differ in shape")
    if scores.size == 0:
        raise ValueError("tune_threshold needs at least one dev row")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    if max_candidates < 2:
        raise ValueError("max_candidates must be >= 2")

    is_in = labels < num_labels
    if is_in.all():
        thr = threshold_at_tpr(scores, is_in, fallback_tpr)
        y_pred = predict_with_oos(preds, scores, thr, num_labels)
        return thr, {
            "metric": metric,
            "value": _fast_metric(labels, y_pred, num_labels, metric),
            "n_candidates": 1,
            "fallback": True,
            "reason": f"dev split has no out-of-scope rows: threshold keeps {fallback_tpr:.0%} of in-scope dev rows",
        }

    qs = np.quantile(scores, np.linspace(0.0, 1.0, max_candidates - 1), method="lower")
    top = float(scores.max())
    above = np.nextafter(top, np.inf) if top != 0 else np.finfo(np.float64).tiny
    candidates = np.unique(np.append(qs, above))
    values = np.array([
        _fast_metric(labels, predict_with_oos(preds, scores, t, num_labels), num_labels, metric)
        for t in candidates
    ])
    best = int(np.argmax(values))  # first maximum = lowest threshold among ties
    return float(candidates[best]), {
        "metric": metric,
        "value": float(values[best]),
        "n_candidates": int(candidates.size),
        "fallback": False,
        "reason": f"maximises dev {metric}",
    }


def evaluate_detector(
    detector: Detector,
    train: OutputBundle,
    dev: OutputBundle,
    test: OutputBundle,
    *,
    tune: bool | None = None,
    metric: str = "f1_overall",
    max_candidates: int = 400,
) -> dict[str, float]:
    """Fit on train, choose the threshold on dev, report test metrics.

    Args:
        detector: an unfitted (or refittable) detector.
        train, dev, test: outputs of the same model over the three splits.
        tune: tune the threshold on dev. Default (None): use the detector's
            `natural_threshold` when it has one (DOC: 0.0), tune otherwise.
        metric, max_candidates: passed to :func:`tune_threshold`.

    Returns:
        Test `oos_metrics` (`oos_acc`, `f1_is`, `f1_oos`, `f1_overall`), test
        `detection_metrics` (`auroc`, `aupr_in`, `aupr_out`, `fpr95`; only when test
        holds both in-scope and OOS rows), `threshold`, `tuned` (1.0 if chosen on dev,
        0.0 if natural) and `fallback_tpr95` (1.0 if dev had no OOS rows). All floats.
    """
    c = train.num_labels
    if dev.num_labels != c or test.num_labels != c:
        raise ValueError(f"splits disagree on C: train {c}, dev {dev.num_labels}, test {test.num_labels}")
    detector.fit(train)
    use_natural = detector.natural_threshold is not None and not tune
    if tune is False and detector.natural_threshold is None:
        raise ValueError(f"{detector.name} has no natural threshold; it must be tuned on dev")
    fallback = False
    if use_natural:
        threshold = float(detector.natural_threshold)
    else:
        threshold, info = tune_threshold(detector.score(dev), dev.preds(), dev.labels, c,
                                         metric=metric, max_candidates=max_candidates)
        fallback = bool(info["fallback"])

    s_test = detector.score(test)
    y_pred = predict_with_oos(test.preds(), s_test, threshold, c)
    out: dict[str, float] = dict(oos_metrics(test.labels, y_pred, c))
    is_in = test.in_scope_mask()
    if is_in.any() and not is_in.all():
        out.update(detection_metrics(s_test, is_in))
    out["threshold"] = float(threshold)
    out["tuned"] = 0.0 if use_natural else 1.0
    out["fallback_tpr95"] = 1.0 if fallback else 0.0
    return out
