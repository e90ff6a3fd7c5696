"""The real MIntRec2.0 in-scope text and clip descriptions (`shared/data/mintrec2`, see its
SOURCE.md), read as shipped: `in-scope/{train,dev}.tsv` only. Skipped when absent."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from amess.config import DataConfig
from amess.data import get_reader
from amess.data.clip_descriptions import read_description_folder

SHARED_MINTREC2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mintrec2"

pytestmark = pytest.mark.skipif(not (SHARED_MINTREC2 / "in-scope" / "train.tsv").is_file(),
                                reason="shared MIntRec2.0 text not present")


def cfg(**kw) -> DataConfig:
    return DataConfig(dataset="mintrec2", data_dir=str(SHARED_MINTREC2), subset="in-scope", modalities=["text"], **kw)


def test_in_scope_folder_as_shipped():
    reader = get_reader(cfg())
    assert reader.data_dir == SHARED_MINTREC2 / "in-scope" and reader.available_splits() == ["train", "dev"]
    data = reader.load(["train", "dev"])
    assert (len(data["train"].samples), len(data["dev"].samples)) == (6165, 1106)
    assert all(s.label < 30 for sd in data.values() for s in sd.samples)


def test_multi_turn_context_on_the_real_dialogues():
    data = get_reader(cfg(context=True)).load(["train", "dev"])
    for split, sd in data.items():
        with open(SHARED_MINTREC2 / "in-scope" / f"{split}.tsv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        # independently: the same speaker's latest earlier utterance in the same dialogue
        turns: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for r in rows:
            turns.setdefault((r["Dialogue_id"], r["speaker_name"]), []).append((int(r["Utterance_id"]), r["Text"]))
        expected = {}
        for (dia, _), seq in turns.items():
            seq.sort()
            for k, (utt, _) in enumerate(seq):
                expected[f"dia{dia}_utt{utt}"] = seq[k - 1][1] if k else None
        assert {s.id: s.context for s in sd.samples} == expected
        with_ctx = sum(c is not None for c in expected.values())
        assert 0.5 < with_ctx / len(expected) < 0.8  # 3,872 of 6,165 train rows, 752 of 1,106 dev rows


def test_descriptions_align_with_the_text():
    files = read_description_folder(SHARED_MINTREC2 / "video_descriptions")
    assert [f.path.name for f in files] == ["train.tsv", "dev.tsv"]
    assert files[0].field_names == ["Speakers Actions", "Emotions and Facial Expressions", "Interaction with Others"]
    data = get_reader(cfg()).load(["train", "dev"])
    for f, split in zip(files, ("train", "dev")):
        assert [r.id for r in f.rows] == [s.id for s in data[split].samples]
        assert all(all(r.fields) for r in f.rows)


def test_data_check_with_subset_flag(capsys):
    from amess.cli import main

    assert main(["data", "check", "--dataset", "mintrec2", "--data-dir", str(SHARED_MINTREC2),
                 "--subset", "in-scope", "--modalities", "text"]) == 0
    out = capsys.readouterr().out
    assert "train: 6165 rows" in out and "dev: 1106 rows" in out and "no problems found" in out
