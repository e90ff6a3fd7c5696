"""Readers on small fixtures in the official formats, the restricted unpickler, batching."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from amess.config import DataConfig
from amess.data import DataError, IntentDataset, get_reader
from amess.data.batch import Collator, pad_frames
from amess.data.check import check_dataset
from amess.data.mintrec import MINTREC_LABELS
from amess.data.safe_pickle import UnsafePickleError, safe_load

HEADER = "season\tepisode\tclip\ttext\tlabel\n"


def write_mintrec(root: Path, *, layout: str = "nested", names=("video_feats.pkl", "audio_feats.pkl"),
                  audio_as_tensor: bool = False, rows=None) -> dict[str, list[str]]:
    """A 3-split MIntRec folder; video as lists of (1, 256) arrays, audio (T, 768)."""
    rng = np.random.default_rng(0)
    rows = rows or {
        "train": [("S04", "E01", "1", "hello there", "Greet"), ("S04", "E01", "2", "i am so sorry", "Apologise"),
                  ("S05", "E02", "3", "thanks a lot", "Thank")],
        "dev": [("S05", "E03", "4", "get out now", "Leave")],
        "test": [("S06", "E04", "5", "you did great", "Praise")],
    }
    root.mkdir(parents=True, exist_ok=True)
    ids = {}
    video, audio = {}, {}
    for split, rs in rows.items():
        with open(root / f"{split}.tsv", "w") as f:
            f.write(HEADER + "".join("\t".join(r) + "\n" for r in rs))
        ids[split] = ["_".join(r[:3]) for r in rs]
        for i, sid in enumerate(ids[split]):
            nv, na = 3 + i, 5 + 2 * i
            video[sid] = [rng.standard_normal((1, 256)).astype(np.float32) for _ in range(nv)]
            a = rng.standard_normal((na, 768)).astype(np.float32)
            audio[sid] = torch.from_numpy(a) if audio_as_tensor else a
    vdir = root / "video_data" if layout == "nested" else root
    adir = root / "audio_data" if layout == "nested" else root
    vdir.mkdir(exist_ok=True)
    adir.mkdir(exist_ok=True)
    with open(vdir / names[0], "wb") as f:
        pickle.dump(video, f)
    with open(adir / names[1], "wb") as f:
        pickle.dump(audio, f)
    return ids


@pytest.mark.parametrize("layout,names,tensor", [
    ("nested", ("video_feats.pkl", "audio_feats.pkl"), False),
    ("flat", ("video_feats.pkl", "audio_feats.pkl"), True),
    ("nested", ("swin_feats.pkl", "wavlm_feats.pkl"), True),
])
def test_mintrec_reader_official_layouts(tmp_path, layout, names, tensor):
    write_mintrec(tmp_path, layout=layout, names=names, audio_as_tensor=tensor)
    reader = get_reader(DataConfig(data_dir=str(tmp_path)))
    data = reader.load(["train", "dev", "test"])
    tr = data["train"]
    assert [s.id for s in tr.samples] == ["S04_E01_1", "S04_E01_2", "S05_E02_3"]
    assert [s.label for s in tr.samples] == [MINTREC_LABELS.index(n) for n in ("Greet", "Apologise", "Thank")]
    assert tr.video.dim == 256 and tr.audio.dim == 768
    item = IntentDataset(tr)[1]
    assert item.video.shape == (4, 256) and item.audio.shape == (7, 768)
    assert item.video.dtype == np.float32


def test_binary_task_and_max_length(tmp_path):
    write_mintrec(tmp_path)
    reader = get_reader(DataConfig(data_dir=str(tmp_path), task="binary", video_max_len=2, audio_max_len=6))
    assert reader.label_names == ["Emotion", "Goal"]
    data = reader.load(["train"])
    # Greet -> Goal, Apologise -> Emotion, Thank -> Emotion
    assert [s.label for s in data["train"].samples] == [1, 0, 0]
    item = IntentDataset(data["train"])[2]
    assert item.video.shape == (2, 256) and item.audio.shape == (6, 768)
    assert data["train"].video.length("S05_E02_3") == 5  # true length kept


def test_text_only_never_opens_feature_files(tmp_path):
    write_mintrec(tmp_path)
    (tmp_path / "video_data" / "video_feats.pkl").write_bytes(b"garbage")  # would fail if opened
    reader = get_reader(DataConfig(data_dir=str(tmp_path), modalities=["text"]))
    data = reader.load(["train", "test"])
    assert data["train"].video is None and data["train"].audio is None


def test_real_mintrec_text_only(real_mintrec_text):
    reader = get_reader(DataConfig(data_dir=str(real_mintrec_text), modalities=["text"]))
    assert reader.available_splits() == ["train", "dev"]
    data = reader.load(["train", "dev"])
    assert len(data["train"].samples) == 1334 and len(data["dev"].samples) == 445
    assert data["train"].samples[0].id == "S05_E16_329"
    assert data["train"].samples[0].label == MINTREC_LABELS.index("Inform")


def test_errors_name_file_and_sample(tmp_path):
    write_mintrec(tmp_path, rows={"train": [("S04", "E01", "1", "hi", "Greeting")]})
    reader = get_reader(DataConfig(data_dir=str(tmp_path)))
    with pytest.raises(DataError, match=r"train.tsv: row 2 \(sample S04_E01_1\): unknown label 'Greeting'"):
        reader.read_rows("train")
    with pytest.raises(DataError, match="does not exist"):
        get_reader(DataConfig(data_dir=str(tmp_path / "nope")))


def test_missing_features_for_an_id(tmp_path):
    write_mintrec(tmp_path)
    with open(tmp_path / "train.tsv", "a") as f:
        f.write("S09\tE09\t9\tnew row\tJoke\n")
    reader = get_reader(DataConfig(data_dir=str(tmp_path)))
    with pytest.raises(DataError, match=r"video_feats.pkl: no video features for 1 sample.*S09_E09_9"):
        reader.load(["train"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "audio_feats.pkl"
    with open(p, "wb") as f:
        pickle.dump({"S04_E01_1": _Evil()}, f)
    with pytest.raises(UnsafePickleError, match=r"audio_feats.pkl: refused to load global (posix|nt)\.system"):
        safe_load(p)
    assert not (tmp_path / "pwned_marker").exists()


def test_restricted_unpickler_loads_arrays_and_tensors(tmp_path):
    p = tmp_path / "f.pkl"
    obj = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": torch.ones(2, 2), "c": [np.zeros((1, 4))]}
    with open(p, "wb") as f:
        pickle.dump(obj, f)
    out = safe_load(p)
    assert out.keys() == obj.keys() and out["a"].dtype == np.float32
    assert np.array_equal(out["a"], obj["a"]) and torch.equal(out["b"], obj["b"])
    assert isinstance(out["c"], list) and len(out["c"]) == 1 and np.array_equal(out["c"][0], obj["c"][0])
    (tmp_path / "trunc.pkl").write_bytes(p.read_bytes()[:40])
    (tmp_path / "garbage.pkl").write_bytes(b"not a pickle")
    for bad in ("trunc.pkl", "garbage.pkl"):  # both readers: the C one and the compact Python one
        for compact in (None, np.float16):
            with pytest.raises(UnsafePickleError, match=f"{bad}: not a readable feature pickle"):
                safe_load(tmp_path / bad, compact_dtype=compact)


def test_pad_frames_masks_from_lengths():
    x, m = pad_frames([np.ones((2, 3)), None, np.ones((4, 3))], 3)
    assert x.shape == (3, 4, 3)
    assert m.tolist() == [[True, True, False, False], [False] * 4, [True] * 4]
    assert x[0, 2:].abs().sum() == 0


def test_collator_pads_per_batch(tmp_path, tiny_encoder_dir):
    from transformers import AutoTokenizer

    write_mintrec(tmp_path)
    reader = get_reader(DataConfig(data_dir=str(tmp_path)))
    ds = IntentDataset(reader.load(["train"])["train"])
    col = Collator(AutoTokenizer.from_pretrained(tiny_encoder_dir), text_max_len=30, video_dim=256, audio_dim=768)
    b = col([ds[0], ds[1]])
    assert b.video.shape == (2, 4, 256) and b.video_mask.sum(1).tolist() == [3, 4]
    assert b.audio.shape == (2, 7, 768) and b.audio_mask.sum(1).tolist() == [5, 7]
    assert b.input_ids.shape[1] == b.attention_mask.sum(1).max()  # padded to the longest text only
    assert b.labels.tolist() == [ds[0].label, ds[1].label]


def test_data_check_reports_problems(tmp_path):
    write_mintrec(tmp_path)
    rep = check_dataset(DataConfig(data_dir=str(tmp_path)))
    assert rep.ok, rep.text()
    assert "train: 3 rows" in rep.text()
    # NaN, a wrong width and a missing id
    audio = safe_load(tmp_path / "audio_data" / "audio_feats.pkl")
    audio["S04_E01_1"] = np.full((3, 768), np.nan, dtype=np.float32)
    audio["S04_E01_2"] = np.zeros((3, 100), dtype=np.float32)
    del audio["S06_E04_5"]
    with open(tmp_path / "audio_data" / "audio_feats.pkl", "wb") as f:
        pickle.dump(audio, f)
    rep = check_dataset(DataConfig(data_dir=str(tmp_path)))
    audio = tmp_path / "audio_data" / "audio_feats.pkl"
    assert rep.problems == [
        f"{audio}: sample S04_E01_1: 2304 NaN or inf value(s), the first at frame 0, column 0; "
        "expected finite features",
        f"{audio}: sample S04_E01_2: feature width 100, expected 768 (the width of the other 3 samples)",
        f"{audio}: 1 test id(s) without audio features: S06_E04_5"]
    assert "\n3 problem(s):" in rep.text()
    (tmp_path / "video_data" / "video_feats.pkl").write_bytes(b"")
    assert "video_feats.pkl: empty file" in check_dataset(DataConfig(data_dir=str(tmp_path))).text()


def test_cli_check_exit_codes(tmp_path, capsys):
    from amess.cli import main

    write_mintrec(tmp_path)
    assert main(["data", "check", "--data-dir", str(tmp_path)]) == 0
    with open(tmp_path / "dev.tsv", "a") as f:
        f.write("S01\tE01\t1\ttext\tNotALabel\n")
    assert main(["data", "check", "--data-dir", str(tmp_path)]) == 1
    assert "unknown label 'NotALabel'" in capsys.readouterr().out


def test_synth_layout_and_oracle(synth_dir):
    import json

    info = json.loads((synth_dir / "synth_info.json").read_text())
    acc = info["oracle_test_accuracy"]
    # fusion must matter: each stream adds information the text does not have
    assert acc["text+video+audio"] > acc["text+video"] > acc["text"]
    assert acc["text+video+audio"] > acc["text+audio"] > acc["text"]
    rep = check_dataset(DataConfig(data_dir=str(synth_dir)))
    assert rep.ok, rep.text()
    video = safe_load(synth_dir / "video_data" / "video_feats.pkl")
    # MIntRec's video release: a list of (1, 256) keyframe arrays per sample, some samples without any
    assert all(isinstance(v, list) for v in video.values())
    frames = [f for v in video.values() for f in v]
    assert frames and all(f.shape == (1, 256) for f in frames)
    assert any(len(v) == 0 for v in video.values()) and any(len(v) > 1 for v in video.values())


def test_compact_load_matches_full_precision_load(tmp_path):
    """The float16-on-read loader (InMemoryFeatures) gives the same features as a plain load,
    for every stored layout, including arrays shared between entries."""
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((1, 256)).astype(np.float32)
    obj = {"a": rng.standard_normal((50, 768)).astype(np.float32),
           "b": [shared, shared, rng.standard_normal((1, 256)).astype(np.float32)],
           "c": torch.randn(7, 768), "d": rng.standard_normal((40, 1, 256)), "e": [shared]}
    p = tmp_path / "f.pkl"
    with open(p, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    full, small = safe_load(p), safe_load(p, compact_dtype=np.float16)
    from amess.data.safe_pickle import to_numpy

    for k in obj:
        a = to_numpy(full[k], path=p, sample_id=k).astype(np.float16)
        b = to_numpy(small[k], path=p, sample_id=k).astype(np.float16)
        assert np.array_equal(a, b), k
    assert small["a"].dtype == np.float16
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(UnsafePickleError, match="refused"):
        safe_load(tmp_path / "evil.pkl", compact_dtype=np.float16)


def test_unpickler_regressions_found_by_property_tests(tmp_path):
    """Protocol 2 names Python 2 modules (`__builtin__.bytes` for an empty array's data), and
    several empty arrays share one memoized b"" that the compact reader must not release."""
    obj = {"a": np.zeros((0, 3), np.float32), "b": np.zeros((0, 2), np.int64), "c": np.ones((2, 2), np.float16),
           "d": np.zeros((0, 1))}
    for protocol in (2, 4):
        p = tmp_path / f"p{protocol}.pkl"
        p.write_bytes(pickle.dumps(obj, protocol=protocol))
        for compact in (None, np.float16):
            out = safe_load(p, compact_dtype=compact)
            assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in obj.items()}
            assert np.array_equal(out["c"], obj["c"])
