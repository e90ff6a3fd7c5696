"""Evaluate a finished run folder: rebuild each seed's model from its `config.yaml`, load
`model.pt`, score a split, and merge the split's figures into `summary.json` (with the
run's out-of-scope detectors, refitted on the saved training and dev outputs)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from amess.config import Config
from amess.train import (EvalResult, build_model, evaluate_ood, load_descriptions_for, make_accelerator,
                         make_collator, make_loader, predict, prepare_data, prepare_model, split_metrics, summarise)

log = logging.getLogger(__name__)


def evaluate_run(run_dir: Path, split: str) -> dict:
    seed_dirs = sorted(p for p in run_dir.glob("seed_*") if (p / "model.pt").is_file())
    if not seed_dirs:
        raise FileNotFoundError(f"{run_dir}: no seed_*/model.pt found (is this an `amess train` run folder?)")
    per_seed = {}
    accelerator = None
    for sd in seed_dirs:
        cfg = Config.load(sd / "config.yaml")
        accelerator = accelerator or make_accelerator(cfg)
        seed = cfg.train.seeds[0]
        cfg = cfg.override({"data.test_splits": [split]})
        data = prepare_data(cfg, seed)
        if split not in data.tests and split != data.dev_key:
            raise FileNotFoundError(f"{data.reader.data_dir}: split {split!r} not found")
        model, encoder = build_model(cfg, data, load_descriptions_for(cfg, data.reader, data.label_names))
        model.load_state_dict(torch.load(sd / "model.pt", map_location="cpu", weights_only=True))
        collator = make_collator(cfg, data, encoder.tokenizer)
        target = data.tests.get(split, data.dev)
        loader = make_loader(target, cfg, collator, shuffle=False, seed=seed, batch_size=cfg.train.eval_batch_size)
        model, loader = prepare_model(model, accelerator), accelerator.prepare(loader)
        res = predict(model, loader, accelerator, split)
        m = split_metrics(res, len(data.label_names), data.label_names, cfg.data.holdout_labels)
        per_seed[seed] = {split: m}
        saved = {name: sd / f"outputs_{name}.npz" for name in ("train", data.dev_key)}
        if cfg.ood.detectors and split in data.tests and all(p.is_file() for p in saved.values()):
            # detectors are fitted on the saved training outputs and tuned on the saved dev ones
            results = {name: EvalResult.load(p, name) for name, p in saved.items()} | {split: res}
            evaluate_ood(cfg, results, data, per_seed[seed])
        if accelerator.is_main_process:
            res.save(sd / f"outputs_{split}.npz")
            (sd / f"metrics_{split}.json").write_text(json.dumps(m, indent=2))
    summary = summarise(per_seed)
    if accelerator.is_main_process:
        path = run_dir / "summary.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        old[split] = summary[split]
        path.write_text(json.dumps(old, indent=2))
    return summary
