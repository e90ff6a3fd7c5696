"""Evaluate a finished run folder on a split: each of the run's seeds is rebuilt from its
`model_spec.json` and `model.pt` (no retraining, no refitting: the out-of-scope detectors
are the ones fitted at training time), scored on the split, and the split's figures are
merged into `summary.json`. With `overrides` (`amess evaluate --set amess.inference=both`:
inference-time settings only, see `Predictor`) the same checkpoints are scored with those
settings and nothing is written: the run folder keeps the figures of the settings it was
trained and chosen with. The out-of-scope detectors read the scores, so under overrides they
are fitted anew as training fits them (`fit_detectors`: the seed's train rows, thresholds on
its early-stopping split, both rebuilt from the config and the seed) from the overridden
scores: `--set amess.inference=head` shows what each detector would have done with the head's
logits. Exactly the run's seeds are used; a missing one is an error that names it. Under the
open-intent protocol (`data.known_ratio`) each seed's own known intents (`model_spec.json`)
decide which rows are out-of-scope for it."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from amess.config import Config
from amess.training.artifacts import summarise, write_json
from amess.training.data import prepare_data, read_modalities, remap_to_known
from amess.training.distributed import make_accelerator, prepare_model
from amess.training.evaluation import fit_detectors, predict_split, score_detector, split_metrics
from amess.training.runner import seed_finished

log = logging.getLogger(__name__)


def evaluate_run(run_dir: Path, split: str, overrides: dict[str, str] | None = None) -> dict:
    """Score every seed of `run_dir` on `split`; returns `summarise` of the per-seed figures, with
    the per-seed ones under `"per_seed"` ({seed: {split: metrics}})."""
    import json

    from amess.data import DataError, get_reader
    from amess.predictor import Predictor

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (is this an `amess train` run folder?)")
    cfg = Config.load(run_dir / "config.yaml")
    missing = [s for s in cfg.train.seeds if not seed_finished(run_dir / f"seed_{s}")]
    if missing:
        raise FileNotFoundError(f"{run_dir}: seed(s) {missing} of this run are not finished (no seed_N/metrics.json "
                                f"and model_spec.json); rerun `amess train` with the same --out to finish them")
    accelerator = make_accelerator(cfg, training=False)
    reader = get_reader(replace(cfg.data, modalities=read_modalities(cfg)))
    if split not in reader.available_splits():
        raise FileNotFoundError(f"{reader.split_file(split)}: split {split!r} not found")
    target = reader.load([split])[split]
    per_seed = {}
    for seed in cfg.train.seeds:
        sd = run_dir / f"seed_{seed}"
        p = Predictor(sd, overrides)
        run_labels = p.spec.get("all_labels") or p.label_names
        if run_labels != reader.label_names:
            raise DataError(f"{reader.data_dir}: its labels {reader.label_names} differ from the run's "
                            f"{run_labels} (labels are matched by name and order)")
        split_data = target
        if p.spec.get("known_labels") is not None:  # open intent: this seed's unknown intents are out-of-scope
            split_data = remap_to_known(target, reader.label_names, p.spec["known_labels"], drop_unknown=False)
        model = prepare_model(p.model, accelerator)
        res = predict_split(model, split_data, split, p.config, p.collator, accelerator, seed)
        m = split_metrics(res, len(p.label_names), p.label_names, p.config.data.holdout_labels)
        detectors = _refit_detectors(p, model, accelerator, seed) if overrides and p.spec.get("ood") else p.detectors
        for name, fd in detectors.items():
            m.setdefault("ood", {})[name] = score_detector(fd, res)[0]
        per_seed[seed] = {split: m}
        if accelerator.is_main_process and not overrides:
            res.save(sd / f"outputs_{split}.npz")
            write_json(sd / f"metrics_{split}.json", m)
    summary = summarise(per_seed)
    if overrides:
        log.info("%s: scored with %s; nothing written into the run folder", run_dir, overrides)
    elif accelerator.is_main_process:
        path = run_dir / "summary.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        old[split] = summary[split]
        write_json(path, old)
    return {**summary, "per_seed": per_seed}


def _refit_detectors(p, model, accelerator, seed: int) -> dict:
    """The run's detectors fitted again on this seed's train rows and early-stopping split (the
    same rows as in training: `prepare_data` is a function of the config and the seed), scored
    with `p`'s overridden settings."""
    data = prepare_data(p.config, seed)
    train, dev = (predict_split(model, split, name, p.config, p.collator, accelerator, seed)
                  for name, split in (("train", data.train), (data.dev_key, data.dev)))
    return fit_detectors(p.config, train, dev)
