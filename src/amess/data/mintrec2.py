"""MIntRec2.0 (ICLR 2024): 30 intents plus out-of-scope `UNK`, multi-party dialogues.

`data_dir` is the MIntRec2.0 root as downloaded, holding `in-scope/`,
`out-of-scope/MIntRec2.0-OOD/` and `total/`; `DataConfig.subset` picks the folder whose
TSVs are read. A folder that holds the TSVs directly is accepted as well. Feature files
(`swin_roi.pkl` / `wavlm_feats.pkl`, or their `_binary` variants) are looked up in the
chosen folder first, then in the root and the other subset folders: releases often ship
one feature folder for all three.

Multi-turn mode (`DataConfig.context`, docs/datasets.md "Multi-turn mode"): a sample's
context is the previous utterance (lower `Utterance_id`) of the same speaker in the same
dialogue and split file; its text becomes `Sample.context` and its frames are put before
the sample's own in time (`ContextFeatures`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from amess.config import DataConfig
from amess.data.base import DataError, DatasetReader, DatasetSpec, SplitData, register_dataset
from amess.data.batch import Sample
from amess.data.features import FeatureSource

log = logging.getLogger(__name__)

MINTREC2_LABELS = (
    "Acknowledge", "Advise", "Agree", "Apologise", "Arrange", "Ask for help", "Asking for opinions", "Care",
    "Comfort", "Complain", "Confirm", "Criticize", "Doubt", "Emphasize", "Explain", "Flaunt", "Greet", "Inform",
    "Introduce", "Invite", "Joke", "Leave", "Oppose", "Plan", "Praise", "Prevent", "Refuse", "Taunt", "Thank",
    "Warn",
)
MINTREC2_HEADER = ["Dialogue_id", "Utterance_id", "Text", "Label", "Start_timestamp", "End_timestamp", "Source",
                   "speaker_name"]
# subset name -> folders (relative to the root) that may hold its TSVs, in order of preference
SUBSET_DIRS = {
    "total": ("total",),
    "in-scope": ("in-scope",),
    "out-of-scope": ("out-of-scope/MIntRec2.0-OOD", "out-of-scope", "MIntRec2.0-OOD"),
}

MINTREC2_SPEC = DatasetSpec(
    name="mintrec2",
    labels=MINTREC2_LABELS,
    text_max_len=50,
    video_max_len=180,
    audio_max_len=400,
    video_files=("video_data/swin_roi.pkl", "video_data/swin_roi_binary.pkl", "swin_roi.pkl", "swin_roi_binary.pkl"),
    audio_files=("audio_data/wavlm_feats.pkl", "audio_data/wavlm_feats_binary.pkl", "wavlm_feats.pkl",
                 "wavlm_feats_binary.pkl"),
    oos_label="UNK",
)


def sample_id(dialogue_id: str, utterance_id: str) -> str:
    """The key into the feature pickles, e.g. `dia12_utt3`."""
    return f"dia{dialogue_id}_utt{utterance_id}"


class ContextFeatures:
    """Multi-turn view of a feature source: frames of the previous turn, then the sample's own.

    `prev_of` maps a sample id to its context sample's id. The two `(T, dim)` arrays (each
    already truncated to the max length by `base`) are concatenated in time as
    [previous, current] and only the last `max_len` frames are kept, so the current
    utterance is always whole and the previous one contributes its most recent frames.
    Samples without a context are served unchanged.
    """

    def __init__(self, base: FeatureSource, prev_of: Mapping[str, str], max_len: int):
        self.base = base
        self.prev_of = dict(prev_of)
        self.max_len = max_len
        self.dim = base.dim
        self.path = base.path

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.base

    def get(self, sample_id: str) -> np.ndarray:
        cur = self.base.get(sample_id)
        prev = self.prev_of.get(sample_id)
        if prev is None:
            return cur
        both = np.concatenate([self.base.get(prev), cur], 0)  # (T_prev + T_cur, dim)
        return both[-self.max_len:]

    def length(self, sample_id: str) -> int:
        """True frames of previous plus current turn (before any truncation)."""
        prev = self.prev_of.get(sample_id)
        return self.base.length(sample_id) + (self.base.length(prev) if prev is not None else 0)


@register_dataset("mintrec2")
class MIntRec2Reader(DatasetReader):
    spec = MINTREC2_SPEC
    header = MINTREC2_HEADER

    def __init__(self, data_dir: str | Path, cfg: DataConfig):
        super().__init__(data_dir, cfg)
        if cfg.task == "binary":
            raise DataError("MIntRec2.0 has no binary (coarse) task; use --task intent")
        if cfg.subset not in SUBSET_DIRS:
            raise DataError(f"unknown MIntRec2.0 subset {cfg.subset!r}; expected one of {list(SUBSET_DIRS)}")
        self.root, self.data_dir = self._resolve(self.data_dir, cfg.subset)
        self._prev_of: dict[str, dict[str, str]] = {}

    @staticmethod
    def _resolve(given: Path, subset: str) -> tuple[Path, Path]:
        """(root, folder holding the TSVs) for the MIntRec2.0 root or a folder of TSVs."""
        for rel in SUBSET_DIRS[subset]:
            if (given / rel).is_dir():
                return given, given / rel
        if any((given / f"{s}.tsv").is_file() for s in ("train", "dev", "test")):
            for rels in SUBSET_DIRS.values():  # a subset folder given directly: its root is above it
                for rel in rels:
                    parts = Path(rel).parts
                    if given.parts[-len(parts):] == parts:
                        return given.parents[len(parts) - 1], given
            return given, given
        tried = [str(given / rel) for rel in SUBSET_DIRS[subset]]
        present = [name for name, rels in SUBSET_DIRS.items() if any((given / rel).is_dir() for rel in rels)]
        hint = (f"; it holds {present}: choose one with --set data.subset={present[0]} "
                f"(`amess data check`: --subset {present[0]})") if present else ""
        raise DataError(f"{given}: no MIntRec2.0 {subset!r} folder (looked for {tried}) and no "
                        "train/dev/test.tsv directly in it; expected the MIntRec2.0 root holding in-scope/, "
                        f"out-of-scope/MIntRec2.0-OOD/ and total/{hint}")

    def feature_dirs(self) -> list[Path]:
        """Where feature files are looked for: the chosen folder, the root, the other subsets."""
        dirs = [self.data_dir, self.root] + [self.root / rel for rels in SUBSET_DIRS.values() for rel in rels]
        return [d for d in dict.fromkeys(dirs) if d.is_dir()]

    def feature_path(self, modality: str) -> Path | None:
        override = self.cfg.video_file if modality == "video" else self.cfg.audio_file
        names = (override,) if override else getattr(self.spec, f"{modality}_files")
        for folder in self.feature_dirs():
            for name in names:
                p = Path(name) if Path(name).is_absolute() else folder / name
                if p.is_file():
                    return p
        return None

    def parse_row(self, row: dict[str, str], path: Path) -> Sample:
        sid = sample_id(row["Dialogue_id"], row["Utterance_id"])
        label = self.label_id(row["Label"], path=path, row=int(row["_line"]), sample_id=sid)
        return Sample(id=sid, text=row["Text"], label=label)

    def samples_from_rows(self, rows: list[dict[str, str]], path: Path, *, split: str,
                          problems: list[str] | None = None) -> list[Sample]:
        samples = super().samples_from_rows(rows, path, split=split, problems=problems)
        if self.cfg.context:
            text = {s.id: s.text for s in samples}
            prev_of = {k: v for k, v in self._previous_turns(rows, path, problems).items() if v in text}
            for s in samples:
                s.context = text[prev_of[s.id]] if s.id in prev_of else None
            self._prev_of[split] = prev_of
        return samples

    @staticmethod
    def _previous_turns(rows: list[dict[str, str]], path: Path, problems: list[str] | None = None
                        ) -> dict[str, str]:
        """sample id -> id of the same speaker's previous utterance in the same dialogue."""
        turns: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for r in rows:
            sid = sample_id(r["Dialogue_id"], r["Utterance_id"])
            try:
                utt = int(r["Utterance_id"])
            except ValueError:
                msg = (f"{path}: line {r['_line']} (sample {sid}): Utterance_id {r['Utterance_id']!r} "
                       "is not an integer; multi-turn mode orders a dialogue's turns by it")
                if problems is None:
                    raise DataError(msg) from None
                problems.append(msg)
                continue
            if r["speaker_name"]:  # an unnamed speaker cannot be matched to earlier turns
                turns.setdefault((r["Dialogue_id"], r["speaker_name"]), []).append((utt, sid))
        prev_of = {}
        for seq in turns.values():
            seq.sort()
            prev_of.update({sid: seq[k - 1][1] for k, (_, sid) in enumerate(seq) if k > 0})
        return prev_of

    def load(self, splits: list[str], *, feature_loader: Callable[..., FeatureSource] | None = None
             ) -> dict[str, SplitData]:
        for modality in ("video", "audio"):
            if self.cfg.feature_store:
                break  # features come from the converted store, not the pickles
            if modality in self.cfg.modalities and self.feature_path(modality) is None:
                override = self.cfg.video_file if modality == "video" else self.cfg.audio_file
                names = [override] if override else list(getattr(self.spec, f"{modality}_files"))
                raise DataError(f"no {modality} feature file found: tried {names} in "
                                f"{[str(d) for d in self.feature_dirs()]}; name it with --{modality}-file, "
                                "or use --modalities text")
        out = super().load(splits, feature_loader=feature_loader)
        if self.cfg.context:
            for split, sd in out.items():
                for modality in ("video", "audio"):
                    source = getattr(sd, modality)
                    if source is not None:
                        setattr(sd, modality, ContextFeatures(source, self._prev_of[split], self.max_len(modality)))
        return out
