"""Ablations: one run folder per switch of docs/amess-method.md, one table over seeds.

"What must be measured, not assumed": every A-MESS switch has a row in `ABLATIONS`, a
name and the dotted overrides that turn the default into that row. `run_ablation` trains
each selected row with `amess.training.run` into `out_dir/<slug>/` and writes

- `ablation.md`: mean ± std over seeds per metric (%), the number of seeds, and the change
  of acc and f1_macro against the `A-MESS (default)` row, in percentage points;
- `ablation.csv`: one line per row, split and metric (row, split, metric, mean, std, n).

The change against the default is paired by seed when both rows ran the same seeds in
this folder (same seed = same data order and held-back dev slice, so the per-seed
differences are less noisy than the two spreads): the mean ± std of the per-seed
differences. Otherwise it is the difference of the two means alone.

Ablations are long, so a row whose folder already holds a `summary.json` written under the
same resolved configuration and on the same data (`run.json`'s data fingerprint) is reused,
not retrained. Settings that cannot change a result
(`amess.training.runner.RESULT_NEUTRAL`: progress bars, threads, loader workers, plots) are left out of that
comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from amess import training as _train
from amess.training.runner import comparable, data_fingerprint, holds_other_run, saved_fingerprint
from amess.config import Config, flag_overrides, parse_overrides

log = logging.getLogger(__name__)

DEFAULT_ROW = "A-MESS (default)"
GROUPS = ("base", "anchors", "k", "ss", "view", "desc", "modality", "baseline")
DELTA_KEYS = ("acc", "f1_macro")


@dataclass(frozen=True)
class Ablation:
    """One row of the ablation table: `overrides` are applied on top of the base config."""

    name: str
    group: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """Folder name: lower case, runs of other characters as one `-`."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


ABLATIONS: list[Ablation] = [
    # The default: topk anchors, k=4, triplet SS (fixed tau 0.07, scored by head + similarity), text
    # view, momentum description encoder,
    # text + video + audio (AmessConfig and DataConfig defaults).
    Ablation(DEFAULT_ROW, "base"),
    # A-ME 3: anchor selection.
    Ablation("anchors: none", "anchors", {"amess.anchor_mode": "none"}),
    Ablation("anchors: learned", "anchors", {"amess.anchor_mode": "learned"}),
    Ablation("anchors: all", "anchors", {"amess.anchor_mode": "all"}),
    Ablation("topk k=1", "k", {"amess.num_anchors": 1}),
    Ablation("topk k=8", "k", {"amess.num_anchors": 8}),
    # SS 4: the loss.
    Ablation("SS off", "ss", {"amess.ss_loss": "none"}),
    Ablation("SS margin", "ss", {"amess.ss_loss": "margin"}),
    # SS 4 and 6: the temperature (learned from 0.1 before 2026-12-07) and scoring by the head alone.
    Ablation("SS learned tau", "ss", {"amess.learn_tau": True, "amess.tau": 0.1}),
    Ablation("SS head inference", "ss", {"amess.inference": "head"}),
    # SS 3-4: the text-only view z_t.
    Ablation("no text view", "view", {"amess.text_view": False}),
    # SS 2: the description encoder.
    Ablation("frozen descriptions", "desc", {"amess.desc_encoder": "frozen"}),
    # The others, for a base run with `--set amess.desc_encoder=frozen` (cheaper on a CPU) or shared.
    Ablation("shared descriptions", "desc", {"amess.desc_encoder": "shared"}),
    Ablation("momentum descriptions", "desc", {"amess.desc_encoder": "momentum"}),
    # Modality drop.
    Ablation("text only", "modality", {"data.modalities": ["text"]}),
    Ablation("text+audio", "modality", {"data.modalities": ["text", "audio"]}),
    Ablation("text+video", "modality", {"data.modalities": ["text", "video"]}),
    # The text model A-MESS starts from.
    Ablation("text baseline", "baseline", {"model.method": "text"}),
]


def select_rows(spec: str | Sequence[str] | None) -> list[Ablation]:
    """Rows named by `spec`, in table order: comma-separated items (or a list), each a group
    name (`GROUPS`) or a case-insensitive substring of row names. None or empty = all rows."""
    if spec is None:
        return list(ABLATIONS)
    items = spec.split(",") if isinstance(spec, str) else [s for part in spec for s in part.split(",")]
    items = [s.strip() for s in items if s.strip()]
    if not items:
        return list(ABLATIONS)
    chosen: set[str] = set()
    for item in items:
        hits = ([a.name for a in ABLATIONS if a.group == item] if item in GROUPS
                else [a.name for a in ABLATIONS if item.lower() in a.name.lower()])
        if not hits:
            raise ValueError(f"--rows {item!r} matches no ablation row; groups: {list(GROUPS)}, "
                             f"rows: {[a.name for a in ABLATIONS]}")
        chosen.update(hits)
    return [a for a in ABLATIONS if a.name in chosen]


