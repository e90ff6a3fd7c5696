"""The one training loop, for every method.

`run(cfg, out_dir)` trains one model per seed and writes, per seed folder, the resolved
`config.yaml`, `metrics.json`, `predictions.csv`, `outputs_<split>.npz` (logits and
representations, for OOD detectors and plots), the best checkpoint `model.pt`, and the
training-curve and confusion-matrix PNGs; then `summary.json` with mean and std over
seeds. The loop runs as one process or data-parallel under `torchrun` / `accelerate
launch` (Hugging Face accelerate; only the main process writes files).

The loop knows nothing about a method beyond `model(batch)`, `model.loss(out, batch)`,
`model.param_groups(...)` and `model.predict_scores(out)`.
"""

from __future__ import annotations

import csv
import ctypes
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from amess.config import Config
from amess.data import DataError, IntentDataset, SplitData, get_reader
from amess.data.base import DatasetReader, stratified_holdout
from amess.data.batch import Collator
from amess.losses import outlier_exposure
from amess.metrics import classification_metrics, mean_std

log = logging.getLogger(__name__)
_M_MMAP_THRESHOLD = -3
"""mallopt parameter number of M_MMAP_THRESHOLD in glibc's malloc.h."""

HOLDOUT_KEY = "train_holdout"


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

    @property
    def preds(self) -> np.ndarray:
        return self.scores.argmax(-1)

    def save(self, path: Path) -> None:
        np.savez_compressed(path, ids=np.array(self.ids), labels=self.labels, scores=self.scores,
                            logits=self.logits, pooled=self.pooled,
                            **{f"extra_{k}": v for k, v in self.extras.items()},
                            **{f"shared_{k}": v for k, v in self.shared.items()})

    @classmethod
    def load(cls, path: Path, split: str) -> "EvalResult":
        with np.load(path, allow_pickle=False) as z:
            extras = {k[6:]: z[k] for k in z.files if k.startswith("extra_")}
            shared = {k[7:]: z[k] for k in z.files if k.startswith("shared_")}
            return cls(split=split, ids=[str(i) for i in z["ids"]], labels=z["labels"], scores=z["scores"],
                       logits=z["logits"], pooled=z["pooled"], extras=extras, shared=shared)

    def bundle(self):
        """The outputs an OOD detector reads."""
        from amess.ood import OutputBundle

        return OutputBundle(logits=self.logits, features=self.pooled, labels=self.labels,
                            desc_sims=self.extras.get("desc_sims"))


# --- data ---------------------------------------------------------------------------

@dataclass
class PreparedData:
    reader: DatasetReader
    label_names: list[str]
    train: SplitData
    dev: SplitData
    dev_key: str
    tests: dict[str, SplitData]
    video_dim: int | None
    audio_dim: int | None


