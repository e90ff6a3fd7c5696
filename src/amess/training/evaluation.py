"""Evaluation: a model's outputs over a split (`EvalResult`), in-scope metrics, and the
out-of-scope detectors fitted on training outputs and tuned on dev."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from amess.config import Config
from amess.metrics import classification_metrics
from amess.training.data import make_loader
from amess.training.distributed import gather_ids

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """A model's outputs over one split, as numpy arrays (row order = split order)."""

    split: str
    ids: list[str]
    labels: np.ndarray  # (N,) gold ids; out-of-scope rows == C
    scores: np.ndarray  # (N, C) predict_scores (probabilities)
    logits: np.ndarray  # (N, C) head logits
    pooled: np.ndarray  # (N, h)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # per-sample, (N, ...)
    shared: dict[str, np.ndarray] = field(default_factory=dict)  # batch-independent (e.g. desc_emb)
    decision_logits: np.ndarray | None = None  # (N, C) logits whose softmax is `scores`; None = `logits`

    @property
    def preds(self) -> np.ndarray:
        return self.scores.argmax(-1)

    def save(self, path: Path) -> None:
        from amess.training.artifacts import save_npz

        arrays = dict(ids=np.array(self.ids), labels=self.labels, scores=self.scores, logits=self.logits,
                      pooled=self.pooled, **{f"extra_{k}": v for k, v in self.extras.items()},
                      **{f"shared_{k}": v for k, v in self.shared.items()})
        if self.decision_logits is not None:
            arrays["decision_logits"] = self.decision_logits
        save_npz(path, arrays)

    @classmethod
    def load(cls, path: Path, split: str) -> "EvalResult":
        with np.load(path, allow_pickle=False) as z:
            extras = {k[6:]: z[k] for k in z.files if k.startswith("extra_")}
            shared = {k[7:]: z[k] for k in z.files if k.startswith("shared_")}
            return cls(split=split, ids=[str(i) for i in z["ids"]], labels=z["labels"], scores=z["scores"],
                       logits=z["logits"], pooled=z["pooled"], extras=extras, shared=shared,
                       decision_logits=z["decision_logits"] if "decision_logits" in z.files else None)

    def bundle(self):
        """The outputs an OOD detector reads: the logits behind the method's own scores
        (`IntentModel.decision_logits`), so that detectors and C+1 predictions agree with the
        in-scope predictions whatever the method's inference mode."""
        from amess.ood import OutputBundle

        logits = self.logits if self.decision_logits is None else self.decision_logits
        return OutputBundle(logits=logits, features=self.pooled, labels=self.labels,
                            desc_sims=self.extras.get("desc_sims"))


@torch.no_grad()
def predict(model, loader: DataLoader, accelerator, split: str) -> EvalResult:
    """Run the model over a loader; gathers across processes (duplicates from uneven
    sharding dropped by accelerate's `gather_for_metrics`)."""
    model.eval()
    inner = accelerator.unwrap_model(model)
    ids, labels, scores, logits, decision, pooled = [], [], [], [], [], []
    extras: dict[str, list] = {}
    shared: dict[str, np.ndarray] = {}
    for batch in loader:
        batch = batch.to(accelerator.device)
        with accelerator.autocast():
            out = model(batch)
            sc = inner.predict_scores(out)
            dl = inner.decision_logits(out)
        row = {"labels": batch.labels, "scores": sc.float(), "logits": out.logits.float(), "decision": dl.float(),
               "pooled": out.pooled.float()}
        row.update({f"x_{k}": v.float() if v.is_floating_point() else v for k, v in out.extras.items()
                    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == len(batch)})
        row = accelerator.gather_for_metrics(row)
        if not shared:  # batch-independent (e.g. description embeddings): convert once
            shared = {k: v.detach().float().cpu().numpy() for k, v in out.shared.items()}
        ids.extend(gather_ids(batch.ids, accelerator))
        labels.append(row["labels"].cpu().numpy())
        scores.append(row["scores"].cpu().numpy())
        logits.append(row["logits"].cpu().numpy())
        decision.append(row["decision"].cpu().numpy())
        pooled.append(row["pooled"].cpu().numpy())
        for k, v in row.items():
            if k.startswith("x_"):
                extras.setdefault(k[2:], []).append(v.cpu().numpy())
    model.train()
    cat = lambda xs: np.concatenate(xs, 0)  # noqa: E731
    logits_np, decision_np = cat(logits), cat(decision)
    return EvalResult(split=split, ids=ids[: sum(len(x) for x in labels)], labels=cat(labels), scores=cat(scores),
                      logits=logits_np, pooled=cat(pooled),
                      extras={k: _cat_ragged(v) for k, v in extras.items()}, shared=shared,
                      decision_logits=None if np.array_equal(decision_np, logits_np) else decision_np)


def predict_split(model, split, name: str, cfg: Config, collator, accelerator, seed: int) -> EvalResult:
    """`predict` over one split in evaluation order (no shuffling, `train.eval_batch_size`)."""
    loader = accelerator.prepare(make_loader(split, cfg, collator, shuffle=False, seed=seed,
                                             batch_size=cfg.train.eval_batch_size, device=accelerator.device))
    return predict(model, loader, accelerator, name)