def resolve(base_cfg: Config, row: Ablation) -> Config:
    """The row's config: the base with `model.method=amess`, then the row's overrides."""
    return base_cfg.override({"model.method": "amess", **row.overrides})


def _comparable(cfg: Config) -> dict[str, Any]:
    return comparable(cfg, seeds=True)


def _finished(run_dir: Path, cfg: Config) -> dict | None:
    """The saved summary when `run_dir` holds a finished run of `cfg`, else None.

    `train.run` writes `config.yaml` first and `summary.json` last, so a summary older than
    the config belongs to an earlier, different run that a later one overwrote partway.
    """
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary_path.is_file() and config_path.is_file()):
        return None
    if summary_path.stat().st_mtime_ns < config_path.stat().st_mtime_ns:
        return None
    try:
        saved = Config.load(config_path)
        summary = json.loads(summary_path.read_text())
    except (ValueError, OSError) as e:
        log.warning("%s: unreadable (%s); not reused", run_dir, e)
        return None
    if _comparable(saved) != _comparable(cfg) or summary.get("seeds") != sorted(cfg.train.seeds):
        log.debug("%s: saved config or seeds differ; not reused", run_dir)
        return None
    if saved_fingerprint(run_dir) != data_fingerprint(cfg):
        log.info("%s: the data changed since this row ran (fingerprint); not reused", run_dir)
        return None
    return summary


def report_split(summaries: dict[str, dict]) -> str:
    """`test` when any row has it, else the first split key of the first row."""
    if any("test" in s for s in summaries.values()):
        return "test"
    for s in summaries.values():
        for k in s:
            if k != "seeds":
                return k
    raise ValueError("no split in any ablation summary")


def run_ablation(base_cfg: Config, out_dir: str | Path, rows: str | Sequence[str] | None = None,
                 resume: bool = True) -> dict[str, dict]:
    """Train every selected row (`select_rows(rows)`) into `out_dir/<slug>/`, write
    `ablation.md` and `ablation.csv`, and return `{row name: summary}` in table order.

    The table holds the selected rows and every other row already finished in `out_dir`
    under the same base config, so an ablation can be run group by group.

    All row configs are resolved before anything trains, so a contradictory combination
    (say `--set amess.inference=similarity` with the `SS off` row) fails at once.
    """
    out_dir = Path(out_dir)
    selected = select_rows(rows)
    configs = {a.name: resolve(base_cfg, a) for a in selected}
    summaries: dict[str, dict] = {}
    for i, a in enumerate(selected, 1):
        run_dir = out_dir / a.slug
        cfg = configs[a.name]
        summary = _finished(run_dir, cfg) if resume else None
        if summary is not None:
            log.info("ablation %d/%d %r: reusing %s", i, len(selected), a.name, run_dir)
        else:
            log.info("ablation %d/%d %r: training into %s%s", i, len(selected), a.name, run_dir,
                     " (replacing a run with another config or seeds)" if (run_dir / "summary.json").is_file() else "")
            summary = _train.run(cfg, run_dir, overwrite=holds_other_run(run_dir, cfg))
        summaries[a.name] = summary
    # rows finished by earlier calls (`--rows anchors`, then `--rows ss`) join the table
    for a in ABLATIONS:
        if a.name not in summaries:
            try:
                earlier = _finished(out_dir / a.slug, resolve(base_cfg, a))
            except ValueError:  # this base cannot express the row at all
                earlier = None
            if earlier is not None:
                summaries[a.name] = earlier
    table = {a.name: summaries[a.name] for a in ABLATIONS if a.name in summaries}
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun / accelerate only one process writes
        split = report_split(table)
        (out_dir / "ablation.md").write_text(ablation_markdown(table, split, out_dir) + "\n")
        write_csv(out_dir / "ablation.csv", table)
    return table


# --- the table ------------------------------------------------------------------------

def delta(row: dict, base: dict, split: str, key: str, row_dir: Path | None = None,
          base_dir: Path | None = None) -> str:
    """The change of `key` from `base` to `row` in percentage points: paired by seed
    (mean ± std of the differences) when both ran the same seeds and their seed folders
    are readable, else the difference of the means; `–` when either lacks the metric."""
    from amess.compare import paired, per_seed

    a, b = row.get(split, {}).get(key), base.get(split, {}).get(key)
    if a is None or b is None:
        return "–"
    seeds = row.get("seeds")
    if row_dir is not None and base_dir is not None and seeds and seeds == base.get("seeds"):
        d = paired(per_seed(row_dir, seeds, split, key), per_seed(base_dir, seeds, split, key))
        if d is not None:
            return f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}"
    return f"{100 * (a['mean'] - b['mean']):+.2f}"


