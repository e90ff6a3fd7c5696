"""The reader pattern every benchmark follows, and the dataset registry.

A reader takes the folder as users download it, knows its label order and default
lengths (a `DatasetSpec`), and returns `SplitData` per split: samples (text, label id)
plus the feature sources for video and audio. Adding a dataset is one reader class with
`@register_dataset("name")`, one small fixture and one test.

What `load` refuses (a `DataError` naming the file and the sample), so that training never
runs on data that is silently wrong: unreadable TSVs (not UTF-8, wrong fields; a UTF-8 BOM
and CRLF line endings are fine), a train or dev split without rows, an id twice in a split,
an id of the train split in an evaluation split (a leak), feature values that are not
finite real numbers or that float16 cannot hold (`safe_pickle.to_numpy`), and a modality
without a single frame in a split. `amess data check` reports all of these at once.
`fingerprint(cfg)` is a cheap hash of the data a config reads.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from amess.config import DataConfig
from amess.data.batch import Sample
from amess.data.errors import DataError
from amess.data.features import FeatureSource
from amess.data.store import sha256_file, store_fingerprint

log = logging.getLogger(__name__)

AUTO_STORE = "auto"
"""`feature_store: auto`: convert the feature pickles into a store in the data folder on first
use (and whenever a pickle changes), then read features from it instead of holding them in memory."""
AUTO_STORE_DIR = "amess_feature_store"


@dataclass(frozen=True)
class DatasetSpec:
    """Per-dataset facts: label order, coarse map, default max lengths, known file names."""

    name: str
    labels: tuple[str, ...]
    text_max_len: int
    video_max_len: int
    audio_max_len: int
    video_files: tuple[str, ...]
    audio_files: tuple[str, ...]
    binary_labels: tuple[str, ...] = ()
    binary_map: dict[str, str] = field(default_factory=dict)
    oos_label: str | None = None


@dataclass
class SplitData:
    """One split: samples plus the sources their frames come from (None when unused)."""

    name: str
    samples: list[Sample]
    video: FeatureSource | None = None
    audio: FeatureSource | None = None
    source: str = ""

    def label_ids(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


class IntentDataset(Dataset):
    """Torch view of a split: fills in each sample's frames on access (the feature source
    already truncated them to the max length)."""

    def __init__(self, split: SplitData):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.samples)

    def __getitem__(self, i: int) -> Sample:
        s = self.split.samples[i]
        video = audio = None
        if self.split.video is not None:
            video = self.split.video.get(s.id)
        if self.split.audio is not None:
            audio = self.split.audio.get(s.id)
        return Sample(id=s.id, text=s.text, label=s.label, video=video, audio=audio, context=s.context)


class DatasetReader:
    """Base reader. Subclasses set `spec` and `header` and implement `parse_row` (and may
    override `feature_path`)."""

    spec: DatasetSpec
    header: list[str]
    """The split files' expected header (leading columns; more may follow)."""

    def __init__(self, data_dir: str | Path, cfg: DataConfig):
        self.data_dir = Path(data_dir)
        self.cfg = cfg
        if not self.data_dir.is_dir():
            raise DataError(f"data folder {self.data_dir} does not exist (expected the {self.spec.name} "
                            "folder as downloaded, holding train.tsv / dev.tsv / test.tsv)")

    # --- labels -----------------------------------------------------------------
    @property
    def label_names(self) -> list[str]:
        """In-scope label names for the configured task, in official order."""
        return list(self.spec.binary_labels if self.cfg.task == "binary" else self.spec.labels)

    @property
    def descriptions_set(self) -> str:
        """Name of the shipped label-description set for this dataset and task."""
        return f"{self.spec.name}_binary" if self.cfg.task == "binary" else self.spec.name

    def label_id(self, name: str, *, path: Path, row: int, sample_id: str) -> int:
        """Map a label string to its id for the task; the OOS label maps to C."""
        if self.spec.oos_label is not None and name == self.spec.oos_label:
            return len(self.label_names)
        if name not in self.spec.labels:
            raise DataError(f"{path}: row {row} (sample {sample_id}): unknown label {name!r}; "
                            f"expected one of {list(self.spec.labels)}")
        if self.cfg.task == "binary":
            name = self.spec.binary_map[name]
        return self.label_names.index(name)

    # --- files ------------------------------------------------------------------
    def split_file(self, split: str) -> Path:
        return self.data_dir / f"{split}.tsv"

    def available_splits(self) -> list[str]:
        return [s for s in ("train", "dev", "test") if self.split_file(s).is_file()]

    def parse_row(self, row: dict[str, str], path: Path) -> Sample:
        """One TSV row (header name -> stripped field, plus `_line`) as a Sample; raises DataError."""
        raise NotImplementedError

    def read_rows(self, split: str, *, problems: list[str] | None = None) -> list[Sample]:
        """The samples of one split file. Raises a DataError at the first bad row, or, given a
        `problems` list (`amess data check`), appends every row's problem there, skips that
        row and reads on."""
        path = self.split_file(split)
        rows = read_tsv(path, self.header, problems=problems)
        return self.samples_from_rows(rows, path, split=split, problems=problems)

    def samples_from_rows(self, rows: list[dict[str, str]], path: Path, *, split: str,
                          problems: list[str] | None = None) -> list[Sample]:
        samples = []
        for r in rows:
            try:
                s = self.parse_row(r, path)
            except DataError as e:
                if problems is None:
                    raise
                problems.append(str(e))
                continue
            s.line = int(r["_line"])
            samples.append(s)
        return samples

    def split_problems(self, samples: dict[str, list[Sample]]) -> list[str]:
        """What is wrong across the rows of the given splits: a train or dev split without rows,
        an id twice in one split, and an id of the train split in another split (a leak)."""
        problems = []
        train = self.cfg.train_split
        for split, ss in samples.items():
            f = self.split_file(split)
            if not ss and split in (train, self.cfg.dev_split):
                problems.append(f"{f}: no rows, only a header; expected at least one sample in the {split} split")
            first: dict[str, int | None] = {}
            for s in ss:
                if s.id in first:
                    problems.append(f"{f}: sample id {s.id} occurs twice (lines {first[s.id]} and {s.line}); "
                                    "expected each id once per split")
                else:
                    first[s.id] = s.line
        if train in samples:
            in_train: dict[str, int | None] = {}
            for s in samples[train]:
                in_train.setdefault(s.id, s.line)
            for split, ss in samples.items():
                if split == train:
                    continue
                for s in ss:
                    if s.id in in_train:
                        problems.append(
                            f"sample {s.id} is in both {train} ({self.split_file(train)}, line {in_train[s.id]}) "
                            f"and {split} ({self.split_file(split)}, line {s.line}): evaluating on a training "
                            "sample leaks it; expected disjoint splits")
        return problems

    def frame_problems(self, samples: dict[str, list[Sample]], source: FeatureSource, modality: str) -> list[str]:
        """The training split when no sample of it has a single frame of `modality` (the model
        would learn nothing from the stream: a wrong file, or a modality to leave out). An
        evaluation split without frames is allowed (e.g. test clips in which no face was
        found): the masks make such samples text-only."""
        return [f"{source.path}: no {modality} frames in any of the {len(ss)} samples of {split} "
                f"({self.split_file(split)}); expected (frames, dim) features with frames for some samples, "
                f"or leave {modality} out with --modalities"
                for split, ss in samples.items()
                if split == self.cfg.train_split and ss
                and all(s.id in source and source.length(s.id) == 0 for s in ss)]

    def fingerprint_files(self) -> list[Path]:
        """Files besides the split TSVs and feature files whose contents define the data."""
        return []

    def fingerprint(self) -> str:
        """A cheap sha256 hex digest of the data this reader reads for its config (see `fingerprint`)."""
        h = hashlib.sha256()
        h.update(f"amess-data-fingerprint 1\ndataset {self.spec.name}\n".encode())
        for split in self.available_splits():
            h.update(f"tsv {split} {sha256_file(self.split_file(split))}\n".encode())
        for path in self.fingerprint_files():
            h.update(f"file {path.name} {sha256_file(path) if path.is_file() else 'missing'}\n".encode())
        for modality in ("video", "audio"):
            if modality not in self.cfg.modalities:
                continue
            if self.cfg.feature_store and self.cfg.feature_store != AUTO_STORE:
                h.update(f"store {modality} {store_fingerprint(self.store_dir(), modality)}\n".encode())
            else:
                path = self.feature_path(modality)
                h.update(f"features {modality} {file_fingerprint(path) if path else 'missing'}\n".encode())
        return h.hexdigest()

    def feature_path(self, modality: str) -> Path | None:
        """The feature file for `video` or `audio`: the configured name, else the first known
        name found, looked up relative to `data_dir` (both official layouts)."""
        override = self.cfg.video_file if modality == "video" else self.cfg.audio_file
        names = (override,) if override else (self.spec.video_files if modality == "video" else self.spec.audio_files)
        for name in names:
            p = Path(name)
            p = p if p.is_absolute() else self.data_dir / p
            if p.is_file():
                return p
        return None

    def max_len(self, modality: str) -> int:
        v = getattr(self.cfg, f"{modality}_max_len")
        return v if v is not None else getattr(self.spec, f"{modality}_max_len")

    # --- loading ------------------------------------------------------------------
    def load(self, splits: list[str], *, feature_loader: Callable[..., FeatureSource] | None = None) -> dict[str, SplitData]:
        """Read the TSVs of `splits` and the feature files of the configured modalities.

        A text-only run never opens a feature file. Each feature file is read once for all
        requested splits and keeps only their ids.
        """
        from amess.data.features import InMemoryFeatures

        loader = feature_loader or InMemoryFeatures
        out = {s: SplitData(name=s, samples=self.read_rows(s), source=str(self.split_file(s))) for s in splits}
        samples = {s: sd.samples for s, sd in out.items()}
        _raise_first(self.split_problems(samples))
        all_ids = list(dict.fromkeys(smp.id for sd in out.values() for smp in sd.samples))
        if self.cfg.feature_store == AUTO_STORE and {"video", "audio"} & set(self.cfg.modalities):
            self._auto_store()
        for modality in ("video", "audio"):
            if modality not in self.cfg.modalities:
                continue
            if self.cfg.feature_store:
                source = self._open_store(modality)
                path = Path(source.path)
            else:
                source, path = self._load_pickle(modality, loader, all_ids)
            missing = [i for i in all_ids if i not in source]
            if missing:
                raise DataError(f"{path}: no {modality} features for {len(missing)} sample(s), e.g. {missing[:3]}")
            _raise_first(self.frame_problems(samples, source, modality))
            for sd in out.values():
                setattr(sd, modality, source)
        return out

    def store_dir(self) -> Path:
        """The feature store `cfg.feature_store` names (`auto`: AUTO_STORE_DIR in data_dir)."""
        if self.cfg.feature_store == AUTO_STORE:
            return self.data_dir / AUTO_STORE_DIR
        store = Path(self.cfg.feature_store)
        if not store.is_absolute() and not store.exists():
            store = self.data_dir / store
        return store

    def convert_features(self, store_dir: Path, *, dtype: str = "float16", progress: bool = True,
                         verify: bool = True) -> list[tuple[str, Path, dict]]:
        """`amess data convert`: each configured modality's pickle into the store `store_dir`
        (a modality already converted from the same content is skipped unless the store is
        damaged; `verify` re-hashes its whole data file to tell). Returns
        (modality, source, info) per modality."""
        from amess.data.store import convert_pickle

        done = []
        for modality in ("video", "audio"):
            if modality not in self.cfg.modalities:
                continue
            path = self.feature_path(modality)
            if path is None:
                raise DataError(f"{self.data_dir}: no {modality} feature file found "
                                f"(tried {list(getattr(self.spec, modality + '_files'))})")
            done.append((modality, path, convert_pickle(path, store_dir, modality, dtype=dtype, progress=progress,
                                                        verify=verify)))
        return done

    def _auto_store(self) -> None:
        """`feature_store: auto`: convert the pickles into data_dir/AUTO_STORE_DIR on first use."""
        store = self.store_dir()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return  # several processes must not write one store: they read what `amess data convert` made
        try:
            # sizes and the index hash are checked here; the data bytes sample by sample when read
            for modality, path, info in self.convert_features(store, progress=False, verify=False):
                if not info.get("skipped"):
                    log.info("converted %s features %s into the store %s", modality, path, store)
        except OSError as e:
            raise DataError(f"{store}: cannot write the feature store ({e}); convert elsewhere with "
                            f"`amess data convert --data-dir {self.data_dir} --out DIR` and pass --feature-store DIR") from e

    def _open_store(self, modality: str) -> FeatureSource:
        from amess.data.store import open_store

        store = self.store_dir()
        log.info("reading %s features from the store %s", modality, store)
        return open_store(store, modality, max_len=self.max_len(modality))

    def _load_pickle(self, modality: str, loader: Callable[..., FeatureSource],
                     all_ids: list[str]) -> tuple[FeatureSource, Path]:
        path = self.feature_path(modality)
        if path is None:
            names = self.cfg.video_file if modality == "video" else self.cfg.audio_file
            tried = (names,) if names else getattr(self.spec, f"{modality}_files")
            raise DataError(f"{self.data_dir}: no {modality} feature file found (tried {list(tried)}); "
                            f"name it with --{modality}-file, or use --modalities text")
        log.info("loading %s features from %s", modality, path)
        return loader(path, keep=all_ids, max_len=self.max_len(modality)), path