def prepare_data(cfg: Config, seed: int) -> PreparedData:
    """Read the splits the config names; hold back a dev slice of train when asked
    (`dev_split: train:0.1`); drop held-out intents from train and dev.

    Feature files are loaded only for the modalities the method reads (`IntentModel.reads`):
    the `text` baseline on an all-modality config never holds video or audio in memory."""
    from amess.models import method_class

    reads = method_class(cfg.model.method).reads
    data_cfg = cfg.data
    unread = [m for m in data_cfg.modalities if m not in reads]
    if unread:
        log.info("method %r does not read %s: those features are not loaded", cfg.model.method, ", ".join(unread))
        data_cfg = replace(data_cfg, modalities=[m for m in data_cfg.modalities if m in reads])
    reader = get_reader(data_cfg)
    label_names = reader.label_names
    available = reader.available_splits()
    holdout_frac = None
    dev_split = cfg.data.dev_split
    if dev_split.startswith(f"{cfg.data.train_split}:"):
        holdout_frac = float(dev_split.split(":", 1)[1])
        dev_split = None
    wanted = [cfg.data.train_split] + ([dev_split] if dev_split else [])
    tests = []
    for s in cfg.data.test_splits:
        if s in available:
            tests.append(s)
        else:
            log.warning("split %r not found in %s; skipped", s, reader.data_dir)
    for s in wanted:
        if s not in available:
            raise DataError(f"{reader.split_file(s)}: split {s!r} is needed for training but missing")
    splits = reader.load(list(dict.fromkeys(wanted + tests)))
    train = splits[cfg.data.train_split]
    if holdout_frac is not None:
        keep, held = stratified_holdout(train.samples, holdout_frac, seed)
        dev = replace(train, name=HOLDOUT_KEY, samples=held)
        train = replace(train, samples=keep)
        dev_key = HOLDOUT_KEY
    else:
        dev, dev_key = splits[dev_split], "dev"
    C = len(label_names)
    if not cfg.ood.outlier_exposure:  # out-of-scope rows only serve training through outlier exposure
        train = replace(train, samples=[s for s in train.samples if s.label < C])
    if cfg.data.holdout_labels:
        unknown = [n for n in cfg.data.holdout_labels if n not in label_names]
        if unknown:
            raise ValueError(f"--holdout-labels {unknown} are not labels of {cfg.data.dataset}: {label_names}")
        held_ids = {label_names.index(n) for n in cfg.data.holdout_labels}
        train = replace(train, samples=[s for s in train.samples if s.label not in held_ids])
        dev = replace(dev, samples=[s for s in dev.samples if s.label not in held_ids])
    return PreparedData(
        reader=reader, label_names=label_names, train=train, dev=dev, dev_key=dev_key,
        tests={s: splits[s] for s in tests},
        video_dim=train.video.dim if train.video is not None else None,
        audio_dim=train.audio.dim if train.audio is not None else None,
    )


def load_descriptions_for(cfg: Config, reader: DatasetReader, label_names: list[str]) -> list[str] | None:
    """Label descriptions for SS and description-based inference: the configured file, else
    the set shipped for the dataset; None when no shipped set exists."""
    from amess.labels import load_descriptions, shipped_sets

    source = cfg.data.label_descriptions or reader.descriptions_set
    if cfg.data.label_descriptions is None and source not in shipped_sets():
        return None
    return load_descriptions(source, label_names)


def make_loader(split: SplitData, cfg: Config, collator: Collator, *, shuffle: bool, seed: int,
                batch_size: int) -> DataLoader:
    ds = IntentDataset(split)  # frames come truncated from the feature source
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=g,
                      num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)


# --- model ------------------------------------------------------------------------------

def build_model(cfg: Config, data: PreparedData, descriptions: list[str] | None):
    from amess.models import build_model as _build
    from amess.models.encoders import load_text_encoder

    encoder = load_text_encoder(cfg.model.text_encoder)
    model = _build(cfg.model.method, config=cfg, encoder=encoder, num_labels=len(data.label_names),
                   video_dim=data.video_dim, audio_dim=data.audio_dim, label_names=data.label_names,
                   descriptions=descriptions)
    return model, encoder


def make_collator(cfg: Config, data: PreparedData, tokenizer) -> Collator:
    return Collator(tokenizer, text_max_len=cfg.data.text_max_len or data.reader.spec.text_max_len,
                    video_dim=data.video_dim, audio_dim=data.audio_dim)


# --- evaluation -------------------------------------------------------------------------

