"""Data assembly for a run: the splits a config names, the label descriptions, loaders and
the collator (with the method's collator hook)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader

from amess.config import Config
from amess.data import DataError, IntentDataset, SplitData, get_reader
from amess.data.base import DatasetReader, stratified_holdout
from amess.data.batch import Collator

log = logging.getLogger(__name__)

HOLDOUT_KEY = "train_holdout"
"""Name of the dev slice held back from train (`data.dev_split: train:0.1`)."""


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

    @property
    def feature_dims(self) -> dict[str, int]:
        return {m: d for m, d in (("video", self.video_dim), ("audio", self.audio_dim)) if d is not None}


def read_modalities(cfg: Config) -> list[str]:
    """The configured modalities the method reads; an error for one it requires but lacks."""
    from amess.models import method_class

    cls = method_class(cfg.model.method)
    missing = [m for m in cls.requires if m not in cfg.data.modalities]
    if missing:
        raise ValueError(f"method {cfg.model.method!r} needs the modalities {list(cls.requires)}; "
                         f"--modalities {','.join(cfg.data.modalities)} lacks {', '.join(missing)}")
    return [m for m in cfg.data.modalities if m in cls.reads]


def prepare_data(cfg: Config, seed: int) -> PreparedData:
    """Read the splits the config names; hold back a dev slice of train when asked
    (`dev_split: train:0.1`); drop held-out intents from train and dev.

    Feature files are loaded only for the modalities the method reads (`IntentModel.reads`):
    the `text` baseline on an all-modality config never holds video or audio in memory."""
    reads = read_modalities(cfg)
    data_cfg = cfg.data
    unread = [m for m in data_cfg.modalities if m not in reads]
    if unread:
        log.info("method %r does not read %s: those features are not loaded", cfg.model.method, ", ".join(unread))
        data_cfg = replace(data_cfg, modalities=reads)
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
    for name, split in (("train", train), (dev_key, dev)):
        if not split.samples:
            raise DataError(f"{reader.split_file(cfg.data.train_split if name != 'dev' else 'dev')}: "
                            f"the {name} split has no rows to {'train on' if name == 'train' else 'select epochs on'}")
    return PreparedData(
        reader=reader, label_names=label_names, train=train, dev=dev, dev_key=dev_key,
        tests={s: splits[s] for s in tests},
        video_dim=train.video.dim if train.video is not None else None,
        audio_dim=train.audio.dim if train.audio is not None else None,
    )


def load_descriptions_for(cfg: Config, reader: DatasetReader, label_names: list[str]) -> list[str] | None:
    """Label descriptions for SS and description-based inference: the configured file, else
    the set shipped for the dataset; None when no shipped set exists or the method reads none."""
    from amess.labels import load_descriptions, shipped_sets
    from amess.models import method_class

    if not method_class(cfg.model.method).uses_descriptions:
        return None
    source = cfg.data.label_descriptions or reader.descriptions_set
    if cfg.data.label_descriptions is None and source not in shipped_sets():
        return None
    return load_descriptions(source, label_names)


def make_loader(split: SplitData, cfg: Config, collator: Collator, *, shuffle: bool, seed: int,
                batch_size: int, device: torch.device | str | None = None) -> DataLoader:
    """A loader over `split`; its shuffling generator is `loader.generator` (saved and restored
    on resume). `device`: where the batches go; on a CUDA device they are assembled in pinned
    (page-locked) memory (`Batch.pin_memory`) so that the copy to the GPU can run asynchronously
    (`Batch.to(..., non_blocking=True)`); never on a CPU, where pinning only costs."""
    ds = IntentDataset(split)  # frames come truncated from the feature source
    g = torch.Generator()
    g.manual_seed(seed)
    pin = device is not None and torch.device(device).type == "cuda"
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=g,
                      num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                      pin_memory=pin)


def text_max_len(cfg: Config, reader: DatasetReader) -> int:
    return cfg.data.text_max_len or reader.spec.text_max_len


def make_collator(cfg: Config, tokenizer, *, text_max_len: int, video_dim: int | None,
                  audio_dim: int | None) -> Collator:
    """The batch collator, with the method's collator hook (`IntentModel.collate_hook`)."""
    from amess.models import method_class

    cls = method_class(cfg.model.method)
    hook = cls.collate_hook(cfg.method_settings, tokenizer, text_max_len)
    return Collator(tokenizer, text_max_len=text_max_len, video_dim=video_dim, audio_dim=audio_dim, hook=hook)
