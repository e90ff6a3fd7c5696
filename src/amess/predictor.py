"""Use a trained run: `load_run(RUN_DIR)` returns a `Predictor` built from the run folder
alone (its `model_spec.json`, `encoder/` and `model.pt`): the dataset, the pretrained
encoder files and the model hub are not needed.

    from amess import load_run
    p = load_run("runs/amess")                  # a run folder (its first seed) or a seed folder
    for r in p.predict(["can you help me carry these boxes?"]):
        print(r.ranked[:3], r.ood)              # [("Ask for help", 0.81), ...], {"msp": False, ...}
    p.predict_clips(["clip.mp4"])               # the run's own extractors, then ASR, then predict
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One utterance's result: intents ranked by probability, and, for each of the run's
    out-of-scope detectors, whether it calls the utterance out of scope."""

    text: str
    ranked: list[tuple[str, float]]
    ood: dict[str, bool] = field(default_factory=dict)
    ood_scores: dict[str, float] = field(default_factory=dict)
    anchors: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.ranked[0][0]

    @property
    def out_of_scope(self) -> bool | None:
        """The verdict of the first detector (None without detectors)."""
        return next(iter(self.ood.values())) if self.ood else None

    def to_dict(self, top: int | None = None) -> dict:
        return {"text": self.text, "intent": self.label,
                "ranked": [{"intent": n, "probability": p} for n, p in self.ranked[:top]],
                "out_of_scope": self.ood, "ood_scores": self.ood_scores, "anchors": self.anchors}


def _seed_dir(run_dir: Path, seed: int | None) -> Path:
    from amess.training.spec import SPEC_FILE

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if (run_dir / SPEC_FILE).is_file() and seed is None:
        return run_dir
    seeds = sorted((p for p in run_dir.glob("seed_*") if (p / SPEC_FILE).is_file()),
                   key=lambda p: int(p.name[5:]) if p.name[5:].lstrip("-").isdigit() else 0)
    if seed is not None:
        chosen = run_dir / f"seed_{seed}"
        if not (chosen / SPEC_FILE).is_file():
            raise FileNotFoundError(f"{chosen}: no finished seed {seed} (finished: {[p.name for p in seeds]})")
        return chosen
    if not seeds:
        raise FileNotFoundError(f"{run_dir}: no finished seed (seed_*/{SPEC_FILE}); train it with `amess train` first")
    return seeds[0]


def check_inference_overrides(method: str, overrides: dict[str, str], where: Path) -> None:
    """Refuse any `section.key` override that is not an inference-time setting of `method`
    (`IntentModel.inference_settings`): it would change what was trained."""
    from amess.models import method_class

    allowed = [f"{method}.{k}" for k in method_class(method).inference_settings]
    bad = [k for k in overrides if k not in allowed]
    if bad:
        raise ValueError(f"{where}: --set {bad[0]} would change the trained {method!r} model; at evaluation only "
                         f"its inference-time settings may change: {allowed or 'none'}")