@torch.no_grad()
def predict(model, loader: DataLoader, accelerator, split: str) -> EvalResult:
    """Run the model over a loader; gathers across processes (duplicates from uneven
    sharding dropped by accelerate's `gather_for_metrics`)."""
    model.eval()
    ids, labels, scores, logits, pooled = [], [], [], [], []
    extras: dict[str, list] = {}
    shared: dict[str, np.ndarray] = {}
    for batch in loader:
        batch = batch.to(accelerator.device)
        with accelerator.autocast():
            out = model(batch)
            sc = accelerator.unwrap_model(model).predict_scores(out)
        row = {"labels": batch.labels, "scores": sc.float(), "logits": out.logits.float(), "pooled": out.pooled.float()}
        row.update({f"x_{k}": v.float() if v.is_floating_point() else v for k, v in out.extras.items()
                    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == len(batch)})
        row = accelerator.gather_for_metrics(row)
        if not shared:  # batch-independent (e.g. description embeddings): convert once
            shared = {k: v.detach().float().cpu().numpy() for k, v in out.shared.items()}
        ids.extend(batch.ids if accelerator.num_processes == 1 else _gather_ids(batch.ids, accelerator))
        labels.append(row["labels"].cpu().numpy())
        scores.append(row["scores"].cpu().numpy())
        logits.append(row["logits"].cpu().numpy())
        pooled.append(row["pooled"].cpu().numpy())
        for k, v in row.items():
            if k.startswith("x_"):
                extras.setdefault(k[2:], []).append(v.cpu().numpy())
    model.train()
    cat = lambda xs: np.concatenate(xs, 0)  # noqa: E731
    return EvalResult(split=split, ids=ids[: sum(len(x) for x in labels)], labels=cat(labels), scores=cat(scores),
                      logits=cat(logits), pooled=cat(pooled),
                      extras={k: _cat_ragged(v) for k, v in extras.items()}, shared=shared)


def _gather_ids(ids: list[str], accelerator) -> list[str]:
    from accelerate.utils import gather_object

    return gather_object(list(ids))


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
    accuracy on seen / unseen intents when intents were held out."""
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


# --- training ---------------------------------------------------------------------------

def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # one process may train several configurations (ablations, the demo, tests) whose
    # precision differs; the process group itself (PartialState) is kept
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision="no" if cfg.train.precision == "fp32" else cfg.train.precision,
                       cpu=not torch.cuda.is_available())


def prepare_model(model, accelerator):
    """Place the model on the process's device; with several processes, start every rank
    from rank 0's weights.

    The model is not wrapped in DistributedDataParallel: A-MESS runs the shared encoder
    several times per step (fused text, text view, descriptions) and leaves parameters idle
    in some configurations, which DDP's reducer does not allow (and its static-graph mode
    was seen to let ranks drift apart). Gradients are averaged by `sync_gradients` instead.
    """
    model = model.to(accelerator.device)
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    return model


def sync_gradients(model, accelerator) -> None:
    """Average gradients over processes with one flat all-reduce (missing grads count as 0)."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        p.grad = g


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    steps: int
    train_seconds: float
    samples_seen: int


def train_step(cfg: Config, model, batch, optimizer, sched, accelerator, num_labels: int) -> float:
    """One optimiser step on one batch; returns the loss. Used by `fit` and the benchmarks."""
    batch = batch.to(accelerator.device)
    with accelerator.autocast():
        out = model(batch)
        loss, _parts = accelerator.unwrap_model(model).loss(out, batch)
        if cfg.ood.outlier_exposure:
            loss = loss + cfg.ood.oe_weight * outlier_exposure(out.logits[batch.labels >= num_labels])
    accelerator.backward(loss)
    sync_gradients(model, accelerator)
    if cfg.train.grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    sched.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def make_optimizer(cfg: Config, model, total_steps: int):
    """AdamW (no decay on biases and norms, fused kernel) with linear warm-up then linear decay."""
    groups = model.param_groups(cfg.train.lr, cfg.train.weight_decay, cfg.train.encoder_lr)
    # the fused kernel does the same update in one pass over each tensor: on 2 CPU cores it
    # cut the optimiser step of MiniLM from 66 to 16 ms (BENCHMARKS.md)
    optimizer = torch.optim.AdamW(groups, fused=True)
    warm = int(cfg.train.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total_steps - s) / max(1, total_steps - warm)))
    return optimizer, sched


