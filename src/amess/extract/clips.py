"""Predicting from clips: rebuild the extractors a run's features were made with (their
records travel from `extraction.json` into the run's `model_spec.json`), extract, then
predict. A run never takes features from another extractor: the records are compared and
the refusal names both."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from amess.extract.registry import Extractor, ExtractorError, check_same_extractor, from_record, get_extractor

if TYPE_CHECKING:
    from amess.predictor import Prediction, Predictor

log = logging.getLogger(__name__)

CLIP_BATCH = 16
"""clips extracted, then predicted, at a time (memory stays bounded for a folder of clips)"""


def record_for(provenance: dict[str, Any] | None, modality: str) -> dict[str, Any] | None:
    """The extractor record of `modality` in a provenance entry: an `extraction.json` (with
    `extractors`) or a single extractor's record."""
    if not isinstance(provenance, dict):
        return None
    if isinstance(provenance.get("extractors"), dict):
        rec = provenance["extractors"].get(modality)
        return rec if isinstance(rec, dict) else None
    return provenance if provenance.get("modality") == modality and "name" in provenance else None


def run_records(predictor: "Predictor") -> dict[str, dict[str, Any] | None]:
    """modality -> the record of the extractor that made the run's training features."""
    feats = predictor.spec.get("features", {})
    return {m: record_for(feats.get(m, {}).get("extractor"), m) for m in predictor.feature_dims}


def _asr_record(predictor: "Predictor") -> dict[str, Any] | None:
    for entry in predictor.spec.get("features", {}).values():
        rec = record_for(entry.get("extractor"), "text")
        if rec is not None and rec.get("name") != "tsv":
            return rec
    return None


def _max_seconds(predictor: "Predictor") -> float:
    for entry in predictor.spec.get("features", {}).values():
        prov = entry.get("extractor") or {}
        if isinstance(prov.get("media"), dict) and prov["media"].get("max_seconds"):
            return float(prov["media"]["max_seconds"])
    return 120.0


def clip_extractors(predictor: "Predictor", *, threads: int | None = None, asr: bool = True) -> dict[str, Extractor]:
    """The run's own extractors, rebuilt from its records (plus ASR: the one its training
    transcripts came from, else the packaged Whisper)."""
    out: dict[str, Extractor] = {}
    for modality, rec in run_records(predictor).items():
        if rec is None:
            raise ExtractorError(f"{predictor.seed_dir}: this run's {modality} features come from an unknown "
                                 "extractor (its dataset had no extraction.json); predicting from a clip needs a run "
                                 "trained on features written by `amess extract`")
        out[modality] = from_record(rec, threads=threads)
    if asr:
        rec = _asr_record(predictor)
        out["text"] = from_record(rec, threads=threads) if rec else get_extractor("text", "whisper", threads=threads)
    return out


def check_feature_file(predictor: "Predictor", modality: str, path: Path) -> None:
    """Refuse a feature file whose provenance (a `FILE.json` beside it or an
    `extraction.json` in its folder) names another extractor than the run's."""
    from amess.training.spec import feature_provenance

    got = record_for(feature_provenance(Path(path)), modality)
    if got is None:
        return
    expected = run_records(predictor).get(modality)
    check_same_extractor(expected, got, what=str(path))


def predict_clips(predictor: "Predictor", paths: Sequence[str | Path], *, texts: Sequence[str | None] | None = None,
                  threads: int | None = None, progress: bool = False) -> list["Prediction"]:
    """Ranked intents for each clip (its `Prediction.text` is the transcript, or `texts[i]`)."""
    from tqdm.auto import tqdm

    from amess.extract.pipeline import extract_clip

    paths = [Path(p) for p in paths]
    texts = list(texts) if texts is not None else [None] * len(paths)
    if len(texts) != len(paths):
        raise ValueError(f"{len(texts)} texts for {len(paths)} clips")
    extractors = clip_extractors(predictor, threads=threads, asr=any(t is None for t in texts))
    max_seconds = _max_seconds(predictor)
    results: list[Prediction] = []
    bar = tqdm(total=len(paths), desc="predict", unit="clip", disable=not progress)
    for start in range(0, len(paths), CLIP_BATCH):
        chunk = []
        for path, text in zip(paths[start:start + CLIP_BATCH], texts[start:start + CLIP_BATCH]):
            cf = extract_clip(path, extractors, text=text, max_seconds=max_seconds)
            if not cf.text:
                raise ExtractorError(f"{path}: no speech recognised in the clip; give its text (--text) instead")
            chunk.append(cf)
            bar.update(1)
        feats = {m: [cf.features[m] for cf in chunk] for m in predictor.feature_dims}
        results += predictor.predict([cf.text for cf in chunk], **feats)
    bar.close()
    return results


def cmd_predict_clips(predictor: "Predictor", args: argparse.Namespace) -> int:
    """`amess predict RUN --clip FILE [--text T]` or `--clips DIR_OR_FILES [--out CSV]`."""
    import csv
    import json

    from amess.extract.media import find_clips

    if args.clip and args.clips:
        raise ValueError("amess predict: give --clip FILE or --clips DIR_OR_FILES, not both")
    if args.tsv:
        raise ValueError("amess predict: --tsv does not go with --clip/--clips (the clips give the text)")
    paths = [Path(args.clip)] if args.clip else find_clips(args.clips)
    if args.text and len(args.text) != len(paths):
        raise ValueError(f"amess predict: {len(args.text)} --text for {len(paths)} clip(s); give one per clip or none")
    preds = predict_clips(predictor, paths, texts=args.text, threads=args.threads, progress=len(paths) > 1)
    ids = [p.stem for p in paths]
    if args.json:
        print(json.dumps([dict(id=i, clip=str(c), **r.to_dict(args.top)) for i, c, r in zip(ids, paths, preds)],
                         indent=2))
        return 0
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "clip", "transcript", "intent", "probability"] +
                       [f"oos_{d}" for d in predictor.detectors] + ["anchors"])
            for i, c, r in zip(ids, paths, preds):
                w.writerow([i, str(c), r.text, r.label, f"{r.ranked[0][1]:.5f}"] +
                           [int(v) for v in r.ood.values()] + [" ".join(r.anchors)])
        print(f"wrote {len(preds)} predictions to {args.out}")
        return 0
    for i, r in zip(ids, preds):
        print(f"{i}: {r.text}")
        for name, prob in r.ranked[: args.top]:
            print(f"    {prob:7.2%}  {name}")
        if r.anchors:
            print(f"    anchor words: {' '.join(r.anchors)}")
        for det, oos in r.ood.items():
            thr = predictor.detectors[det].threshold
            print(f"    out-of-scope ({det}): {'yes' if oos else 'no'} (score {r.ood_scores[det]:.4f}, "
                  f"threshold {thr:.4f})")
    return 0