class Predictor:
    """A trained model with its tokenizer, settings and fitted detectors."""

    def __init__(self, seed_dir: Path, overrides: dict[str, str] | None = None):
        """`overrides` (`{"amess.inference": "both"}`) switch inference-time settings of the
        trained method (its `inference_settings`) before the model is rebuilt; any other key
        would change what was trained, and is an error. The out-of-scope detectors were fitted on
        the scores of the trained settings, so with overrides there are none (no verdicts)."""
        from amess.config import Config
        from amess.data.batch import Collator
        from amess.models import build_model, method_class
        from amess.models.encoders import encoder_from_architecture
        from amess.training.evaluation import FittedDetector
        from amess.training.runner import load_checkpoint
        from amess.training.spec import read_spec

        self.seed_dir = Path(seed_dir)
        spec = read_spec(self.seed_dir)
        self.spec = spec
        self.label_names: list[str] = spec["label_names"]
        self.known_labels: list[str] | None = spec.get("known_labels")
        """Open intent (`--known-ratio`): the intents this seed learnt (== label_names); an utterance
        of any other intent is ranked among them, and the detectors' verdicts (`Prediction.ood`) are
        what tell it is none of them. None for a run over all intents."""
        self.method: str = spec["method"]
        self.config = Config.from_dict(spec["config"])
        if overrides:
            check_inference_overrides(self.method, overrides, self.seed_dir)
            self.config = self.config.override(overrides)
        enc = spec["encoder"]
        encoder = encoder_from_architecture(self.seed_dir / enc["folder"], enc["name"], enc["parts"])
        dims = spec["feature_dims"]
        self.model = build_model(self.method, config=self.config, encoder=encoder, num_labels=len(self.label_names),
                                 video_dim=dims.get("video"), audio_dim=dims.get("audio"),
                                 label_names=self.label_names, descriptions=spec["descriptions"])
        load_checkpoint(self.model, self.seed_dir / "model.pt")
        self.model.eval()
        self.feature_dims: dict[str, int] = dims
        hook = method_class(self.method).collate_hook(self.config.method_settings, encoder.tokenizer,
                                                      spec["text_max_len"])
        self.collator = Collator(encoder.tokenizer, text_max_len=spec["text_max_len"], video_dim=dims.get("video"),
                                 audio_dim=dims.get("audio"), hook=hook)
        self.detectors = {} if overrides else {name: FittedDetector.from_state(st) for name, st in spec["ood"].items()}

    def __repr__(self) -> str:
        known = "" if self.known_labels is None else f" (known of {len(self.spec.get('all_labels') or [])})"
        return (f"Predictor({self.seed_dir}, method={self.method!r}, {len(self.label_names)} intents{known}, "
                f"modalities={['text', *self.feature_dims]}, detectors={list(self.detectors)})")

    def _features(self, name: str, arrays: Sequence[np.ndarray | None] | None, n: int) -> list[np.ndarray | None]:
        if arrays is None:
            return [None] * n
        if len(arrays) != n:
            raise ValueError(f"{name}: {len(arrays)} feature arrays for {n} utterances")
        dim = self.feature_dims.get(name)
        out = []
        for i, a in enumerate(arrays):
            if a is None:
                out.append(None)
                continue
            if dim is None:
                raise ValueError(f"this run ({self.method}) was trained without {name} features; it cannot use them")
            a = np.asarray(a, dtype=np.float32)
            if a.ndim == 3 and a.shape[1] == 1:
                a = a[:, 0]
            if a.ndim != 2 or a.shape[1] != dim:
                raise ValueError(f"{name} features of utterance {i}: expected (frames, {dim}) as in training, "
                                 f"got {tuple(a.shape)}")
            if not np.isfinite(a).all():
                raise ValueError(f"{name} features of utterance {i}: hold NaN or inf values")
            max_len = self.spec["features"].get(name, {}).get("max_len")
            out.append(a[:max_len] if max_len else a)
        return out

    @torch.no_grad()
    def predict(self, texts: Sequence[str], *, video: Sequence[np.ndarray | None] | None = None,
                audio: Sequence[np.ndarray | None] | None = None, contexts: Sequence[str | None] | None = None,
                batch_size: int = 32) -> list[Prediction]:
        """Ranked intents for each text (with optional `(frames, d)` video / audio features
        per utterance, as the run was trained on), with the detectors' verdicts."""
        from amess.data.batch import Sample
        from amess.training.evaluation import EvalResult, score_detector

        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"utterance {i}: empty text")
        n = len(texts)
        vids, auds = self._features("video", video, n), self._features("audio", audio, n)
        ctx = list(contexts) if contexts is not None else [None] * n
        C = len(self.label_names)
        results: list[Prediction] = []
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            samples = [Sample(id=str(i), text=texts[i], label=0, video=vids[i], audio=auds[i], context=ctx[i])
                       for i in idx]
            batch = self.collator(samples)
            out = self.model(batch)
            scores = self.model.predict_scores(out).float().numpy()
            res = EvalResult(split="predict", ids=[s.id for s in samples], labels=np.zeros(len(samples), np.int64),
                             scores=scores, logits=out.logits.float().numpy(), pooled=out.pooled.float().numpy(),
                             extras={k: v.float().numpy() for k, v in out.extras.items() if k == "desc_sims"},
                             decision_logits=self.model.decision_logits(out).float().numpy())
            det_scores = {name: score_detector(fd, res)[1] for name, fd in self.detectors.items()}
            anchor_idx = self.model.token_highlights(out)
            for j, i in enumerate(idx):
                order = np.argsort(-scores[j])
                ranked = [(self.label_names[c], float(scores[j, c])) for c in order[:C]]
                anchors = []
                if anchor_idx is not None:
                    toks = self.collator.tokenizer.convert_ids_to_tokens(batch.input_ids[j].tolist())
                    anchors = [toks[a] for a in anchor_idx[j].tolist() if 0 <= a < len(toks)]
                results.append(Prediction(
                    text=texts[i], ranked=ranked,
                    ood={name: bool(s[j] < self.detectors[name].threshold) for name, s in det_scores.items()},
                    ood_scores={name: float(s[j]) for name, s in det_scores.items()}, anchors=anchors))
        return results


    def predict_clips(self, paths: Sequence[str | Path], *, texts: Sequence[str | None] | None = None,
                      threads: int | None = None, progress: bool = False) -> list[Prediction]:
        """Ranked intents for audio/video clips: features from the extractors the run was trained
        on (rebuilt from its records; another extractor is refused), the transcript by ASR unless
        `texts` gives it (`Prediction.text`). Needs `pip install "amess[extract]"`."""
        from amess.extract.clips import predict_clips

        return predict_clips(self, paths, texts=texts, threads=threads, progress=progress)


def load_run(run_dir: str | Path, *, seed: int | None = None) -> Predictor:
    """A `Predictor` from a run folder (its first finished seed, or `seed`) or a seed folder."""
    return Predictor(_seed_dir(Path(run_dir), seed))
