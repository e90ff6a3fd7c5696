"""A run: every seed of a config trained into one folder, resumably.

    RUN/config.yaml                the run's config (all seeds)
    RUN/summary.json               mean and std over the seeds, per split and metric
    RUN/seed_<s>/                  one seed: config.yaml, model.pt (best checkpoint),
                                   model_spec.json + encoder/ (reload without the dataset),
                                   metrics.json (written last: the seed is finished),
                                   predictions.csv, outputs_<split>.npz, figures (PDF + PNG);
                                   train_state.pt while it trains (resume)

Re-running the same command on the same folder skips finished seeds and resumes an
interrupted one. A folder holding a run of another configuration is refused with the
settings that differ (`overwrite=True` replaces it); nothing is silently clobbered.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from amess.config import Config
from amess.training.artifacts import summarise, write_json, write_predictions, write_seed_plots
from amess.training.data import (PreparedData, load_descriptions_for, make_collator, prepare_data,
                                 text_max_len)
from amess.training.distributed import make_accelerator
from amess.training.evaluation import EvalResult, evaluate_ood, predict_split, split_metrics
from amess.training.loop import CHECKPOINT_FILE, STATE_FILE, TrainingError, check_parameters, fit
from amess.training.memory import set_mmap_threshold
from amess.training.spec import ENCODER_DIR, SPEC_FILE, build_spec

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
RESULT_NEUTRAL = (("train", "progress"), ("train", "threads"), ("data", "num_workers"), ("train", "plots"),
                  ("train", "mmap_threshold_kb"), ("train", "compile"))
"""Config entries that cannot change a result: ignored when a folder's run is compared."""


class RunFolderError(ValueError):
    """An output folder that cannot take this run (another config, a file, foreign files)."""


def comparable(cfg: Config, *, seeds: bool = False) -> dict:
    """The config as a dict without the result-neutral entries, the settings of methods
    other than the run's own (they cannot change its result), and the seeds."""
    d = cfg.to_dict()
    for name in list(cfg.methods):
        if name != cfg.model.method:
            d.pop(name, None)
    for section, key in RESULT_NEUTRAL + (() if seeds else (("train", "seeds"),)):
        d[section].pop(key, None)
    return d


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every entry that differs between two config dicts."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


RUN_FILE = "run.json"
"""The run's data fingerprint (and the toolkit version), beside config.yaml."""
LOCK_FILE = ".lock"
"""Held (flock) by the process training into a run folder; released when it ends or dies."""


@contextlib.contextmanager
def run_lock(out_dir: Path):
    """Hold `out_dir/.lock` for the duration, so that two processes never train into the same
    folder (their seeds and summaries would mix). The lock is the kernel's (`flock`): a
    killed process leaves the file but not the lock, and a rerun proceeds."""
    import fcntl
    import os

    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"--out {out_dir}: is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunFolderError(f"--out {out_dir}: another amess process (pid {other}) is training into it; "
                                 "wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def data_fingerprint(cfg: Config) -> str:
    """The fingerprint of the data this run reads (`amess.data.fingerprint`; the feature
    files of modalities the method does not read do not count)."""
    from dataclasses import replace

    from amess.data import fingerprint
    from amess.training.data import read_modalities

    return fingerprint(replace(cfg.data, modalities=read_modalities(cfg)))