def fit(cfg: Config, seed: int, model, data: PreparedData, collator: Collator, accelerator, ckpt: Path):
    """AdamW with linear warm-up and decay, early stopping on `train.monitor` over the dev
    split, the best state saved to `ckpt` by the main process. Returns the prepared model
    (still holding the *last* epoch's weights) and a `FitResult`."""
    from tqdm.auto import tqdm

    main = accelerator.is_main_process
    train_loader = make_loader(data.train, cfg, collator, shuffle=True, seed=seed, batch_size=cfg.train.batch_size)
    dev_loader = make_loader(data.dev, cfg, collator, shuffle=False, seed=seed, batch_size=cfg.train.eval_batch_size)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    optimizer, sched = make_optimizer(cfg, model, total)
    model = prepare_model(model, accelerator)
    optimizer, train_loader, dev_loader, sched = accelerator.prepare(optimizer, train_loader, dev_loader, sched)
    C = len(data.label_names)
    best, best_epoch, bad, step, n_seen, history = -math.inf, -1, 0, 0, 0, []
    t_start = time.perf_counter()
    for epoch in range(1, cfg.train.epochs + 1):
        model.train()
        losses = []
        bar = tqdm(train_loader, desc=f"seed {seed} epoch {epoch}", disable=not (main and cfg.train.progress),
                   leave=False)
        for batch in bar:
            losses.append(train_step(cfg, model, batch, optimizer, sched, accelerator, C))
            n_seen += len(batch) * accelerator.num_processes
            step += 1
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
                break
        dev_m = split_metrics(predict(model, dev_loader, accelerator, data.dev_key), C, data.label_names)
        score = dev_m[cfg.train.monitor]
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                        "dev": dev_m, "step": step, "seconds": round(time.perf_counter() - t_start, 3)})
        improved = score > best
        if improved:
            best, best_epoch, bad = score, epoch, 0
            if main:
                torch.save(accelerator.unwrap_model(model).state_dict(), ckpt)
        else:
            bad += 1
        log.info("seed %d epoch %d: train loss %.4f, %s %s = %.2f%%%s", seed, epoch, history[-1]["train_loss"],
                 data.dev_key, cfg.train.monitor, 100 * score, " (best)" if improved else "")
        if bad >= cfg.train.patience or (cfg.train.max_steps is not None and step >= cfg.train.max_steps):
            break
    accelerator.wait_for_everyone()
    return model, FitResult(history, best_epoch, step, time.perf_counter() - t_start, n_seen)


def set_mmap_threshold(kb: int | None) -> bool:
    """Fix glibc's mmap threshold at `kb` KiB (`TrainConfig.mmap_threshold_kb`); True if set.
    A no-op off glibc, for None, or when MALLOC_MMAP_THRESHOLD_ is in the environment."""
    if kb is None or os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(kb) * 1024))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def setup_seed(cfg: Config, seed: int):
    """Data, descriptions, model and collator for one seed (seeded)."""
    from accelerate.utils import set_seed

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_mmap_threshold(cfg.train.mmap_threshold_kb)
    set_seed(seed)
    data = prepare_data(cfg, seed)
    descriptions = load_descriptions_for(cfg, data.reader, data.label_names)
    set_seed(seed)  # model init independent of how much randomness data preparation used
    model, encoder = build_model(cfg, data, descriptions)
    return data, model, make_collator(cfg, data, encoder.tokenizer)


