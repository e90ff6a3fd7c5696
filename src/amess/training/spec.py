"""`model_spec.json`: everything needed to rebuild and use a trained model without its
dataset (`amess.predictor.load_run`).

It records the method and its settings, the label names (under the open-intent protocol,
`data.known_ratio`, the seed's known intents, with `known_labels` and the dataset's
`all_labels`), the feature sizes and, where a provenance file says so, which extractor
made the features, the text max length, the encoder (name, parts, and the folder
`encoder/` holding its config and tokenizer), the label descriptions used, and the fitted
state of each out-of-scope detector (DOC thresholds, Mahalanobis means and whitening,
tuned thresholds).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from amess.config import Config

log = logging.getLogger(__name__)

SPEC_FILE = "model_spec.json"
ENCODER_DIR = "encoder"
SPEC_FORMAT = 1


def feature_provenance(path: Path | None) -> dict | None:
    """What made a feature file, when a provenance file sits beside it (`FILE.json`, e.g.
    written by `amess data embed-descriptions`) or an `extraction.json` in its folder or the
    one above (`amess extract`); None when unknown."""
    if path is None:
        return None
    for cand in (path.with_name(path.name + ".json"), path.with_suffix(".json"), path.parent / "extraction.json",
                 path.parent.parent / "extraction.json"):
        if cand.is_file() and cand != path:
            try:
                info = json.loads(cand.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            return {"file": cand.name, **(info if isinstance(info, dict) else {"value": info})}
    return None


def build_spec(cfg: Config, data, encoder, descriptions: list[str] | None, detectors: dict, seed: int,
               text_max_len: int) -> dict[str, Any]:
    """The spec of one trained seed (`data`: `PreparedData`; `detectors`: fitted detectors)."""
    from amess import __version__
    from amess.models import method_class

    cls = method_class(cfg.model.method)
    sources = {}
    for m in data.feature_dims:
        path = data.reader.feature_path(m) if not cfg.data.feature_store else None
        sources[m] = {"file": path.name if path is not None else None, "store": bool(cfg.data.feature_store),
                      "max_len": data.reader.max_len(m), "extractor": feature_provenance(path)}
    settings = cfg.method_settings
    import dataclasses

    return {
        "format": SPEC_FORMAT,
        "amess_version": __version__,
        "method": cfg.model.method,
        "settings": dataclasses.asdict(settings) if settings is not None else None,
        "model": dataclasses.asdict(cfg.model),
        "seed": seed,
        "dataset": cfg.data.dataset,
        "task": cfg.data.task,
        "label_names": list(data.label_names),
        "oos_label": data.reader.spec.oos_label,
        # open intent (`data.known_ratio`): the head knows only `known_labels` (== label_names);
        # utterances of the other intents are meant to be caught by the detectors
        "known_ratio": cfg.data.known_ratio,
        "known_labels": list(data.known_labels) if data.known_labels is not None else None,
        "all_labels": list(data.all_label_names or data.label_names),
        "modalities": ["text", *data.feature_dims],
        "feature_dims": data.feature_dims,
        "features": sources,
        "text_max_len": text_max_len,
        "context": cfg.data.context,
        "encoder": {"name": cfg.model.text_encoder, "folder": ENCODER_DIR, "parts": list(cls.encoder_parts),
                    "hidden_size": encoder.hidden_size},
        "descriptions": list(descriptions) if descriptions is not None else None,
        "descriptions_source": (cfg.data.label_descriptions or data.reader.descriptions_set)
        if descriptions is not None else None,
        "ood": {name: fd.state() for name, fd in detectors.items()},
        "config": cfg.to_dict(),
    }


def read_spec(seed_dir: Path) -> dict[str, Any]:
    path = seed_dir / SPEC_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; is {seed_dir} a finished `amess train` seed folder?") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable model spec ({e})") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{path}: unknown model spec format {spec.get('format') if isinstance(spec, dict) else spec!r}"
                         f" (expected {SPEC_FORMAT})")
    return spec