def _cat_ragged(xs: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-batch arrays whose trailing dims may differ (e.g. token counts), padding with -1."""
    if all(x.shape[1:] == xs[0].shape[1:] for x in xs):
        return np.concatenate(xs, 0)
    shape = tuple(max(x.shape[d] for x in xs) for d in range(1, xs[0].ndim))
    out = []
    for x in xs:
        pad = [(0, 0)] + [(0, s - x.shape[d + 1]) for d, s in enumerate(shape)]
        out.append(np.pad(x, pad, constant_values=-1))
    return np.concatenate(out, 0)


def split_metrics(res: EvalResult, num_labels: int, label_names: list[str],
                  holdout_labels: list[str] | None = None) -> dict[str, float]:
    """In-scope metrics (rows with gold < C, plain argmax); generalised zero-shot
    accuracy on seen / unseen intents when intents were held out. Under the open-intent
    protocol C is the number of known intents: these figures are over the rows of known
    intents only (the K+1-class figures are the detectors', `score_detector`)."""
    ins = res.labels < num_labels
    if not ins.any():
        return {}
    m = classification_metrics(res.labels[ins], res.preds[ins], num_labels)
    if holdout_labels:
        unseen_ids = [label_names.index(n) for n in holdout_labels]
        unseen = np.isin(res.labels, unseen_ids) & ins
        seen = ins & ~unseen
        if seen.any():
            m["acc_seen"] = float((res.preds[seen] == res.labels[seen]).mean())
        if unseen.any():
            m["acc_unseen"] = float((res.preds[unseen] == res.labels[unseen]).mean())
        if "acc_seen" in m and "acc_unseen" in m:
            s, u = m["acc_seen"], m["acc_unseen"]
            m["acc_h"] = 0.0 if s + u == 0 else 2 * s * u / (s + u)
    return m


@dataclass
class FittedDetector:
    """A detector fitted on training outputs with its threshold chosen on dev."""

    name: str
    detector: object  # amess.ood.Detector
    threshold: float
    tuned: bool
    fallback: bool

    def state(self) -> dict:
        return {**self.detector.state(), "threshold": self.threshold, "tuned": self.tuned,
                "fallback_tpr95": self.fallback}

    @classmethod
    def from_state(cls, state: dict) -> "FittedDetector":
        from amess.ood import Detector

        return cls(state["name"], Detector.from_state(state), float(state["threshold"]), bool(state.get("tuned")),
                   bool(state.get("fallback_tpr95")))


def fit_detectors(cfg: Config, train: EvalResult, dev: EvalResult) -> dict[str, FittedDetector]:
    """Fit each configured detector on the training outputs and choose its threshold on dev
    (DOC keeps its natural cut). desc_sim is skipped, with a warning, for a method that
    gives no similarities to label descriptions.

    A dev split without out-of-scope rows (MIntRec, MIntRec2.0 `in-scope`, and the
    open-intent protocol, `data.known_ratio`, whose dev holds known intents only, as
    TEXTOIR's does) cannot show what a rejection costs, so each tuned detector takes the
    cut that keeps 95% of the in-scope dev rows (`amess.ood.tune_threshold`'s fallback,
    recorded as `fallback_tpr95`): no unknown-intent row is ever looked at before test."""
    from amess.ood import build_detector, tune_threshold

    tb, db = train.bundle(), dev.bundle()
    fitted = {}
    for name in cfg.ood.detectors:
        if name == "desc_sim" and tb.desc_sims is None:
            log.warning("ood detector desc_sim skipped: method %r gives no similarities to label descriptions",
                        cfg.model.method)
            continue
        det = build_detector(name).fit(tb)
        if det.natural_threshold is not None:
            fitted[name] = FittedDetector(name, det, float(det.natural_threshold), False, False)
        else:
            thr, info = tune_threshold(det.score(db), db.preds(), db.labels, db.num_labels, metric=cfg.ood.tune_metric)
            if info["fallback"]:
                log.info("ood detector %s: %s (%.4g)", name, info["reason"], thr)
            fitted[name] = FittedDetector(name, det, float(thr), True, bool(info["fallback"]))
    return fitted


def score_detector(fd: FittedDetector, res: EvalResult) -> tuple[dict[str, float], np.ndarray]:
    """Test figures of a fitted detector on one split (C+1 metrics, detection metrics when
    both kinds of rows are present, the threshold) and the rows' scores."""
    from amess.metrics import detection_metrics, oos_metrics
    from amess.ood import predict_with_oos

    b = res.bundle()
    s = fd.detector.score(b)
    out = dict(oos_metrics(b.labels, predict_with_oos(b.preds(), s, fd.threshold, b.num_labels), b.num_labels))
    is_in = b.in_scope_mask()
    if is_in.any() and not is_in.all():
        out.update(detection_metrics(s, is_in))
    out.update(threshold=fd.threshold, tuned=1.0 if fd.tuned else 0.0, fallback_tpr95=1.0 if fd.fallback else 0.0)
    return out, s


def evaluate_ood(cfg: Config, results: dict[str, EvalResult], dev_key: str, test_splits: list[str],
                 metrics: dict) -> tuple[dict[str, FittedDetector], dict]:
    """Fit the configured detectors (train outputs, dev thresholds) and score every test
    split into `metrics[split]["ood"][detector]`. Returns the fitted detectors and, for the
    first test split, `{detector: (scores, is_in, threshold)}` for the score plots."""
    plotted: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    if not cfg.ood.detectors:
        return {}, plotted
    fitted = fit_detectors(cfg, results["train"], results[dev_key])
    for split in test_splits:
        for name, fd in fitted.items():
            m, s = score_detector(fd, results[split])
            metrics[split].setdefault("ood", {})[name] = m
            if split == test_splits[0]:
                plotted[name] = (s, results[split].bundle().in_scope_mask(), fd.threshold)
    return fitted, plotted
