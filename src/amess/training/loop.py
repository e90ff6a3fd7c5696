"""The one training loop, for every method.

`fit` runs AdamW with linear warm-up and decay and early stopping on a dev metric. It
knows nothing about a method beyond `model(batch)`, `model.loss(out, batch)` and
`model.param_groups(...)`; evaluation reads `predict_scores` / `decision_logits`.

Every epoch it writes the whole training state atomically to `train_state.pt` (model,
optimiser, scheduler, step, best score, patience counter, history, every RNG state), so a
killed run continues where it stopped and, on a CPU, ends with the same metrics as one
that was never interrupted. A non-finite loss or parameter stops the run with an error:
no checkpoint, metrics or summary from a broken model.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amess.config import Config
from amess.losses import outlier_exposure
from amess.training.artifacts import torch_save
from amess.training.data import PreparedData, make_loader
from amess.training.distributed import broadcast_flag, prepare_model, sync_gradients
from amess.training.evaluation import predict, split_metrics

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
CHECKPOINT_FILE = "model.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or parameter): nothing is written as a result."""


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    steps: int
    train_seconds: float
    samples_seen: int
    resumed_from_epoch: int = 0


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


def train_step(cfg: Config, model, batch, optimizer, sched, accelerator, num_labels: int) -> float:
    """One optimiser step on one batch; returns the loss. Used by `fit` and the benchmarks.
    A non-finite loss (on any process) raises `TrainingError` before the weights change."""
    batch = batch.to(accelerator.device)
    with accelerator.autocast():
        out = model(batch)
        loss, parts = accelerator.unwrap_model(model).loss(out, batch)
        if cfg.ood.outlier_exposure:
            loss = loss + cfg.ood.oe_weight * outlier_exposure(out.logits[batch.labels >= num_labels])
    if broadcast_flag(not bool(torch.isfinite(loss.detach())), accelerator):
        detail = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
        raise TrainingError(f"the training loss is not finite ({float(loss.detach())}; {detail}) on a batch "
                            f"holding {', '.join(batch.ids[:4])}{'...' if len(batch) > 4 else ''}: check the "
                            "features for NaN/inf or extreme values, or lower the learning rate")
    accelerator.backward(loss)
    sync_gradients(model, accelerator)
    if cfg.train.grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    sched.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def check_parameters(model, where: str) -> None:
    """Raise `TrainingError` when a parameter is not finite."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p.detach()).all():
            raise TrainingError(f"{where}: parameter {name} is not finite; the model is broken and nothing is saved")


def _rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
            "torch": torch.get_rng_state(), "loader": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_train_state(path: Path) -> dict:
    """The saved training state (tensors and plain containers only: `weights_only`)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state is reported the same way
        raise TrainingError(f"{path}: the saved training state is unreadable ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); delete it to train this seed from "
                            "the start") from None


def fit(cfg: Config, seed: int, model, data: PreparedData, collator, accelerator, seed_dir: Path):
    """Train with early stopping on `train.monitor` over the dev split; the best state goes
    to `seed_dir/model.pt` and the training state to `seed_dir/train_state.pt` every epoch
    (main process). Resumes from `train_state.pt` when it exists. Returns the prepared model
    (still holding the *last* epoch's weights) and a `FitResult`."""
    from tqdm.auto import tqdm

    main = accelerator.is_main_process
    ckpt, state_path = seed_dir / CHECKPOINT_FILE, seed_dir / STATE_FILE
    dev = accelerator.device
    train_loader = make_loader(data.train, cfg, collator, shuffle=True, seed=seed, batch_size=cfg.train.batch_size,
                               device=dev)
    generator = train_loader.generator
    dev_loader = make_loader(data.dev, cfg, collator, shuffle=False, seed=seed, batch_size=cfg.train.eval_batch_size,
                             device=dev)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    optimizer, sched = make_optimizer(cfg, model, total)
    model = prepare_model(model, accelerator, compile=cfg.train.compile)
    optimizer, train_loader, dev_loader, sched = accelerator.prepare(optimizer, train_loader, dev_loader, sched)
    C = len(data.label_names)
    best, best_epoch, bad, step, n_seen, history, start, elapsed = -math.inf, -1, 0, 0, 0, [], 1, 0.0
    if state_path.is_file():
        st = load_train_state(state_path)
        accelerator.unwrap_model(model).load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        best, best_epoch, bad, step, n_seen = st["best"], st["best_epoch"], st["bad"], st["step"], st["samples_seen"]
        history, elapsed, start = list(st["history"]), float(st["train_seconds"]), int(st["epoch"]) + 1
        _set_rng_state(st["rng"], generator)
        log.info("seed %d: resuming after epoch %d (best %s %.2f%% at epoch %d)", seed, start - 1,
                 cfg.train.monitor, 100 * best, best_epoch)
    resumed_from = start - 1
    done = bool(history) and (bad >= cfg.train.patience or (cfg.train.max_steps is not None
                                                             and step >= cfg.train.max_steps))
    t_start = time.perf_counter() - elapsed
    for epoch in range(start, cfg.train.epochs + 1):
        if done:
            break
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
        check_parameters(accelerator.unwrap_model(model), f"seed {seed} epoch {epoch}")
        dev_m = split_metrics(predict(model, dev_loader, accelerator, data.dev_key), C, data.label_names)
        score = dev_m[cfg.train.monitor]
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                        "dev": dev_m, "step": step, "seconds": round(time.perf_counter() - t_start, 3)})
        # the first epoch always counts as the best so far, even when the dev metric is 0
        improved = best_epoch < 0 or score > best
        if improved:
            best, best_epoch, bad = score, epoch, 0
            if main:
                torch_save(accelerator.unwrap_model(model).state_dict(), ckpt)
        else:
            bad += 1
        log.info("seed %d epoch %d: train loss %.4f, %s %s = %.2f%%%s", seed, epoch, history[-1]["train_loss"],
                 data.dev_key, cfg.train.monitor, 100 * score, " (best)" if improved else "")
        done = bad >= cfg.train.patience or (cfg.train.max_steps is not None and step >= cfg.train.max_steps)
        if main:  # after the checkpoint: a kill in between repeats this epoch, with the same result
            torch_save({"epoch": epoch, "model": accelerator.unwrap_model(model).state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(), "best": best,
                        "best_epoch": best_epoch, "bad": bad, "step": step, "samples_seen": n_seen,
                        "history": history, "train_seconds": time.perf_counter() - t_start,
                        "rng": _rng_state(generator)}, state_path)
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()
    # The optimiser's state (two floats per parameter) and the gradients are not needed after
    # training: free them (the accelerator holds a reference to the optimiser) before the best
    # checkpoint is loaded beside the weights; that load set the run's peak memory (mult: +0.2 GB),
    # and with several seeds in one process every seed's optimiser (and, through it, its
    # parameters) stayed alive: +0.75 GB per seed for tcl_map (BENCHMARKS.md).
    accelerator.unwrap_model(model).zero_grad(set_to_none=True)
    accelerator.free_memory(optimizer, sched)
    return model, FitResult(history, best_epoch, step, time.perf_counter() - t_start, n_seen, resumed_from)
