"""`amess compare`: several methods on the same data and seeds, one table.

Each method trains with `amess train` in a fresh process (so that its peak memory is its
own) into `out_dir/<method>/`, a normal run folder: finished seeds are reused, an
interrupted one resumes, and a method whose setting (or data) changed is re-run. Then

- `compare.md`: per method the mean ± std over seeds of every metric (%), the paired
  difference to the reference method (mean ± std of the per-seed differences, in points)
  with a paired t-test over seeds, the parameter count, train and inference samples/s
  and peak memory; an out-of-scope table per detector when the run has detectors;
- `compare.csv`: one line per method, split and metric (with the paired difference);
- `compare_<metric>.pdf/.png`: a bar plot with error bars (std over seeds).

A method not defined for the configured modalities (e.g. MAG-BERT on text alone) is
skipped with a note instead of failing the whole comparison.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from amess.config import Config
from amess.training.artifacts import CORE_KEYS, OOD_KEYS, save_figure, write_text
from amess.training.runner import holds_other_run

log = logging.getLogger(__name__)

METRIC_KEYS = CORE_KEYS + ("precision_weighted", "recall_weighted")


def per_seed(run_dir: Path, seeds: Sequence[int], split: str, key: str) -> list[float] | None:
    """Per-seed values of a metric (dotted for nested groups, e.g. `ood.msp.f1_oos`) from the
    seed folders' `metrics.json`; None if any seed lacks it."""
    values = []
    for s in seeds:
        try:
            m = json.loads((run_dir / f"seed_{s}" / "metrics.json").read_text())["metrics"][split]
            for part in key.split("."):
                m = m[part]
            values.append(float(m))
        except (OSError, KeyError, ValueError, TypeError):
            return None
    return values


def paired(a: list[float] | None, b: list[float] | None) -> dict[str, float] | None:
    """Paired difference a - b over seeds: mean, std and the two-sided paired t-test p-value
    (None with fewer than two seeds or identical differences)."""
    if a is None or b is None or len(a) != len(b) or not a:
        return None
    d = np.asarray(a) - np.asarray(b)
    out = {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if d.size > 1 else 0.0, "n": int(d.size),
           "p": None}
    if d.size > 1 and d.std(ddof=1) > 0:
        from scipy.stats import ttest_rel

        out["p"] = float(ttest_rel(a, b).pvalue)
    return out


