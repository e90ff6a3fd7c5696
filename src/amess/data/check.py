"""`amess data check`: per split and class counts, feature shapes and lengths, and every
problem found. Returns a report and whether the data can be used."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from amess.config import DataConfig
from amess.data.base import DataError, get_reader
from amess.data.safe_pickle import UnsafePickleError, safe_load, to_numpy


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        out = list(self.lines)
        if self.problems:
            out.append(f"\n{len(self.problems)} problem(s):")
            out += [f"  - {p}" for p in self.problems]
        else:
            out.append("\nno problems found")
        return "\n".join(out)


def check_dataset(cfg: DataConfig, expected_dims: dict[str, int] | None = None) -> CheckReport:
    """Read every split and feature file of `cfg` and report what is there and what is wrong."""
    rep = CheckReport()
    try:
        reader = get_reader(cfg)
    except (DataError, ValueError) as e:
        rep.problems.append(str(e))
        return rep
    splits = reader.available_splits()
    rep.lines.append(f"dataset {cfg.dataset} at {reader.data_dir}; splits found: {splits or 'none'}")
    if not splits:
        rep.problems.append(f"{reader.data_dir}: no train/dev/test TSV found")
    names = reader.label_names + ([reader.spec.oos_label] if reader.spec.oos_label else [])
    ids_by_split: dict[str, list[str]] = {}
    for split in splits:
        try:
            samples = reader.read_rows(split)
        except DataError as e:
            rep.problems.append(str(e))
            continue
        ids_by_split[split] = [s.id for s in samples]
        dup = [k for k, v in Counter(ids_by_split[split]).items() if v > 1]
        if dup:
            rep.problems.append(f"{reader.split_file(split)}: duplicate sample ids, e.g. {dup[:3]}")
        counts = Counter(s.label for s in samples)
        rep.lines.append(f"\n{split}: {len(samples)} rows")
        for c, n in sorted(counts.items()):
            rep.lines.append(f"  {names[c]:<22} {n}")
    all_ids = [i for v in ids_by_split.values() for i in v]
    for modality in ("video", "audio"):
        if modality not in cfg.modalities:
            continue
        path = reader.feature_path(modality)
        if path is None:
            rep.problems.append(f"{reader.data_dir}: no {modality} feature file (tried "
                                f"{list(getattr(reader.spec, modality + '_files'))})")
            continue
        _check_features(rep, path, modality, all_ids, ids_by_split, reader.max_len(modality),
                        (expected_dims or {}).get(modality))
    return rep


def _check_features(rep: CheckReport, path: Path, modality: str, all_ids: list[str],
                    ids_by_split: dict[str, list[str]], max_len: int, expected_dim: int | None) -> None:
    if path.stat().st_size == 0:
        rep.problems.append(f"{path}: empty file")
        return
    try:
        raw = safe_load(path)
    except UnsafePickleError as e:
        rep.problems.append(str(e))
        return
    if not isinstance(raw, dict):
        rep.problems.append(f"{path}: expected a dict sample_id -> features, got {type(raw).__name__}")
        return
    lengths, dims, bad = [], Counter(), 0
    for sid in all_ids:
        if sid not in raw:
            continue
        try:
            arr = to_numpy(raw[sid], path=path, sample_id=sid)
        except ValueError as e:
            rep.problems.append(str(e))
            bad += 1
            continue
        lengths.append(arr.shape[0])
        if arr.shape[0]:
            dims[arr.shape[1]] += 1
            if not np.isfinite(arr).all():
                rep.problems.append(f"{path}: sample {sid}: NaN or inf values")
    for split, ids in ids_by_split.items():
        missing = [i for i in ids if i not in raw]
        if missing:
            rep.problems.append(f"{path}: {len(missing)} {split} id(s) without {modality} features, e.g. {missing[:3]}")
    rep.lines.append(f"\n{modality}: {path} ({path.stat().st_size / 2**20:.1f} MiB), {len(raw)} entries")
    if lengths:
        la = np.array(lengths)
        rep.lines.append(f"  widths {dict(dims)}; frames min {la.min()} / median {int(np.median(la))} / "
                         f"max {la.max()}; {int((la > max_len).sum())} longer than max length {max_len} "
                         f"(truncated); {int((la == 0).sum())} with no frame")
    if len(dims) > 1:
        rep.problems.append(f"{path}: feature widths differ between samples: {dict(dims)}")
    if expected_dim is not None and dims and set(dims) != {expected_dim}:
        rep.problems.append(f"{path}: feature width {sorted(dims)}, expected {expected_dim}")