def saved_fingerprint(run_dir: Path) -> str | None:
    import json

    try:
        return json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8")).get("data_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def check_out_dir(cfg: Config, out_dir: Path, *, overwrite: bool = False, fingerprint: str | None = None) -> None:
    """Refuse an output folder that holds another run (naming what differs: settings or the
    data), a file, or files that are not a run; with `overwrite`, remove the earlier run's
    files first."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"--out {out_dir}: is a file, not a folder")
    if not out_dir.is_dir() or not any(p.name != LOCK_FILE for p in out_dir.iterdir()):
        return
    saved_path = out_dir / "config.yaml"
    if not saved_path.is_file():
        if overwrite:
            raise RunFolderError(f"--out {out_dir}: holds files that are not an amess run; not removed even with "
                                 "--overwrite: choose an empty or new folder")
        raise RunFolderError(f"--out {out_dir}: holds files that are not an amess run; choose an empty or new folder")
    if overwrite:
        log.warning("--overwrite: removing the earlier run in %s", out_dir)
        for p in out_dir.iterdir():
            if p.is_dir() and p.name.startswith("seed_"):
                shutil.rmtree(p)
            elif p.name in ("config.yaml", "summary.json", RUN_FILE):
                p.unlink()
        return
    try:
        saved = Config.load(saved_path)
    except ValueError as e:
        raise RunFolderError(f"--out {out_dir}: its config.yaml is unreadable ({e}); use another --out, or "
                             "--overwrite to replace that run") from None
    diff = config_diff(comparable(saved), comparable(cfg))
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise RunFolderError(f"--out {out_dir}: holds a run with a different configuration ({shown}); use another "
                             "--out, or --overwrite to replace it")
    old_fp = saved_fingerprint(out_dir)
    if fingerprint is not None and old_fp is not None and old_fp != fingerprint:
        raise RunFolderError(f"--out {out_dir}: holds a run on other data (the data fingerprint changed from "
                             f"{old_fp[:12]} to {fingerprint[:12]}: a TSV or feature file was edited since); use "
                             "another --out, or --overwrite to replace it")


def holds_other_run(run_dir: Path, cfg: Config) -> bool:
    """Whether `run_dir` holds a run of another configuration (seeds aside). Callers that own
    their folders (ablation rows, the demo) replace such a run; one of the same
    configuration is extended or resumed instead."""
    try:
        if comparable(Config.load(run_dir / "config.yaml")) != comparable(cfg):
            return True
    except (FileNotFoundError, ValueError):
        return (run_dir / "config.yaml").exists()
    old_fp = saved_fingerprint(run_dir)
    return old_fp is not None and old_fp != data_fingerprint(cfg)


def peak_rss_mib() -> float:
    """The process's peak resident memory so far, MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def seed_finished(seed_dir: Path) -> bool:
    return (seed_dir / METRICS_FILE).is_file() and (seed_dir / SPEC_FILE).is_file()


def build_model(cfg: Config, data: PreparedData, descriptions: list[str] | None):
    """The method's model around a freshly loaded pretrained encoder (with the parts the
    method asks for)."""
    from amess.models import build_model as _build
    from amess.models import method_class
    from amess.models.encoders import load_text_encoder

    encoder = load_text_encoder(cfg.model.text_encoder, parts=method_class(cfg.model.method).encoder_parts)
    model = _build(cfg.model.method, config=cfg, encoder=encoder, num_labels=len(data.label_names),
                   video_dim=data.video_dim, audio_dim=data.audio_dim, label_names=data.label_names,
                   descriptions=descriptions)
    return model, encoder


def setup_seed(cfg: Config, seed: int):
    """Data, descriptions, model and collator for one seed (seeded). Returns
    `(data, model, collator, descriptions)`."""
    from accelerate.utils import set_seed

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_mmap_threshold(cfg.train.mmap_threshold_kb)
    set_seed(seed)
    data = prepare_data(cfg, seed)
    descriptions = load_descriptions_for(cfg, data.reader, data.label_names)
    set_seed(seed)  # model init independent of how much randomness data preparation used
    model, encoder = build_model(cfg, data, descriptions)
    collator = make_collator(cfg, encoder.tokenizer, text_max_len=text_max_len(cfg, data.reader),
                             video_dim=data.video_dim, audio_dim=data.audio_dim)
    return data, model, collator, descriptions