def ablation_markdown(summaries: dict[str, dict], split: str, out_dir: str | Path | None = None,
                      keys: tuple[str, ...] = ("acc", "f1_macro", "precision_macro", "recall_macro",
                                               "f1_weighted")) -> str:
    """`amess.training.format_table` with three more columns: seeds, Δ acc and Δ f1_macro
    against the default row (`–` when the default row is not in `summaries`)."""
    table = _train.format_table(summaries, split, keys).split("\n")
    base = summaries.get(DEFAULT_ROW)
    slugs = {a.name: a.slug for a in ABLATIONS}
    dirs = {n: Path(out_dir) / slugs.get(n, n) for n in summaries} if out_dir is not None else {}
    lines = [table[0] + " seeds | " + " | ".join(f"Δ {k}" for k in DELTA_KEYS) + " |",
             table[1] + "---|" * (1 + len(DELTA_KEYS))]
    for line, (name, summ) in zip(table[2:], summaries.items()):
        cells = [str(len(summ.get("seeds", [])))]
        for k in DELTA_KEYS:
            cells.append("–" if base is None else delta(summ, base, split, k, dirs.get(name), dirs.get(DEFAULT_ROW)))
        lines.append(line + " " + " | ".join(cells) + " |")
    header = (f"Ablations on `{split}`: mean ± std over seeds, %. Δ: change against `{DEFAULT_ROW}` "
              "in percentage points (paired by seed when both rows ran the same seeds).\n")
    return header + "\n" + "\n".join(lines)


def leaves(metrics: dict, prefix: str = ""):
    """(dotted name, {mean, std, n}) pairs of a split's summary; nested groups such as
    `ood.<detector>.<metric>` are flattened."""
    for k, v in metrics.items():
        if isinstance(v, dict) and "mean" in v:
            yield prefix + k, v
        elif isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}.")


def write_csv(path: str | Path, summaries: dict[str, dict]) -> None:
    """One line per row, split and metric: row, split, metric, mean, std, n."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "split", "metric", "mean", "std", "n"])
        for name, summ in summaries.items():
            for split, metrics in summ.items():
                if split == "seeds":
                    continue
                for metric, v in leaves(metrics):
                    w.writerow([name, split, metric, f"{v['mean']:.6f}", f"{v['std']:.6f}", v["n"]])


# --- command line ---------------------------------------------------------------------

def build_config(args: argparse.Namespace) -> Config:
    """Defaults, then `--config`, then the flags, then `--set` (rows are applied later)."""
    cfg = Config.load(args.config) if args.config else Config()
    o: dict[str, Any] = flag_overrides(args, (
        ("dataset", "data.dataset"), ("data_dir", "data.data_dir"), ("seeds", "train.seeds"),
        ("epochs", "train.epochs"), ("batch_size", "train.batch_size"),
        ("text_encoder", "model.text_encoder"), ("max_steps", "train.max_steps")))
    if args.no_progress:
        o["train.progress"] = False
    o.update(parse_overrides(args.set))
    return cfg.override(o)


def _cmd_ablate(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    summaries = run_ablation(cfg, args.out, rows=args.rows, resume=not args.no_resume)
    print(ablation_markdown(summaries, report_split(summaries), args.out))
    print(f"\nablation folder: {args.out}")
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `ablate` on an argparse subparsers object; sets `func` (args -> exit code)."""
    rows = "; ".join(f"{g}: " + ", ".join(a.name for a in ABLATIONS if a.group == g) for g in GROUPS)
    p = subparsers.add_parser(
        "ablate", help="train A-MESS with each switch changed, one table over seeds",
        description="Train every ablation row of docs/amess-method.md (each a run folder under --out) "
                    "and print mean ± std over seeds with the change against the default. Finished rows "
                    f"with the same config are reused. Rows (group: names): {rows}.")
    p.add_argument("--dataset", default=None, help="benchmark reader (default: mintrec)")
    p.add_argument("--data-dir", default=None, help="the dataset folder as downloaded")
    p.add_argument("--config", default=None, help="YAML base config (flags and --set override it)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds per row (default: the config's)")
    p.add_argument("--out", required=True, help="ablation folder: one run folder per row, ablation.md/.csv")
    p.add_argument("--rows", default=None,
                   help=f"comma-separated groups ({','.join(GROUPS)}) or row-name substrings (default: all)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--text-encoder", default=None, help="Hugging Face name or local folder")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimiser steps (smoke tests)")
    p.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                   help="any config setting of the base (rows override it)")
    p.add_argument("--no-resume", action="store_true", help="retrain rows even when a finished run matches")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_ablate)
