"""The reader pattern every benchmark follows, and the dataset registry.

A reader takes the folder as users download it, knows its label order and default
lengths (a `DatasetSpec`), and returns `SplitData` per split: samples (text, label id)
plus the feature sources for video and audio. Adding a dataset is one reader class with
`@register_dataset("name")`, one small fixture and one test.
"""

from __future__ import annotations

import csv
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
    """Base reader. Subclasses set `spec` and implement `read_rows` and `feature_paths`."""

    spec: DatasetSpec

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

    def read_rows(self, split: str) -> list[Sample]:
        raise NotImplementedError

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
        all_ids = [smp.id for sd in out.values() for smp in sd.samples]
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

    def convert_features(self, store_dir: Path, *, dtype: str = "float16", progress: bool = True
                         ) -> list[tuple[str, Path, dict]]:
        """`amess data convert`: each configured modality's pickle into the store `store_dir`
        (a modality already converted from the same file is skipped). Returns
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
            done.append((modality, path, convert_pickle(path, store_dir, modality, dtype=dtype, progress=progress)))
        return done

    def _auto_store(self) -> None:
        """`feature_store: auto`: convert the pickles into data_dir/AUTO_STORE_DIR on first use."""
        store = self.store_dir()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return  # several processes must not write one store: they read what `amess data convert` made
        try:
            for modality, path, info in self.convert_features(store, progress=False):
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


def read_tsv(path: Path, expected_header: list[str]) -> list[dict[str, str]]:
    """Read a tab-separated file with the given header; errors name the file and row."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file (expected header {expected_header})") from None
        header = [h.strip() for h in header]
        if header[: len(expected_header)] != expected_header:
            raise DataError(f"{path}: header {header} differs from the expected {expected_header}")
        rows = []
        for i, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(expected_header):
                raise DataError(f"{path}: line {i}: expected {len(expected_header)} tab-separated fields, got {len(row)}")
            rows.append({h: row[j].strip() for j, h in enumerate(header) if j < len(row)} | {"_line": str(i)})
    return rows


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