def _efficiency(run_dir: Path, seeds: Sequence[int]) -> dict[str, float | None]:
    vals: dict[str, list[float]] = {}
    for s in seeds:
        try:
            m = json.loads((run_dir / f"seed_{s}" / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        for k in ("parameters", "train_samples_per_second", "inference_samples_per_second", "peak_rss_mib"):
            if m.get(k) is not None:
                vals.setdefault(k, []).append(float(m[k]))
    return {k: (float(np.median(v)) if k != "peak_rss_mib" else float(max(v))) if v else None
            for k, v in ((k, vals.get(k, [])) for k in ("parameters", "train_samples_per_second",
                                                         "inference_samples_per_second", "peak_rss_mib"))}


def report_split(summaries: dict[str, dict], cfg: Config) -> str:
    for s in cfg.data.test_splits:
        if any(s in summ for summ in summaries.values()):
            return s
    return next(k for summ in summaries.values() for k in summ if k != "seeds")


def method_config(base: Config, method: str, variants: dict[str, tuple[str, dict]] | None = None) -> Config:
    """The config of one row: a registered method, or a variant's method with its settings
    (`variants`: name -> (method, overrides), from `--variant`)."""
    if variants and method in variants:
        real, overrides = variants[method]
        return base.override({**overrides, "model.method": real})
    return base.override({"model.method": method})


def run_compare(base: Config, methods: Sequence[str], out_dir: str | Path, *, reference: str | None = None,
                fresh_process: bool = True, variants: dict[str, tuple[str, dict]] | None = None) -> dict[str, Any]:
    """Train each method or variant (skipping those not defined for their modalities), write
    the tables and the plot; returns `{"summaries": ..., "skipped": ..., "split": ...}`.

    `variants`: row name -> (method, `section.key` overrides), e.g. `{"amess_text": ("amess",
    {"data.modalities": "[text]"})}`; each row trains into `out_dir/<name>/`."""
    from amess.models import method_class
    from amess.training import run

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = dict(variants or {})
    clash = sorted(set(variants) & set(_registered()))
    if clash:
        raise ValueError(f"--variant names {clash} are methods already; pick another name")
    configs, skipped = {}, {}
    for m in methods:  # resolve every config first: a bad setting fails before anything trains
        cfg = method_config(base, m, variants)
        problem = method_class(cfg.model.method).modality_problem(cfg.data.modalities)
        if problem:
            skipped[m] = problem
            continue
        configs[m] = cfg
    if reference is not None and reference not in configs:
        raise ValueError(f"--reference {reference!r} is not among the methods that can run: {list(configs)}")
    summaries = {}
    for i, (m, cfg) in enumerate(configs.items(), 1):
        run_dir = out_dir / m
        overwrite = holds_other_run(run_dir, cfg)
        log.info("compare %d/%d: %s into %s%s", i, len(configs), m, run_dir, " (replacing another config)" if overwrite else "")
        if fresh_process:
            cfg_path = out_dir / f".{m}.config.yaml"
            cfg.save(cfg_path)
            cmd = [sys.executable, "-m", "amess.cli", "train", "--config", str(cfg_path), "--data-dir",
                   cfg.data.data_dir, "--out", str(run_dir)] + (["--overwrite"] if overwrite else [])
            returncode = run_child(cmd)
            cfg_path.unlink(missing_ok=True)
            if returncode != 0:
                raise RuntimeError(f"compare: `amess train` of method {m!r} failed (exit {returncode}); "
                                   f"its log is above; rerun the same command to resume")
            summaries[m] = json.loads((run_dir / "summary.json").read_text())
        else:
            summaries[m] = run(cfg, run_dir, overwrite=overwrite)
    split = report_split(summaries, base)
    md = compare_markdown(summaries, out_dir, split, base.train.seeds, reference, skipped, variants)
    write_text(out_dir / "compare.md", md + "\n")
    write_compare_csv(out_dir / "compare.csv", summaries, out_dir, base.train.seeds, reference)
    from amess import plots

    for key in ("acc", "f1_macro"):
        save_figure(plots.method_bars(summaries, split, key), out_dir, f"compare_{key}")
    return {"summaries": summaries, "skipped": skipped, "split": split, "markdown": md}


def run_child(cmd: list[str]) -> int:
    """Run one `amess train` child and return its exit code. A SIGTERM to this process (a
    `kill`, a job scheduler's stop) is passed on to the child and waited for, so that no orphan
    keeps training (and holding its run folder's lock) after `compare` is gone; then this
    process exits with 143. Ctrl-C reaches both through the terminal's process group."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    stopped: list[int] = []

    def stop(signum, frame):  # no wait() here: the interrupted wait below holds Popen's lock
        stopped.append(signum)
        proc.terminate()

    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, stop) if in_main else None
    try:
        code = proc.wait()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)
        if proc.poll() is None:  # an exception (KeyboardInterrupt) while waiting
            proc.terminate()
            proc.wait()
    if stopped:
        raise SystemExit(128 + stopped[0])
    return code


def _registered() -> list[str]:
    from amess.models import METHODS

    return list(METHODS)


def _pct(v: dict | None) -> str:
    return "–" if v is None else f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}"


def _delta(d: dict | None) -> str:
    if d is None:
        return "–"
    p = "" if d["p"] is None else f" (p={d['p']:.3f})"
    return f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}{p}"


def compare_markdown(summaries: dict[str, dict], out_dir: Path, split: str, seeds: Sequence[int],
                     reference: str | None, skipped: dict[str, str],
                     variants: dict[str, tuple[str, dict]] | None = None) -> str:
    keys = [k for k in METRIC_KEYS if any(k in s.get(split, {}) for s in summaries.values())]
    lines = [f"Methods on `{split}`, seeds {list(seeds)}: mean ± std over seeds, %."
             + (f" Δ: paired difference to `{reference}` over seeds, points (two-sided paired t-test)." if reference else ""),
             "", "| method | " + " | ".join(keys) + (" | Δ acc | Δ f1_macro" if reference else "")
             + " | parameters | train samples/s | inference samples/s | peak RSS MiB |",
             "|" + "---|" * (len(keys) + 5 + (2 if reference else 0))]
    for m, summ in summaries.items():
        cells = [_pct(summ.get(split, {}).get(k)) for k in keys]
        if reference:
            for k in ("acc", "f1_macro"):
                cells.append("0" if m == reference else _delta(paired(per_seed(out_dir / m, seeds, split, k),
                                                                        per_seed(out_dir / reference, seeds, split, k))))
        e = _efficiency(out_dir / m, seeds)
        cells += [f"{e['parameters'] / 1e6:.2f} M" if e["parameters"] else "–",
                  f"{e['train_samples_per_second']:.1f}" if e["train_samples_per_second"] else "–",
                  f"{e['inference_samples_per_second']:.1f}" if e["inference_samples_per_second"] else "–",
                  f"{e['peak_rss_mib']:.0f}" if e["peak_rss_mib"] else "–"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for m, why in skipped.items():
        lines.append(f"| {m} | not defined for these modalities ({why}) |" + " |" * (len(keys) + 3))
    dets = sorted({d for s in summaries.values() for d in s.get(split, {}).get("ood", {})})
    for det in dets:
        lines += ["", f"Out-of-scope detection with `{det}` on `{split}` (mean ± std, %):", "",
                  "| method | " + " | ".join(OOD_KEYS) + " |", "|" + "---|" * (len(OOD_KEYS) + 1)]
        for m, summ in summaries.items():
            o = summ.get(split, {}).get("ood", {}).get(det)
            if o:
                lines.append(f"| {m} | " + " | ".join(_pct(o.get(k)) for k in OOD_KEYS) + " |")
    shown = {n: v for n, v in (variants or {}).items() if n in summaries or n in skipped}
    if shown:
        lines += ["", "Variants: " + "; ".join(
            f"`{n}` = `{m}` with " + ", ".join(f"`{k}={v}`" for k, v in o.items()) if o else f"`{n}` = `{m}`"
            for n, (m, o) in shown.items()) + "."]
    lines += ["", "Efficiency: median over seeds of each seed's training and evaluation throughput (data loading "
              "included), the largest peak resident memory of the method's process."]
    return "\n".join(lines)


def write_compare_csv(path: Path, summaries: dict[str, dict], out_dir: Path, seeds: Sequence[int],
                      reference: str | None) -> None:
    from amess.ablate import leaves

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "split", "metric", "mean", "std", "n", "delta_mean", "delta_std", "delta_p"])
    for m, summ in summaries.items():
        for split, metrics in summ.items():
            if split == "seeds":
                continue
            for metric, v in leaves(metrics):
                d = None
                if reference and m != reference:
                    d = paired(per_seed(out_dir / m, seeds, split, metric), per_seed(out_dir / reference, seeds, split, metric))
                w.writerow([m, split, metric, f"{v['mean']:.6f}", f"{v['std']:.6f}", v["n"],
                            "" if d is None else f"{d['mean']:.6f}", "" if d is None else f"{d['std']:.6f}",
                            "" if d is None or d["p"] is None else f"{d['p']:.6f}"])
    write_text(path, buf.getvalue())


# --- command line ---------------------------------------------------------------------

def _cmd_compare(args: argparse.Namespace) -> int:
    from amess.cli import build_train_config

    args.method = None
    cfg = build_train_config(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods: name at least one method (see `amess methods`)")
    from amess.config import parse_variant

    variants = {}
    for v in args.variant:
        name, method, overrides = parse_variant(v)
        variants[name] = (method, overrides)
    unused = sorted(set(variants) - set(methods))
    if unused:
        log.warning("--variant %s: not listed in --methods %s, so not run", unused, methods)
    res = run_compare(cfg, methods, args.out, reference=args.reference, fresh_process=not args.in_process,
                      variants=variants)
    print(res["markdown"])
    print(f"\ncompare folder: {args.out} (compare.md, compare.csv, compare_acc.pdf/.png)")
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `compare`; it takes every `amess train` flag (applied to each method)."""
    from amess.cli import add_train_args

    p = subparsers.add_parser("compare", help="train several methods on the same data and seeds, one table",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    add_train_args(p, with_method=False)
    p.add_argument("--methods", required=True, help="comma-separated method names (see `amess methods`)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD[:KEY=VALUE,...]",
                   help="a named row: a method with settings, e.g. amess_text=amess:data.modalities=[text] "
                        "or text_mt=text:data.context=true (then list NAME in --methods)")
    p.add_argument("--reference", default=None, help="method the others are compared with, paired by seed")
    p.add_argument("--in-process", action="store_true",
                   help="train every method in this process (faster start; peak memory is then shared)")
    p.set_defaults(func=_cmd_compare)
