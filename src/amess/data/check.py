"""`amess data check`: per split and class counts, feature shapes and lengths, and every
problem found, each naming its file and sample (or line). Returns a report and whether the
data can be used.

It reports what the readers refuse when training loads the data (`DatasetReader.load`),
all at once instead of the first: bad rows (every one; a split with a bad row is still
checked), empty train / dev splits, duplicate ids, train ids in evaluation splits, feature
values that are not finite real numbers or that float16 cannot hold, samples whose width
differs from the others', ids without features and modalities without a single frame in a
split; with `feature_store` naming a store, also what `verify_store` finds there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from amess.config import DataConfig
from amess.data.base import AUTO_STORE, DataError, DatasetReader, get_reader
from amess.data.batch import Sample
from amess.data.safe_pickle import UnsafePickleError, safe_load, to_numpy, value_problem

LIST_LIMIT = 50
"""Problems of one kind listed one by one per file; beyond that, one line counts the rest."""


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

    def add_all(self, problems: list[str], what: str, where: str | Path) -> None:
        """Add problems of one kind: the first LIST_LIMIT one by one, then a count of the rest."""
        self.problems += problems[:LIST_LIMIT]
        if len(problems) > LIST_LIMIT:
            self.problems.append(f"{where}: {len(problems) - LIST_LIMIT} more {what} (not listed)")


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
    samples: dict[str, list[Sample]] = {}
    for split in splits:
        row_problems: list[str] = []
        try:
            samples[split] = reader.read_rows(split, problems=row_problems)
        except DataError as e:  # the file as a whole (its header) is unreadable
            rep.problems.append(str(e))
            continue
        finally:
            rep.add_all(row_problems, "bad rows", reader.split_file(split))
        counts = Counter(s.label for s in samples[split])
        rep.lines.append(f"\n{split}: {len(samples[split])} rows" + (f" ({len(row_problems)} bad row(s) left out)"
                                                                    if row_problems else ""))
        for c, n in sorted(counts.items()):
            rep.lines.append(f"  {names[c]:<22} {n}")
    rep.add_all(reader.split_problems(samples), "split problems", reader.data_dir)
    store = cfg.feature_store and cfg.feature_store != AUTO_STORE and {"video", "audio"} & set(cfg.modalities)
    if store:
        from amess.data.store import verify_store

        rep.add_all(verify_store(reader.store_dir()), "store problems", reader.store_dir())
    for modality in ("video", "audio"):
        if modality not in cfg.modalities:
            continue
        if store:
            _check_store(rep, reader, modality, samples)
            continue
        path = reader.feature_path(modality)
        if path is None:
            rep.problems.append(f"{reader.data_dir}: no {modality} feature file (tried "
                                f"{list(getattr(reader.spec, modality + '_files'))})")
            continue
        _check_features(rep, path, modality, samples, reader.max_len(modality),
                        (expected_dims or {}).get(modality), cfg.train_split)
    return rep


def _check_features(rep: CheckReport, path: Path, modality: str, samples: dict[str, list[Sample]],
                    max_len: int, expected_dim: int | None, train_split: str) -> None:
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
    bad: list[str] = []
    lengths: dict[str, int] = {}
    widths: dict[str, int] = {}
    for sid in dict.fromkeys(s.id for ss in samples.values() for s in ss):
        if sid not in raw:
            continue
        try:
            arr = to_numpy(raw[sid], path=path, sample_id=sid, check_values=False)
        except DataError as e:
            bad.append(str(e))
            continue
        lengths[sid] = arr.shape[0]
        if arr.shape[0]:
            widths[sid] = arr.shape[1]
        # the default loader keeps features as float16: values it would make inf are refused too
        problem = value_problem(arr, path=path, sample_id=sid, store_dtype=np.float16)
        if problem:
            bad.append(problem)
    rep.add_all(bad, "samples with bad values", path)
    dims = Counter(widths.values())
    if dims:
        if expected_dim is not None:
            width, why = expected_dim, f"expected {expected_dim}"
        else:  # the most common width is taken as the intended one; each other sample is named
            width = dims.most_common(1)[0][0]
            why = f"expected {width} (the width of the other {dims[width]} samples)"
        wrong = [f"{path}: sample {sid}: feature width {w}, {why}" for sid, w in widths.items() if w != width]
        rep.add_all(wrong, "samples with another width", path)
    for split, ss in samples.items():
        missing = [s.id for s in ss if s.id not in raw]
        if missing:
            shown = ", ".join(missing[:LIST_LIMIT]) + (f" and {len(missing) - LIST_LIMIT} more"
                                                        if len(missing) > LIST_LIMIT else "")
            rep.problems.append(f"{path}: {len(missing)} {split} id(s) without {modality} features: {shown}")
        if ss and all(lengths.get(s.id) == 0 for s in ss):
            if split == train_split:
                rep.problems.append(f"{path}: no {modality} frames in any of the {len(ss)} samples of {split}")
            else:
                rep.lines.append(f"  note: no {modality} frames in any of the {len(ss)} samples of {split} "
                                 "(they are scored from the other streams)")
    rep.lines.append(f"\n{modality}: {path} ({path.stat().st_size / 2**20:.1f} MiB), {len(raw)} entries")
    if lengths:
        la = np.array(list(lengths.values()))
        rep.lines.append(f"  widths {dict(dims)}; frames min {la.min()} / median {int(np.median(la))} / "
                         f"max {la.max()}; {int((la > max_len).sum())} longer than max length {max_len} "
                         f"(truncated); {int((la == 0).sum())} with no frame")


def _check_store(rep: CheckReport, reader: DatasetReader, modality: str, samples: dict[str, list[Sample]]) -> None:
    """One modality of a configured feature store: the split ids it lacks, splits without frames."""
    from amess.data.store import open_store

    store = reader.store_dir()
    try:
        source = open_store(store, modality, max_len=reader.max_len(modality))
    except DataError as e:
        rep.problems.append(str(e))
        return
    rep.lines.append(f"\n{modality}: store {store} ({len(source)} samples, width {source.dim}, {source.dtype.name})")
    for split, ss in samples.items():
        missing = [s.id for s in ss if s.id not in source]
        if missing:
            rep.problems.append(f"{source.path}: {len(missing)} {split} id(s) without {modality} features, "
                                f"e.g. {missing[:LIST_LIMIT]}")
    rep.add_all(reader.frame_problems({k: [s for s in v if s.id in source] for k, v in samples.items()},
                                      source, modality), "modalities without frames", store)
