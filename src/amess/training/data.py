"""Data assembly for a run: the splits a config names, the label descriptions, loaders and
the collator (with the method's collator hook)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
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
    """The intents of the model's head: the dataset's, or only the known ones (`data.known_ratio`)."""
    train: SplitData
    dev: SplitData
    dev_key: str
    tests: dict[str, SplitData]
    video_dim: int | None
    audio_dim: int | None
    all_label_names: list[str] | None = None
    """The dataset's intents for the task, in its order (None = `label_names`)."""
    known_labels: list[str] | None = None
    """Under `data.known_ratio`: this seed's known intents (== `label_names`); None otherwise."""

    @property
    def unknown_labels(self) -> list[str] | None:
        if self.known_labels is None:
            return None
        return [n for n in (self.all_label_names or []) if n not in set(self.known_labels)]

    @property
    def feature_dims(self) -> dict[str, int]:
        return {m: d for m, d in (("video", self.video_dim), ("audio", self.audio_dim)) if d is not None}


def read_modalities(cfg: Config) -> list[str]:
    """The configured modalities the method reads; an error for one it requires but lacks."""
    from amess.models import method_class

    cls = method_class(cfg.model.method)
    problem = cls.modality_problem(cfg.data.modalities)
    if problem:
        raise ValueError(f"method {cfg.model.method!r} {problem}; it got --modalities {','.join(cfg.data.modalities)}")
    return [m for m in cfg.data.modalities if m in cls.reads]


def choose_known_labels(label_names: list[str], ratio: float, seed: int) -> list[str]:
    """The known intents of one seed under the open-intent protocol: `round(ratio * C)` of the
    `C` names, drawn without replacement by `numpy.random.default_rng(seed).choice`, returned
    in the dataset's label order (so the head's class ids follow the dataset's order).

    TEXTOIR (thuiar/TEXTOIR@09b9096, `open_intent_detection/dataloaders/base.py`,
    `DataManager.__init__`) seeds the global numpy RNG with the run's seed, takes `n_known_cls = round(len(labels) *
    known_cls_ratio)` and draws `np.random.choice(labels, n_known_cls, replace=False)`. We
    follow its count (the same Python `round`, so 0.25 of 30 intents is 8: ties round to
    even) and its uniform draw without replacement, with two deliberate differences: a
    local `Generator` instead of the global legacy `RandomState` (no other code's use of
    numpy's global state can shift the draw), so the set drawn for a seed is not TEXTOIR's;
    and the known names sorted by label order, where TEXTOIR keeps the draw order as class
    ids. A count below 1 or above C-1 is refused: no intent to learn, or none left open."""
    C = len(label_names)
    n_known = round(C * ratio)
    if not 1 <= n_known <= C - 1:
        raise ValueError(f"--known-ratio {ratio:g} keeps round({ratio:g} * {C}) = {n_known} of the {C} intents as "
                         f"known; expected 1 to {C - 1} (some intents known, at least one left open)")
    picked = np.random.default_rng(seed).choice(C, size=n_known, replace=False)
    return [label_names[i] for i in sorted(int(i) for i in picked)]


def remap_to_known(split: SplitData, label_names: list[str], known: list[str], *,
                   drop_unknown: bool) -> SplitData:
    """`split` with its labels mapped by name from the dataset's ids (`label_names`, out-of-
    scope = `len(label_names)`) to the known intents' ids (`known`, out-of-scope = `K =
    len(known)`). Rows of the other intents are dropped (`drop_unknown`: train, dev) or
    become out-of-scope, id `K` (test splits); the dataset's own out-of-scope rows get `K`.
    As TEXTOIR's `bert_loader.get_examples`: train and eval keep the known intents' rows,
    test keeps every row and labels the others `<UNK>`, the id after the known ones.
    New `Sample`s: a split read once for two roles (dev and test) is not changed in place."""
    C, K = len(label_names), len(known)
    to_known = {i: known.index(n) if n in known else K for i, n in enumerate(label_names)}
    to_known[C] = K
    samples = []
    for s in split.samples:
        if s.label not in to_known:
            raise DataError(f"{split.source or split.name}: sample {s.id} has label id {s.label}, outside 0..{C}")
        if drop_unknown and s.label < C and label_names[s.label] not in known:
            continue
        samples.append(replace(s, label=to_known[s.label]))
    return replace(split, samples=samples)


def prepare_data(cfg: Config, seed: int) -> PreparedData:
    """Read the splits the config names; hold back a dev slice of train when asked
    (`dev_split: train:0.1`); drop held-out intents from train and dev.

    Open intent (`data.known_ratio`, TEXTOIR's protocol): this seed's known intents are
    drawn (`choose_known_labels`) and every split's labels remapped by name to them
    (`remap_to_known`): rows of the other intents leave train and the early-stopping dev
    (a held-back `train:0.1` slice included), and in every test split they, like the
    dataset's own out-of-scope rows, get the out-of-scope id `K`. The dataset's own
    out-of-scope rows stay in dev (threshold tuning, as for MIntRec2.0) and in train only
    with outlier exposure; rows of unknown intents never reach training. The loop,
    evaluation and detectors then see a K-intent dataset with out-of-scope rows.

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
    test_data = {s: splits[s] for s in tests}
    all_names, known = label_names, None
    if cfg.data.known_ratio is not None:
        if dev_split is not None and dev_split in tests:
            raise ValueError(f"--known-ratio: the early-stopping split {dev_split!r} is also a test split; its "
                             "rows of unknown intents would be both removed and scored, and the thresholds tuned "
                             f"on them: report it with --dev-split {cfg.data.train_split}:0.1 --test-splits "
                             f"{dev_split} instead")
        known = choose_known_labels(label_names, cfg.data.known_ratio, seed)
        n_train, n_dev = len(train.samples), len(dev.samples)
        train = remap_to_known(train, label_names, known, drop_unknown=True)
        dev = remap_to_known(dev, label_names, known, drop_unknown=True)
        test_data = {k: remap_to_known(v, label_names, known, drop_unknown=False) for k, v in test_data.items()}
        log.info("open intent (known ratio %g, seed %d): %d of %d intents known: %s; rows of the other %d removed "
                 "from train (%d) and %s (%d), out-of-scope in %s", cfg.data.known_ratio, seed, len(known),
                 len(label_names), ", ".join(known), len(label_names) - len(known), n_train - len(train.samples),
                 dev_key, n_dev - len(dev.samples), ", ".join(tests) or "no test split")
        label_names = known
    for name, split in (("train", train), (dev_key, dev)):
        if not split.samples:
            raise DataError(f"{reader.split_file(cfg.data.train_split if name != 'dev' else 'dev')}: "
                            f"the {name} split has no rows to {'train on' if name == 'train' else 'select epochs on'}")
    return PreparedData(
        reader=reader, label_names=label_names, train=train, dev=dev, dev_key=dev_key, tests=test_data,
        video_dim=train.video.dim if train.video is not None else None,
        audio_dim=train.audio.dim if train.audio is not None else None,
        all_label_names=all_names, known_labels=known,
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