def train_seed(cfg: Config, seed: int, seed_dir: Path, accelerator=None) -> dict:
    """Train one seed into `seed_dir`; returns `{split: metrics}` of the best checkpoint."""
    from amess import plots

    accelerator = accelerator or make_accelerator(cfg)
    main = accelerator.is_main_process
    data, model, collator = setup_seed(cfg, seed)
    if main:
        seed_dir.mkdir(parents=True, exist_ok=True)
        cfg.override({"train.seeds": f"[{seed}]"}).save(seed_dir / "config.yaml")
    accelerator.wait_for_everyone()
    ckpt = seed_dir / "model.pt"
    model, fr = fit(cfg, seed, model, data, collator, accelerator, ckpt)
    # best checkpoint, then every split
    accelerator.unwrap_model(model).load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    C = len(data.label_names)
    results: dict[str, EvalResult] = {}
    for name, split in [("train", data.train), (data.dev_key, data.dev)] + list(data.tests.items()):
        loader = accelerator.prepare(make_loader(split, cfg, collator, shuffle=False, seed=seed,
                                                 batch_size=cfg.train.eval_batch_size))
        results[name] = predict(model, loader, accelerator, name)
    metrics = {name: split_metrics(r, C, data.label_names, cfg.data.holdout_labels)
               for name, r in results.items() if name != "train"}
    ood_scores = evaluate_ood(cfg, results, data, metrics)
    if main:
        for name, r in results.items():
            r.save(seed_dir / f"outputs_{name}.npz")
        write_predictions(seed_dir / "predictions.csv", [r for n, r in results.items() if n != "train"],
                          data.label_names)
        info = {"seed": seed, "best_epoch": fr.best_epoch, "epochs_run": len(fr.history), "steps": fr.steps,
                "train_seconds": round(fr.train_seconds, 2),
                "train_samples_per_second": round(fr.samples_seen / max(fr.train_seconds, 1e-9), 2),
                "label_names": data.label_names, "history": fr.history, "metrics": metrics}
        (seed_dir / "metrics.json").write_text(json.dumps(info, indent=2))
        if cfg.train.plots:
            import matplotlib.pyplot as plt

            plots.training_curve(fr.history, cfg.train.monitor).savefig(seed_dir / "training_curve.png", dpi=110)
            report = next(iter(data.tests), data.dev_key)
            r = results[report]
            plots.confusion_matrix(r.labels, r.preds, data.label_names, title=f"{report} (seed {seed})").savefig(
                seed_dir / "confusion_matrix.png", dpi=110)
            learned = cfg.model.method == "amess" and cfg.amess.anchor_mode == "learned"
            inserted = cfg.amess.num_anchors if learned else 0
            write_method_plots(seed_dir, results[report], (data.tests.get(report) or data.dev).samples,
                               data.label_names, collator, seed, inserted_anchors=inserted)
            for det, (scores, is_in, thr) in ood_scores.items():
                plots.score_distributions(scores, is_in, title=f"{det} on {report} (seed {seed})",
                                          threshold=thr).savefig(seed_dir / f"ood_scores_{det}.png", dpi=110)
            plt.close("all")
    return metrics


def write_method_plots(seed_dir: Path, res: EvalResult, samples, label_names: list[str], collator: Collator,
                       seed: int, n_anchor_examples: int = 6, inserted_anchors: int = 0) -> None:
    """Plots of what a method exposes: a 2-D projection of the shared-space embeddings with
    the label descriptions marked (`embeddings.png`), and which tokens were chosen as
    anchors for a few samples (`anchors.png`). `inserted_anchors` learned anchor slots sit
    after [CLS] (A-MESS `learned` mode) and are drawn there as `[anchor]`."""
    from amess import plots

    if "z_m" in res.extras:
        plots.embedding_projection(res.extras["z_m"], res.labels, res.shared.get("desc_emb"), label_names,
                                   seed=seed).savefig(seed_dir / "embeddings.png", dpi=110)
    if "anchor_index" in res.extras and (res.extras["anchor_index"] >= 0).any():
        tok = collator.tokenizer
        names = label_names + ["UNK"]
        picked = samples[:n_anchor_examples]
        tokens = [tok.convert_ids_to_tokens(tok(s.text, s.context, truncation=True,
                                                max_length=collator.text_max_len)["input_ids"]) for s in picked]
        tokens = [t[:1] + ["[anchor]"] * inserted_anchors + t[1:] for t in tokens]
        anchors = [[int(a) for a in row if a >= 0] for row in res.extras["anchor_index"][: len(picked)]]
        titles = [f"{s.id} (gold {names[s.label]}, predicted {names[int(p)]})" for s, p in zip(picked, res.preds)]
        plots.anchor_tokens(tokens, anchors, titles).savefig(seed_dir / "anchors.png", dpi=110)