def read_tsv(path: Path, expected_header: list[str], *, problems: list[str] | None = None
             ) -> list[dict[str, str]]:
    """Read a tab-separated UTF-8 file with the given leading header columns.

    A UTF-8 byte order mark and CRLF line endings are accepted. Each row is a dict header
    name -> stripped field, plus `_line` (its line number). Errors name the file and line;
    with a `problems` list, row-level errors (bad UTF-8, a wrong number of fields) are
    appended there and reading goes on; file-level ones (missing, empty, wrong header) raise.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = read_text(path, problems=problems)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file (expected header {expected_header})") from None
    except csv.Error as e:
        raise DataError(f"{path}: line 1: unreadable header ({e}); expected {expected_header}") from None
    header = [h.strip() for h in header]
    if header[: len(expected_header)] != expected_header:
        raise DataError(f"{path}: header {header} differs from the expected {expected_header}")
    rows = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a field longer than csv's limit
            _problem(problems, f"{path}: line {reader.line_num}: unreadable row ({e}); expected "
                               f"{len(header)} tab-separated fields")
            continue
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if not len(expected_header) <= len(row) <= len(header):
            tab = " (a tab inside a field?)" if len(row) > len(header) else ""
            _problem(problems, f"{path}: line {line}: expected {len(header)} tab-separated fields, got "
                               f"{len(row)}{tab}")
            continue
        rows.append({h: row[j].strip() for j, h in enumerate(header) if j < len(row)} | {"_line": str(line)})
    return rows


def read_text(path: Path, *, problems: list[str] | None = None) -> str:
    """A UTF-8 text file (a leading BOM dropped). Invalid UTF-8 raises a DataError naming the
    file and the line; with a `problems` list it is reported there and replaced by U+FFFD."""
    raw = path.read_bytes()
    bom = raw.startswith(b"\xef\xbb\xbf")
    body = raw[3:] if bom else raw
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        pass
    bad = []
    for n, line in enumerate(body.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(f"line {n} (byte 0x{line[e.start]:02x} at column {e.start + 1})")
    more = f", and {len(bad) - 1} more line(s)" if len(bad) > 1 else ""
    _problem(problems, f"{path}: {bad[0]}: not valid UTF-8{more}; expected a UTF-8 text file (re-save it as UTF-8)")
    return body.decode("utf-8", errors="replace")


def _problem(problems: list[str] | None, message: str) -> None:
    """Raise `message`, or note it when collecting problems."""
    if problems is None:
        raise DataError(message)
    problems.append(message)


def _raise_first(problems: list[str]) -> None:
    """One line: the first problem, and how many more there are."""
    if problems:
        more = f" (and {len(problems) - 1} more problem(s); `amess data check` lists them all)"
        raise DataError(problems[0] + (more if len(problems) > 1 else ""))


_FP_EDGE = 1 << 20  # bytes hashed at each end of a feature file
_FP_BLOCKS, _FP_BLOCK = 16, 1 << 16  # and this many blocks of this size spread over the middle


def file_fingerprint(path: Path) -> str:
    """`size:sha256` of a feature file's first and last MiB and 16 blocks of 64 KiB evenly
    spaced between them (the whole file when it is at most 4 MiB): about 3 MiB read
    whatever the size. An edit that changes neither the size nor a sampled byte is not seen."""
    size = path.stat().st_size
    if size <= 4 * _FP_EDGE:
        return f"{size}:{sha256_file(path)}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_FP_EDGE))
        step = (size - 2 * _FP_EDGE) // (_FP_BLOCKS + 1)
        for k in range(1, _FP_BLOCKS + 1):
            f.seek(_FP_EDGE + k * step)
            h.update(f.read(_FP_BLOCK))
        f.seek(size - _FP_EDGE)
        h.update(f.read(_FP_EDGE))
    return f"{size}:{h.hexdigest()}"


DATASETS: dict[str, type[DatasetReader]] = {}


def register_dataset(name: str) -> Callable[[type[DatasetReader]], type[DatasetReader]]:
    def deco(cls: type[DatasetReader]) -> type[DatasetReader]:
        DATASETS[name] = cls
        return cls

    return deco


def get_reader(cfg: DataConfig) -> DatasetReader:
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; known: {sorted(DATASETS)}")
    return DATASETS[cfg.dataset](cfg.data_dir, cfg)


def fingerprint(data_cfg: DataConfig) -> str:
    """A cheap fingerprint (sha256 hex digest) of the data `data_cfg` reads, for keying
    results on the data as well as on the config.

    It covers: the dataset name; the sha256 of every split TSV the reader finds (train, dev,
    test of the configured folder or MIntRec2.0 subset, in full), and of files such as a
    custom dataset's `labels.txt`; and for each configured feature modality (`video`,
    `audio`; none for a text-only config) either the feature file's size plus the sha256
    of its first and last MiB and 16 blocks of 64 KiB between them (`file_fingerprint`;
    about 3 MiB read per file, whatever its size), or, when `feature_store` names a store,
    the store's recorded dtype, dim, rows, max_len and full data sha256 plus the sha256 of
    its index file (the store's data bytes are checked sample by sample when read).
    Paths, mtimes and file names do not enter: a copied or moved dataset keeps its
    fingerprint. An edit inside a large feature pickle that keeps its size and touches no
    sampled block is not seen (convert it to a store, whose full hash is recorded).
    Reading options (max lengths, task, context) are config, not data, and do not enter.
    Raises DataError when the data folder does not exist (as `get_reader` does).
    """
    return get_reader(data_cfg).fingerprint()


def stratified_holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split off `fraction` of each class (at least one row of classes with 2+ rows), seeded."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    held: set[int] = set()
    for idx in by_class.values():
        n = int(round(len(idx) * fraction))
        if n == 0 and len(idx) >= 2:
            n = 1
        held.update(rng.permutation(idx)[:n].tolist())
    keep = [s for i, s in enumerate(samples) if i not in held]
    out = [s for i, s in enumerate(samples) if i in held]
    return keep, out


