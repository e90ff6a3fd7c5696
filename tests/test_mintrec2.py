"""MIntRec2.0: the reader on a hand-written fixture in the official layout, multi-turn mode,
and the synthetic generator in that layout."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from amess.config import DataConfig
from amess.data import DataError, IntentDataset, get_reader
from amess.data.mintrec2 import MINTREC2_LABELS, ContextFeatures
from amess.data.safe_pickle import safe_load, to_numpy

HEADER = ["Dialogue_id", "Utterance_id", "Text", "Label", "Start_timestamp", "End_timestamp", "Source",
          "speaker_name"]
ROWS = {  # (dialogue, utterance, text, label, speaker)
    "train": [("0", "0", "hello penny", "Greet", "Sheldon"), ("0", "1", "hi sheldon", "Greet", "Penny"),
              ("0", "2", "what is that thing", "UNK", "Sheldon"), ("0", "3", "thanks a lot", "Thank", "Penny"),
              ("0", "4", "bye then", "Leave", "Sheldon"), ("1", "0", "you did great", "Praise", "Amy"),
              ("1", "1", "i doubt it", "Doubt", "Jonah")],
    "dev": [("2", "0", "we were on a break", "UNK", "Ross"), ("2", "1", "watch out", "Warn", "Rachel")],
    "test": [("3", "0", "how you doin", "Greet", "Joey"), ("3", "1", "right okay", "Acknowledge", "Joey")],
}
OOD = "out-of-scope/MIntRec2.0-OOD"


def sid(r) -> str:
    return f"dia{r[0]}_utt{r[1]}"


def write_mintrec2(root: Path, rows=ROWS, *, feature_dir: str = "total",
                   names=("swin_roi_binary.pkl", "wavlm_feats_binary.pkl")) -> dict[str, int]:
    """The official layout; video (T, 256) or (T, 1, 256) arrays, audio torch tensors.
    Sample k of the flattened rows has k + 2 video and 2k + 3 audio frames, filled with k."""
    root.mkdir(parents=True, exist_ok=True)
    video, audio, n_video = {}, {}, {}
    k = 0
    for split, rs in rows.items():
        for folder, keep in (("total", lambda r: True), ("in-scope", lambda r: r[3] != "UNK"),
                             (OOD, lambda r: r[3] == "UNK")):
            (root / folder).mkdir(parents=True, exist_ok=True)
            lines = ["\t".join(HEADER)] + ["\t".join([r[0], r[1], r[2], r[3], "0:00:01.000", "0:00:02.500",
                                                      "Friends", r[4]]) for r in rs if keep(r)]
            (root / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        for r in rs:
            v = np.full((k + 2, 256), k, np.float32)
            video[sid(r)] = v[:, None, :] if k % 2 else v  # some (T, 1, 256) as in the release
            audio[sid(r)] = torch.full((2 * k + 3, 768), float(k))
            n_video[sid(r)] = k + 2
            k += 1
    for sub, name, feats in (("video_data", names[0], video), ("audio_data", names[1], audio)):
        (root / feature_dir / sub).mkdir(parents=True, exist_ok=True)
        with open(root / feature_dir / sub / name, "wb") as f:
            pickle.dump(feats, f)
    return n_video


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="mintrec2", data_dir=str(root), **kw)


def test_reader_total_ids_labels_features(tmp_path):
    n_video = write_mintrec2(tmp_path)
    reader = get_reader(cfg(tmp_path))
    assert reader.label_names == list(MINTREC2_LABELS) and len(MINTREC2_LABELS) == 30
    assert reader.label_names[:3] == ["Acknowledge", "Advise", "Agree"] and reader.label_names[-1] == "Warn"
    assert reader.available_splits() == ["train", "dev", "test"]
    data = reader.load(["train", "dev", "test"])
    tr = data["train"]
    assert [s.id for s in tr.samples] == ["dia0_utt0", "dia0_utt1", "dia0_utt2", "dia0_utt3", "dia0_utt4",
                                          "dia1_utt0", "dia1_utt1"]
    idx = MINTREC2_LABELS.index
    assert [s.label for s in tr.samples] == [idx("Greet"), idx("Greet"), 30, idx("Thank"), idx("Leave"),
                                             idx("Praise"), idx("Doubt")]
    assert all(s.context is None for s in tr.samples)  # single-turn by default
    assert tr.video.path.endswith("total/video_data/swin_roi_binary.pkl")
    assert tr.video.dim == 256 and tr.audio.dim == 768
    ds = IntentDataset(tr)
    for i in range(len(ds)):  # (T, 1, 256) and (T, 256) both come out (T, 256); tensors as arrays
        item = ds[i]
        assert item.video.shape == (n_video[item.id], 256) and item.video.dtype == np.float32
        assert item.audio.shape == (2 * i + 3, 768)
    assert data["test"].samples[1].label == idx("Acknowledge")


def test_subsets_and_feature_lookup(tmp_path):
    write_mintrec2(tmp_path)
    ins = get_reader(cfg(tmp_path, subset="in-scope"))
    data = ins.load(["train", "dev"])
    assert [s.id for s in data["train"].samples] == ["dia0_utt0", "dia0_utt1", "dia0_utt3", "dia0_utt4",
                                                     "dia1_utt0", "dia1_utt1"]
    assert all(s.label < 30 for s in data["train"].samples)
    assert data["train"].video.path.endswith("total/video_data/swin_roi_binary.pkl")  # found beside, in total/
    oos = get_reader(cfg(tmp_path, subset="out-of-scope"))
    assert oos.data_dir == tmp_path / OOD
    data = oos.load(["train", "dev", "test"])
    assert [s.id for s in data["train"].samples] == ["dia0_utt2"] and data["train"].samples[0].label == 30
    assert data["test"].samples == []
    # a folder holding the TSVs directly, its features in a sibling subset folder
    direct = get_reader(cfg(tmp_path / "in-scope"))
    assert direct.root == tmp_path and direct.feature_path("audio") == (
        tmp_path / "total" / "audio_data" / "wavlm_feats_binary.pkl")
    assert len(direct.load(["dev"])["dev"].samples) == 1
    # features in the root instead, under the plain names
    root2 = tmp_path / "flat"
    write_mintrec2(root2, feature_dir=".", names=("swin_roi.pkl", "wavlm_feats.pkl"))
    assert get_reader(cfg(root2, subset="in-scope")).feature_path("video") == root2 / "video_data" / "swin_roi.pkl"


def test_multi_turn_context_text_and_frames(tmp_path, tiny_encoder_dir):
    from transformers import AutoTokenizer

    from amess.data.batch import Collator

    n_video = write_mintrec2(tmp_path)
    data = get_reader(cfg(tmp_path, context=True)).load(["train", "test"])
    ctx = {s.id: s.context for s in data["train"].samples + data["test"].samples}
    assert ctx == {"dia0_utt0": None, "dia0_utt1": None, "dia0_utt2": "hello penny", "dia0_utt3": "hi sheldon",
                   "dia0_utt4": "what is that thing", "dia1_utt0": None, "dia1_utt1": None, "dia3_utt0": None,
                   "dia3_utt1": "how you doin"}
    tr = data["train"]
    assert isinstance(tr.video, ContextFeatures)
    ds = IntentDataset(tr)
    item = ds[2]  # dia0_utt2 after dia0_utt0: [previous, current] in time
    assert item.context == "hello penny"
    assert item.video.shape == (n_video["dia0_utt0"] + n_video["dia0_utt2"], 256)
    assert item.audio.shape == (3 + 7, 768)
    assert item.video[0, 0] == 0 and item.video[-1, 0] == 2
    assert tr.video.length("dia0_utt2") == 2 + 4
    # truncation keeps the last max_len frames: the current turn whole, the previous turn's tail
    short = get_reader(cfg(tmp_path, context=True, video_max_len=5)).load(["train"])["train"]
    v = IntentDataset(short)[2].video
    assert v.shape == (5, 256) and v[:, 0].tolist() == [0, 2, 2, 2, 2]
    # in-scope only: Sheldon's UNK turn is not in that file, so his earlier in-scope turn is used
    ins = get_reader(cfg(tmp_path, context=True, subset="in-scope")).load(["train"])["train"]
    assert {s.id: s.context for s in ins.samples}["dia0_utt4"] == "hello penny"
    # the collator encodes (text, context) with segment 1 on the context
    col = Collator(AutoTokenizer.from_pretrained(tiny_encoder_dir), text_max_len=50, video_dim=256, audio_dim=768)
    b = col([ds[0], ds[2]])
    assert b.token_type_ids[1].sum() > 0 and b.video_mask.sum(1).tolist() == [2, 6]


def test_errors_name_file_line_and_sample(tmp_path):
    rows = {"train": [("0", "0", "hi", "Greet", "Amy"), ("0", "1", "ok", "Greeting", "Amy")]}
    write_mintrec2(tmp_path, rows=rows)
    reader = get_reader(cfg(tmp_path))
    with pytest.raises(DataError, match=r"total/train.tsv: row 3 \(sample dia0_utt1\): unknown label 'Greeting'"):
        reader.read_rows("train")
    (tmp_path / "total" / "train.tsv").write_text("\t".join(HEADER) + "\n0\t0\thi\tGreet\n")
    with pytest.raises(DataError, match=r"total/train.tsv: line 2: expected 8 tab-separated fields, got 4"):
        reader.read_rows("train")
    (tmp_path / "total" / "train.tsv").write_text(
        "\t".join(HEADER) + "\n" + "\t".join(["0", "x", "hi", "Greet", "0", "1", "Friends", "Joey"]) + "\n")
    with pytest.raises(DataError, match=r"train.tsv: line 2 \(sample dia0_uttx\): Utterance_id 'x'"):
        get_reader(cfg(tmp_path, context=True)).read_rows("train")
    with pytest.raises(DataError, match="no binary"):
        get_reader(cfg(tmp_path, task="binary"))
    with pytest.raises(DataError, match="unknown MIntRec2.0 subset 'ood'"):
        get_reader(cfg(tmp_path, subset="ood"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no MIntRec2.0 'in-scope' folder .*empty/in-scope"):
        get_reader(cfg(empty, subset="in-scope"))


def test_missing_features_say_where_they_were_looked_for(tmp_path):
    write_mintrec2(tmp_path)
    (tmp_path / "total" / "audio_data" / "wavlm_feats_binary.pkl").unlink()
    reader = get_reader(cfg(tmp_path, subset="in-scope"))
    with pytest.raises(DataError, match=r"no audio feature file found: tried .*wavlm_feats.pkl.* in .*in-scope.*total"):
        reader.load(["train"])
    assert get_reader(cfg(tmp_path, modalities=["text", "video"])).load(["train"])["train"].audio is None
    with open(tmp_path / "total" / "train.tsv", "a") as f:
        f.write("\t".join(["9", "0", "new", "Joke", "0", "1", "Friends", "Joey"]) + "\n")
    with pytest.raises(DataError, match=r"swin_roi_binary.pkl: no video features for 1 sample.*dia9_utt0"):
        get_reader(cfg(tmp_path, modalities=["text", "video"])).load(["train"])


# --- the generator ---------------------------------------------------------------------

SMALL = dict(seed=0, size=300, video_len=(2, 8), audio_len=(3, 12))


@pytest.fixture(scope="module")
def synth2(tmp_path_factory) -> tuple[Path, dict]:
    from amess.data.synth import generate_mintrec2

    d = tmp_path_factory.mktemp("synth2")
    return d, generate_mintrec2(d, **SMALL)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_generator_layout_and_dialogue_splits(synth2):
    root, info = synth2
    for folder in ("total", "in-scope", OOD):
        for split in ("train", "dev", "test"):
            assert (root / folder / f"{split}.tsv").read_text().split("\n")[0] == "\t".join(HEADER)
    assert (root / "total/video_data/swin_roi.pkl").is_file() and (root / "total/audio_data/wavlm_feats.pkl").is_file()
    dialogues = {}
    for split in ("train", "dev", "test"):
        rows = read_rows(root / "total" / f"{split}.tsv")
        ins, oos = read_rows(root / "in-scope" / f"{split}.tsv"), read_rows(root / OOD / f"{split}.tsv")
        assert len(ins) + len(oos) == len(rows) and {r["Label"] for r in oos} == {"UNK"}
        assert 0 < len(oos) and "UNK" not in {r["Label"] for r in ins}  # OOS in every split
        assert info["splits"][split] == {"rows": len(rows), "in_scope": len(ins), "oos": len(oos),
                                         "dialogues": len({r["Dialogue_id"] for r in rows})}
        for r in rows:
            dialogues.setdefault(r["Dialogue_id"], set()).add(split)
            assert r["Source"] in ("Superstore", "The Big Bang Theory", "Friends")
            assert r["Label"] in MINTREC2_LABELS + ("UNK",)
    assert all(len(s) == 1 for s in dialogues.values())  # no dialogue in two splits
    by_dia: dict[str, list[dict]] = {}
    for split in ("train", "dev", "test"):
        for r in read_rows(root / "total" / f"{split}.tsv"):
            by_dia.setdefault(r["Dialogue_id"], []).append(r)
    for rows in by_dia.values():
        assert 4 <= len(rows) <= 15 and 1 <= len({r["speaker_name"] for r in rows}) <= 4
        assert len({r["Source"] for r in rows}) == 1
        assert [int(r["Utterance_id"]) for r in rows] == list(range(len(rows)))
    n_in = {s: info["splits"][s]["in_scope"] for s in ("train", "dev", "test")}
    assert n_in["train"] > n_in["test"] > n_in["dev"] > 0  # about 66 / 12 / 22
    assert info["oracle_test_accuracy"]["text+video+audio"] > info["oracle_test_accuracy"]["text"]
    assert sum(info["label_counts"].values()) == 300


def test_generator_data_check_and_reader(synth2, capsys):
    from amess.cli import main

    root, _ = synth2
    assert main(["data", "check", "--dataset", "mintrec2", "--data-dir", str(root)]) == 0
    assert "no problems found" in capsys.readouterr().out
    data = get_reader(cfg(root, context=True, subset="in-scope")).load(["train"])
    assert any(s.context for s in data["train"].samples)
    video = safe_load(root / "total/video_data/swin_roi.pkl")
    shapes = {np.asarray(v).ndim for v in video.values()}
    assert shapes == {2, 3}  # (T, 256) and (T, 1, 256) both occur


def test_generator_streams_the_same_frames(synth2, tmp_path):
    from amess.data.store import convert_arrays, open_store
    from amess.data.synth import generate_mintrec2, iter_mintrec2_features

    root, info = synth2
    video = safe_load(root / "total/video_data/swin_roi.pkl")
    streamed = dict(iter_mintrec2_features(root, "video"))
    assert list(streamed) == list(video)
    assert all(np.array_equal(streamed[k], video[k]) for k in video)
    bare = tmp_path / "bare"
    assert generate_mintrec2(bare, **SMALL, write_pickles=False)["feature_files"] is None
    assert not (bare / "total/video_data").exists()
    assert (bare / "total/train.tsv").read_bytes() == (root / "total/train.tsv").read_bytes()
    convert_arrays(iter_mintrec2_features(info, "audio"), tmp_path / "store", "audio", dtype="float32",
                   progress=False)
    audio = safe_load(root / "total/audio_data/wavlm_feats.pkl")
    with open_store(tmp_path / "store", "audio") as store:
        assert len(store) == 300 and np.array_equal(store.get("dia0_utt0"), audio["dia0_utt0"])


def test_generator_vocabularies_are_disjoint():
    from amess.data.synth import FILLER, MINTREC2_GROUP_WORDS, MINTREC2_RANKING, OOS_WORDS

    words = [w for g in MINTREC2_GROUP_WORDS for w in g] + list(OOS_WORDS) + list(FILLER)
    assert len(words) == len(set(words))
    assert sorted(MINTREC2_RANKING) == sorted(MINTREC2_LABELS)
    assert len(MINTREC2_GROUP_WORDS) == -(-len(MINTREC2_LABELS) // 4)


def test_cli_synth_mintrec2(tmp_path, capsys):
    from amess.cli import main

    assert main(["data", "synth", "--dataset", "mintrec2", "--out", str(tmp_path), "--size", "40"]) == 0
    assert json.loads((tmp_path / "synth_info.json").read_text())["settings"]["size"] == 40
    assert "oracle test accuracy" in capsys.readouterr().out


def test_generate_is_deterministic_and_follows_its_design(tmp_path):
    """`generate` (the MIntRec-layout generator): the same seed writes the same bytes, another
    seed other data; splits are disjoint, stratified 60/20/20 and cover every feature id;
    frames have the documented shapes and counts; text names the intent's group."""
    from collections import Counter

    from amess.data.mintrec import MINTREC_LABELS
    from amess.data.synth import GROUP_WORDS, generate

    files = ["train.tsv", "dev.tsv", "test.tsv", "video_data/video_feats.pkl", "audio_data/audio_feats.pkl"]
    for d, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate(tmp_path / d, seed=seed, size=60)
    same = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files]
    other = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes() for f in files]
    assert all(same) and not any(other)
    root = tmp_path / "a"
    rows = {split: read_rows(root / f"{split}.tsv") for split in ("train", "dev", "test")}
    ids = {split: ["_".join((r["season"], r["episode"], r["clip"])) for r in rs] for split, rs in rows.items()}
    all_ids = [i for v in ids.values() for i in v]
    assert len(all_ids) == len(set(all_ids)) == 60  # disjoint splits, unique ids
    video, audio = safe_load(root / files[3]), safe_load(root / files[4])
    assert set(video) == set(audio) == set(all_ids)
    total = Counter(r["label"] for rs in rows.values() for r in rs)
    for split, share in (("train", 0.6), ("dev", 0.2)):
        per_class = Counter(r["label"] for r in rows[split])
        assert all(per_class[c] == int(round(share * n)) for c, n in total.items()), split
    for sid in all_ids:
        assert all(f.shape == (1, 256) and f.dtype == np.float32 for f in video[sid])
        assert len(video[sid]) == 0 or 8 <= len(video[sid]) <= 48
        assert audio[sid].dtype == np.float32 and audio[sid].shape[1] == 768 and 20 <= audio[sid].shape[0] <= 100
    group_of = {w: g for g, words in enumerate(GROUP_WORDS) for w in words}
    on_topic = 0
    for r in (r for rs in rows.values() for r in rs):
        groups = {group_of[w] for w in r["text"].rstrip(".").split() if w in group_of}
        assert len(groups) == 1  # 2-3 cue words, all of one group
        on_topic += groups == {MINTREC_LABELS.index(r["label"]) // 4}
    assert on_topic >= 54  # text_noise 0.05: a few rows name another group


def test_oracle_survives_a_bit_that_rules_out_a_short_group():
    import numpy as np

    from amess.data.synth import _oracle_table

    prior = np.ones(30) / 30  # 30 intents: the last group holds only ids 28 and 29
    # gold 28 (group 7, audio bit 0) but the audio bit was misread as 1
    acc = _oracle_table(np.array([28]), [7], [0], [1], prior)
    assert acc["text+video+audio"] == 1.0 and set(acc) >= {"text", "video", "audio", "video+audio"}
