"""Your own intents: a folder of TSVs with your label set, read like the benchmarks.

Layout (any subset of splits; features optional):

    my_data/
      labels.txt            one intent per line, in the order that defines the ids
      train.tsv dev.tsv test.tsv   header: id<TAB>text<TAB>label
      video.pkl audio.pkl   optional: dict id -> (T, d) arrays (restricted unpickler)

Rows labelled `UNK` are out-of-scope. Pair it with `--label-descriptions FILE` (for example
one written by `amess labels generate`) to train A-MESS with semantic synchronisation.
"""

from __future__ import annotations

from pathlib import Path

from amess.data.base import DataError, DatasetReader, DatasetSpec, read_text, register_dataset
from amess.data.batch import Sample

CUSTOM_HEADER = ["id", "text", "label"]


@register_dataset("custom")
class CustomReader(DatasetReader):
    """Label order from `labels.txt`; text limits as MIntRec2.0's (50 tokens)."""

    header = CUSTOM_HEADER

    def __init__(self, data_dir, cfg):
        super().__init__(data_dir, cfg)
        path = self.data_dir / "labels.txt"
        if not path.is_file():
            raise DataError(f"{path}: missing; list your intents there, one per line, in id order")
        labels = [ln.strip() for ln in read_text(path).splitlines()
                  if ln.strip() and not ln.startswith("#")]
        dup = sorted({n for n in labels if labels.count(n) > 1})
        if not labels or dup or "UNK" in labels:
            raise DataError(f"{path}: expected distinct intent names other than UNK, one per line "
                            f"(duplicates: {dup})")
        if cfg.task != "intent":
            raise DataError(f"{self.data_dir}: a custom dataset has no binary task")
        self.spec = DatasetSpec(name="custom", labels=tuple(labels), text_max_len=50, video_max_len=400,
                                audio_max_len=1000, video_files=("video.pkl",), audio_files=("audio.pkl",),
                                oos_label="UNK")

    @property
    def descriptions_set(self) -> str:
        return "custom"  # no shipped set: pass --label-descriptions

    def fingerprint_files(self) -> list[Path]:
        return [self.data_dir / "labels.txt"]  # it defines the label ids

    def parse_row(self, row: dict[str, str], path: Path) -> Sample:
        return Sample(id=row["id"], text=row["text"],
                      label=self.label_id(row["label"], path=path, row=int(row["_line"]), sample_id=row["id"]))