def load_checkpoint(model, path: Path) -> None:
    """Load `model.pt` (tensors only, never arbitrary objects) and check it: a truncated,
    corrupt, mismatched or non-finite checkpoint is a one-line error naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint missing") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a broken file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(f"{path}: not a readable checkpoint (truncated, corrupt or not a tensor state: "
                            f"{first[:200]})") from None
    if not isinstance(state, dict):
        raise TrainingError(f"{path}: not a model state (a dict of tensors expected, got {type(state).__name__})")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise TrainingError(f"{path}: does not fit the model it belongs to ({str(e).splitlines()[0][:300]})") from None
    check_parameters(model, str(path))


def open_intent_info(cfg: Config, data: PreparedData) -> dict:
    """Which intents this seed knew under `data.known_ratio` (empty without it): recorded in
    metrics.json and model_spec.json."""
    if data.known_labels is None:
        return {}
    return {"known_ratio": cfg.data.known_ratio, "known_labels": list(data.known_labels),
            "unknown_labels": data.unknown_labels, "all_labels": list(data.all_label_names or [])}


def train_seed(cfg: Config, seed: int, seed_dir: Path, accelerator=None) -> dict:
    """Train one seed into `seed_dir` (resuming from its training state when there is
    one); returns `{split: metrics}` of the best checkpoint."""
    accelerator = accelerator or make_accelerator(cfg)
    main = accelerator.is_main_process
    data, model, collator, descriptions = setup_seed(cfg, seed)
    max_len = collator.text_max_len
    if main:
        seed_dir.mkdir(parents=True, exist_ok=True)
        cfg.override({"train.seeds": f"[{seed}]"}).save(seed_dir / "config.yaml")
        model.encoder.save_architecture(seed_dir / ENCODER_DIR)
    accelerator.wait_for_everyone()
    model, fr = fit(cfg, seed, model, data, collator, accelerator, seed_dir)
    load_checkpoint(accelerator.unwrap_model(model), seed_dir / CHECKPOINT_FILE)
    C = len(data.label_names)
    results: dict[str, EvalResult] = {}
    infer_rows, infer_seconds = 0, 0.0
    for name, split in [("train", data.train), (data.dev_key, data.dev)] + list(data.tests.items()):
        t = time.perf_counter()
        results[name] = predict_split(model, split, name, cfg, collator, accelerator, seed)
        if name != "train":  # evaluation throughput, data loading included
            infer_rows, infer_seconds = infer_rows + len(results[name].ids), infer_seconds + time.perf_counter() - t
    metrics = {name: split_metrics(r, C, data.label_names, cfg.data.holdout_labels)
               for name, r in results.items() if name != "train"}
    detectors, ood_scores = evaluate_ood(cfg, results, data.dev_key, list(data.tests), metrics)
    if main:
        inner = accelerator.unwrap_model(model)
        for name, r in results.items():
            r.save(seed_dir / f"outputs_{name}.npz")
        write_predictions(seed_dir / "predictions.csv", [r for n, r in results.items() if n != "train"],
                          data.label_names)
        if cfg.train.plots:
            report = next(iter(data.tests), data.dev_key)
            write_seed_plots(seed_dir, fr.history, cfg.train.monitor, results[report],
                             (data.tests.get(report) or data.dev).samples, data.label_names, seed, ood_scores,
                             inner.diagnostics, max_len)
        write_json(seed_dir / SPEC_FILE, build_spec(cfg, data, inner.encoder, descriptions, detectors, seed, max_len))
        info = {"seed": seed, "best_epoch": fr.best_epoch, "epochs_run": len(fr.history), "steps": fr.steps,
                "resumed_after_epoch": fr.resumed_from_epoch, "train_seconds": round(fr.train_seconds, 2),
                "train_samples_per_second": round(fr.samples_seen / max(fr.train_seconds, 1e-9), 2),
                "inference_samples_per_second": round(infer_rows / max(infer_seconds, 1e-9), 2),
                "parameters": sum(p.numel() for p in inner.parameters()),
                "trainable_parameters": sum(p.numel() for p in inner.parameters() if p.requires_grad),
                "peak_rss_mib": peak_rss_mib(),
                "label_names": data.label_names, **open_intent_info(cfg, data), "history": fr.history,
                "metrics": metrics}
        write_json(seed_dir / METRICS_FILE, info)  # last: the seed is finished
        (seed_dir / STATE_FILE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return metrics


def run(cfg: Config, out_dir: str | Path, *, overwrite: bool = False) -> dict:
    """Train every seed of `cfg` into `out_dir/seed_<s>/` and write `summary.json`.
    Finished seeds are reused; an interrupted one resumes; a folder another process is
    training into is refused (`run_lock`)."""
    out_dir = Path(out_dir)
    accelerator = make_accelerator(cfg)
    with run_lock(out_dir) if accelerator.is_main_process else contextlib.nullcontext():
        return _run_locked(cfg, out_dir, accelerator, overwrite=overwrite)


def _run_locked(cfg: Config, out_dir: Path, accelerator, *, overwrite: bool) -> dict:
    import json

    if accelerator.is_main_process:
        fp = data_fingerprint(cfg)
        check_out_dir(cfg, out_dir, overwrite=overwrite, fingerprint=fp)
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")
        from amess import __version__

        write_json(out_dir / RUN_FILE, {"data_fingerprint": fp, "amess_version": __version__})
    accelerator.wait_for_everyone()
    per_seed = {}
    for seed in cfg.train.seeds:
        seed_dir = out_dir / f"seed_{seed}"
        if seed_finished(seed_dir):
            log.info("seed %d: finished earlier in %s; reused", seed, seed_dir)
            per_seed[seed] = json.loads((seed_dir / METRICS_FILE).read_text(encoding="utf-8"))["metrics"]
            continue
        per_seed[seed] = train_seed(cfg, seed, seed_dir, accelerator)
    summary = summarise(per_seed)
    if accelerator.is_main_process:
        write_json(out_dir / "summary.json", summary)
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.end_training()  # destroys the process group: an orderly gloo/NCCL shutdown
    return summary