def evaluate_ood(cfg: Config, results: dict[str, EvalResult], data: PreparedData, metrics: dict) -> dict:
    """Fit each configured detector on the training outputs, tune its threshold on dev,
    and score every test split; figures go to `metrics[split]["ood"][detector]`. Returns the
    first test split's scores per detector, for the score-distribution plots."""
    from amess.ood import build_detector, evaluate_detector

    plotted: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    if not cfg.ood.detectors:
        return plotted
    train, dev = results["train"].bundle(), results[data.dev_key].bundle()
    detectors = list(cfg.ood.detectors)
    if "desc_sim" in detectors and train.desc_sims is None:
        log.warning("ood detector desc_sim skipped: method %r gives no similarities to label descriptions",
                    cfg.model.method)
        detectors.remove("desc_sim")
    for split in data.tests:
        test = results[split].bundle()
        for name in detectors:
            det = build_detector(name)
            m = evaluate_detector(det, train, dev, test, metric=cfg.ood.tune_metric)
            metrics[split].setdefault("ood", {})[name] = m
            if split == next(iter(data.tests)):
                plotted[name] = (det.score(test), test.in_scope_mask(), m["threshold"])
    return plotted


def write_predictions(path: Path, results: list[EvalResult], label_names: list[str]) -> None:
    """One row per sample and split: id, gold and predicted label names, per-class probabilities."""
    names = label_names + ["UNK"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["split", "id", "gold", "pred"] + [f"p_{n}" for n in label_names])
        for r in results:
            for i, sid in enumerate(r.ids):
                w.writerow([r.split, sid, names[min(int(r.labels[i]), len(label_names))],
                            names[int(r.preds[i])]] + [f"{p:.5f}" for p in r.scores[i]])


def summarise(per_seed: dict[int, dict]) -> dict:
    """`{split: {metric: {mean, std, n}}}` over seeds; nested groups (`ood.<detector>`) keep
    their nesting."""

    def merge(dicts: list[dict]) -> dict:
        keys = sorted({k for d in dicts for k in d})
        out = {}
        for k in keys:
            vals = [d[k] for d in dicts if k in d]
            out[k] = merge(vals) if isinstance(vals[0], dict) else mean_std([float(v) for v in vals])
        return out

    out = merge(list(per_seed.values()))
    out["seeds"] = sorted(per_seed)
    return out


def run(cfg: Config, out_dir: str | Path) -> dict:
    """Train every seed of `cfg` into `out_dir/seed_<s>/` and write `summary.json`."""
    out_dir = Path(out_dir)
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")
    per_seed = {}
    for seed in cfg.train.seeds:
        per_seed[seed] = train_seed(cfg, seed, out_dir / f"seed_{seed}", accelerator)
    summary = summarise(per_seed)
    if accelerator.is_main_process:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.end_training()  # destroys the process group: an orderly gloo/NCCL shutdown
    return summary


def format_table(rows: dict[str, dict], split: str, keys: tuple[str, ...] = ("acc", "f1_macro", "precision_macro",
                                                                          "recall_macro", "f1_weighted")) -> str:
    """A markdown table, percentages with two decimals: `rows` maps a row name to a summary."""
    head = "| run | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for name, summ in rows.items():
        m = summ.get(split, {})
        cells = []
        for k in keys:
            if k in m:
                cells.append(f"{100 * m[k]['mean']:.2f} ± {100 * m[k]['std']:.2f}")
            else:
                cells.append("–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
