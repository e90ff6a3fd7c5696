"""No silent wrong results: what the readers refuse when training loads data, what
`amess data check` reports, bad files in one line, and the data fingerprint."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from amess.cli import main
from amess.config import DataConfig
from amess.data import DataError, IntentDataset, fingerprint, get_reader
from amess.data.base import read_tsv
from amess.data.check import check_dataset
from amess.data.safe_pickle import UnsafePickleError, safe_load
from amess.data.store import IncompleteStoreError, convert_pickle, open_store
from test_data import HEADER, write_mintrec

REPO = Path(__file__).resolve().parents[1]
SHARED_MINTREC2 = REPO.parent / "shared" / "data" / "mintrec2"
AUDIO = Path("audio_data") / "audio_feats.pkl"
VIDEO = Path("video_data") / "video_feats.pkl"
ALL = ["train", "dev", "test"]


def edit_pickle(root: Path, rel: Path, **samples) -> None:
    """Replace some samples of a feature pickle (keys with '-' written as '_' are fine: ids use '_')."""
    feats = safe_load(root / rel)
    feats.update(samples)
    (root / rel).write_bytes(pickle.dumps(feats))


def load(root: Path, **kw):
    return get_reader(DataConfig(data_dir=str(root), **kw)).load(ALL)


# --- 1. non-finite values and float16 overflow ------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_feature_is_refused_naming_file_and_sample(tmp_path, bad):
    write_mintrec(tmp_path)
    a = np.ones((5, 768), np.float32)
    a[3, 17] = bad
    edit_pickle(tmp_path, AUDIO, S04_E01_2=a)
    with pytest.raises(DataError, match=r"audio_feats.pkl: sample S04_E01_2: 1 NaN or inf value\(s\), the first "
                                        r"at frame 3, column 17; expected finite features"):
        load(tmp_path)


def test_non_finite_video_frame_in_a_keyframe_list_is_refused(tmp_path):
    write_mintrec(tmp_path)
    frames = [np.zeros((1, 256), np.float32) for _ in range(3)]
    frames[2][0, 5] = np.nan
    edit_pickle(tmp_path, VIDEO, S05_E03_4=frames)  # a dev sample
    with pytest.raises(DataError, match=r"video_feats.pkl: sample S05_E03_4: 1 NaN or inf .* frame 2, column 5"):
        load(tmp_path)


def test_float16_overflow_is_refused_with_the_max_and_the_limit(tmp_path):
    write_mintrec(tmp_path)
    edit_pickle(tmp_path, AUDIO, S04_E01_1=np.full((3, 768), -7e4, np.float32))
    with pytest.raises(DataError, match=r"audio_feats.pkl: sample S04_E01_1: max \|value\| 70000 exceeds float16's "
                                        r"limit 65504"):
        load(tmp_path)


def test_largest_float16_values_load_exactly(tmp_path):
    """65504 is float16's largest value and 65519 rounds to it: neither is inf, both load."""
    write_mintrec(tmp_path)
    a = np.full((3, 768), 65504.0, np.float32)
    a[0, 0], a[1, 1] = 65519.0, -65504.0
    edit_pickle(tmp_path, AUDIO, S04_E01_1=a)
    got = IntentDataset(load(tmp_path)["train"])[0].audio
    assert np.isfinite(got).all() and got[0, 0] == 65504.0 and got[1, 1] == -65504.0


def test_float64_beyond_float32_is_refused(tmp_path):
    write_mintrec(tmp_path)
    edit_pickle(tmp_path, AUDIO, S04_E01_1=np.full((2, 768), 1e300))
    with pytest.raises(DataError, match=r"sample S04_E01_1: \|value\| 1e\+300 is beyond float32's range"):
        load(tmp_path)


def test_check_flags_non_finite_and_overflow_per_sample(tmp_path):
    write_mintrec(tmp_path)
    edit_pickle(tmp_path, AUDIO, S04_E01_1=np.full((3, 768), np.inf, np.float32),
                S06_E04_5=np.full((3, 768), 1e5, np.float32))
    rep = check_dataset(DataConfig(data_dir=str(tmp_path)))
    assert not rep.ok
    assert sorted(rep.problems) == sorted([
        f"{tmp_path / AUDIO}: sample S04_E01_1: 2304 NaN or inf value(s), the first at frame 0, column 0; "
        "expected finite features",
        f"{tmp_path / AUDIO}: sample S06_E04_5: max |value| 100000 exceeds float16's limit 65504 (float16 storage "
        "would turn it into inf); expected features within +-65504, or use a float32 store (`amess data convert "
        "--dtype float32`, then --feature-store)"])


@pytest.mark.parametrize("value,match", [
    (np.full((3, 768), np.nan, np.float32), "S04_E01_1: 2304 NaN or inf"),
    (np.full((3, 768), 1e5, np.float32), r"S04_E01_1: max \|value\| 100000 exceeds float16's limit 65504"),
])
def test_convert_refuses_what_float16_cannot_hold_and_leaves_no_store(tmp_path, value, match):
    write_mintrec(tmp_path)
    edit_pickle(tmp_path, AUDIO, S04_E01_1=value)
    with pytest.raises(DataError, match=match):
        convert_pickle(tmp_path / AUDIO, tmp_path / "st", "audio", progress=False)
    with pytest.raises(IncompleteStoreError):
        open_store(tmp_path / "st", "audio")


def test_float32_store_keeps_large_finite_values(tmp_path):
    write_mintrec(tmp_path)
    big = np.full((3, 768), 1e5, np.float32)
    edit_pickle(tmp_path, AUDIO, S04_E01_1=big)
    convert_pickle(tmp_path / AUDIO, tmp_path / "st", "audio", dtype="float32", progress=False)
    np.testing.assert_array_equal(open_store(tmp_path / "st", "audio").get("S04_E01_1"), big)


# --- 4. what the readers refuse at load time ------------------------------------------------

def test_duplicate_id_within_a_split_is_refused(tmp_path):
    write_mintrec(tmp_path)
    with open(tmp_path / "train.tsv", "a") as f:
        f.write("S04\tE01\t1\tsaid again\tGreet\n")
    with pytest.raises(DataError, match=r"train.tsv: sample id S04_E01_1 occurs twice \(lines 2 and 5\)"):
        load(tmp_path, modalities=["text"])


@pytest.mark.parametrize("split", ["dev", "test"])
def test_train_id_in_an_evaluation_split_is_a_leak(tmp_path, split):
    write_mintrec(tmp_path)
    with open(tmp_path / f"{split}.tsv", "a") as f:
        f.write("S05\tE02\t3\tthanks a lot\tThank\n")
    with pytest.raises(DataError, match=rf"sample S05_E02_3 is in both train \(.*train.tsv, line 4\) and {split} "
                                        rf"\(.*{split}.tsv, line 3\)"):
        load(tmp_path, modalities=["text"])
    assert get_reader(DataConfig(data_dir=str(tmp_path))).load([split])  # alone, the split is fine


@pytest.mark.parametrize("value,match", [
    ((np.ones((3, 768)) * (1 + 2j)).astype(np.complex64), r"complex-valued array \(complex64\)"),
    (torch.ones(3, 768, dtype=torch.complex64), r"complex-valued tensor"),
    (np.array([["1.5"] * 768] * 3), r"the array holds strings"),  # numeric strings would cast silently
    (np.array([[0.5] * 767 + ["x"]] * 3, dtype=object), r"the array holds a str \('x'\)"),
    (np.array([[0.5] * 767 + [None]] * 3, dtype=object), r"the array holds a NoneType"),
    ([np.zeros((1, 768), np.float32), np.array([["a"] * 768])], r"\(frame 1\): the array holds strings"),
    ([np.zeros((1, 768)), np.zeros((1, 700))], r"its frames have different widths \[700, 768\]"),
])
def test_non_real_features_are_refused(tmp_path, value, match):
    write_mintrec(tmp_path)
    edit_pickle(tmp_path, AUDIO, S04_E01_2=value)
    with pytest.raises(DataError, match=r"audio_feats.pkl: sample S04_E01_2.*" + match):
        load(tmp_path)


def test_a_modality_without_frames_in_a_split_is_refused(tmp_path):
    write_mintrec(tmp_path)
    edit_pickle(tmp_path, AUDIO, **{s: np.zeros((0, 768), np.float32) for s in ("S04_E01_1", "S04_E01_2", "S05_E02_3")})
    with pytest.raises(DataError, match=r"audio_feats.pkl: no audio frames in any of the 3 samples of train "
                                        r"\(.*train.tsv\)"):
        load(tmp_path)
    edit_pickle(tmp_path, AUDIO, S04_E01_2=np.ones((2, 768), np.float32))  # one sample with frames is enough
    assert load(tmp_path)["train"].audio.length("S04_E01_1") == 0


def test_width_mismatch_on_load_names_the_sample(tmp_path):
    write_mintrec(tmp_path)
    edit_pickle(tmp_path, AUDIO, S05_E02_3=np.ones((2, 700), np.float32))
    with pytest.raises(DataError, match=r"sample S05_E02_3: feature width 700, expected 768"):
        load(tmp_path)


# --- 5. `data check` reports every problem, each with its sample --------------------------------

def test_check_reads_on_after_bad_rows_and_names_every_sample(tmp_path):
    write_mintrec(tmp_path)
    with open(tmp_path / "dev.tsv", "a") as f:
        f.write("S07\tE01\t1\tfirst\tNotALabel\n"
                "S07\tE01\t2\tsecond\tAlsoBad\n"
                "S05\tE03\t4\tagain\tLeave\n"  # a duplicate, after the bad rows
                "S07\tE01\t3\ttoo\tfew\tfields\textra\n")
    edit_pickle(tmp_path, AUDIO, S05_E03_4=np.full((2, 768), np.nan, np.float32),  # a dev sample
                S04_E01_1=np.zeros((4, 100), np.float32))
    rep = check_dataset(DataConfig(data_dir=str(tmp_path)))
    dev = tmp_path / "dev.tsv"
    want = [f"{dev}: row 3 (sample S07_E01_1): unknown label 'NotALabel'",
            f"{dev}: row 4 (sample S07_E01_2): unknown label 'AlsoBad'",
            f"{dev}: line 6: expected 5 tab-separated fields, got 7 (a tab inside a field?)",
            f"{dev}: sample id S05_E03_4 occurs twice (lines 2 and 5)",
            f"{tmp_path / AUDIO}: sample S05_E03_4: 1536 NaN or inf value(s)",
            f"{tmp_path / AUDIO}: sample S04_E01_1: feature width 100, expected 768 (the width of the other 4 "
            "samples)"]
    for w in want:
        assert sum(p.startswith(w) for p in rep.problems) == 1, (w, rep.problems)
    assert len(rep.problems) == len(want), rep.problems
    assert "dev: 2 rows (3 bad row(s) left out)" in rep.text()


def test_check_reports_a_leak_and_an_empty_train_split(tmp_path):
    write_mintrec(tmp_path)
    with open(tmp_path / "test.tsv", "a") as f:
        f.write("S04\tE01\t1\thello there\tGreet\n")
    rep = check_dataset(DataConfig(data_dir=str(tmp_path), modalities=["text"]))
    assert rep.problems == [f"sample S04_E01_1 is in both train ({tmp_path / 'train.tsv'}, line 2) and test "
                            f"({tmp_path / 'test.tsv'}, line 3): evaluating on a training sample leaks it; "
                            "expected disjoint splits"]
    (tmp_path / "train.tsv").write_text(HEADER)
    rep = check_dataset(DataConfig(data_dir=str(tmp_path), modalities=["text"]))
    assert rep.problems == [f"{tmp_path / 'train.tsv'}: no rows, only a header; expected at least one sample in "
                            "the train split"]


# --- 6. bad files: one clear line -------------------------------------------------------------

def test_non_utf8_tsv_names_file_and_line(tmp_path, tiny_encoder_dir, caplog):
    write_mintrec(tmp_path)
    with open(tmp_path / "train.tsv", "ab") as f:
        f.write(b"S09\tE09\t9\tcaf\xe9 au lait\tGreet\n")
    msg = r"train.tsv: line 5 \(byte 0xe9 at column 14\): not valid UTF-8; expected a UTF-8 text file"
    with pytest.raises(DataError, match=msg):
        load(tmp_path, modalities=["text"])
    rc = main(["train", "--data-dir", str(tmp_path), "--modalities", "text", "--method", "text", "--text-encoder",
               str(tiny_encoder_dir), "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage() and errors[0].exc_info is None
    assert "train.tsv: line 5 (byte 0xe9 at column 14): not valid UTF-8" in errors[0].getMessage()


def test_header_only_train_is_refused(tmp_path):
    write_mintrec(tmp_path)
    (tmp_path / "train.tsv").write_text(HEADER)
    with pytest.raises(DataError, match=r"train.tsv: no rows, only a header; expected at least one sample"):
        load(tmp_path, modalities=["text"])


def _torch_zip(p: Path) -> None:
    torch.save(safe_load(p), p)


def _torch_legacy(p: Path) -> None:
    torch.save(safe_load(p), p, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("rewrite,looks_like", [
    (lambda p: p.write_bytes(gzip.compress(p.read_bytes())), "a gzip-compressed file"),
    (_torch_zip, r"a zip archive \(the format torch.save writes\)"),
    (_torch_legacy, "a file written by an old torch.save"),
    (lambda p: np.save(open(p, "wb"), np.zeros((2, 3))), "a numpy .npy file"),
])
def test_a_non_pickle_is_named_for_what_it_looks_like(tmp_path, rewrite, looks_like, caplog):
    write_mintrec(tmp_path)
    rewrite(tmp_path / AUDIO)
    msg = rf"audio_feats.pkl: looks like {looks_like}.*expected a feature pickle \(a dict sample id"
    with pytest.raises(UnsafePickleError, match=msg):
        load(tmp_path)
    for compact in (None, np.float16):
        with pytest.raises(UnsafePickleError, match=msg):
            safe_load(tmp_path / AUDIO, compact_dtype=compact)
    assert main(["data", "convert", "--data-dir", str(tmp_path), "--out", str(tmp_path / "st"), "--no-progress"]) == 2
    assert "looks like" in caplog.text


def _bom_crlf(text: str) -> bytes:
    return b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8")


def test_bom_and_crlf_are_read_like_plain_lf(tmp_path):
    write_mintrec(tmp_path)
    plain = get_reader(DataConfig(data_dir=str(tmp_path))).load(ALL)
    for split in ALL:
        p = tmp_path / f"{split}.tsv"
        p.write_bytes(_bom_crlf(p.read_text()))
    again = get_reader(DataConfig(data_dir=str(tmp_path))).load(ALL)
    for split in ALL:
        assert [(s.id, s.text, s.label, s.line) for s in again[split].samples] == \
               [(s.id, s.text, s.label, s.line) for s in plain[split].samples]
    assert again["train"].samples[0].text == "hello there"  # no stray \r, no BOM in the first field


@pytest.mark.skipif(not (SHARED_MINTREC2 / "in-scope" / "dev.tsv").is_file(), reason="shared MIntRec2.0 text absent")
def test_real_crlf_files(tmp_path):
    """The real clip descriptions are CRLF; the real dev text rewritten as BOM + CRLF reads the same."""
    header = ["Dialogue_id", "Utterance_id", "Speakers Actions", "Emotions and Facial Expressions",
              "Interaction with Others"]
    desc = read_tsv(SHARED_MINTREC2 / "video_descriptions" / "dev.tsv", header)
    assert len(desc) == 1106 and not any("\r" in v for r in desc for v in r.values())
    assert desc[-1]["_line"] == "1107" and desc[0]["Interaction with Others"]
    (tmp_path / "in-scope").mkdir()
    text = (SHARED_MINTREC2 / "in-scope" / "dev.tsv").read_text(encoding="utf-8")
    (tmp_path / "in-scope" / "dev.tsv").write_bytes(_bom_crlf(text))
    cfg = dict(dataset="mintrec2", subset="in-scope", modalities=["text"])
    crlf = get_reader(DataConfig(data_dir=str(tmp_path), **cfg)).load(["dev"])["dev"].samples
    lf = get_reader(DataConfig(data_dir=str(SHARED_MINTREC2), **cfg)).load(["dev"])["dev"].samples
    assert len(lf) == 1106 and [(s.id, s.text, s.label) for s in crlf] == [(s.id, s.text, s.label) for s in lf]


# --- 3. the data fingerprint ------------------------------------------------------------------

def test_fingerprint_follows_the_data_not_paths_or_mtimes(tmp_path):
    root = tmp_path / "a"
    write_mintrec(root)
    cfg = DataConfig(data_dir=str(root))
    fp = fingerprint(cfg)
    assert len(fp) == 64 and fp == fingerprint(cfg)
    copy = tmp_path / "b"
    shutil.copytree(root, copy)  # another folder, new mtimes: the same data
    for p in copy.rglob("*"):
        os.utime(p, ns=(0, 10**18))
    assert fingerprint(DataConfig(data_dir=str(copy))) == fp
    # one field of one TSV row
    t = (copy / "dev.tsv").read_text()
    (copy / "dev.tsv").write_text(t.replace("get out now\tLeave", "get out now\tPrevent"))
    assert fingerprint(DataConfig(data_dir=str(copy))) != fp
    shutil.copy(root / "dev.tsv", copy / "dev.tsv")
    assert fingerprint(DataConfig(data_dir=str(copy))) == fp
    # one feature value; a text-only config does not read the features, so its fingerprint ignores them
    text_fp = fingerprint(DataConfig(data_dir=str(copy), modalities=["text"]))
    edit_pickle(copy, AUDIO, S04_E01_1=np.zeros((5, 768), np.float32))
    assert fingerprint(DataConfig(data_dir=str(copy))) != fp
    assert fingerprint(DataConfig(data_dir=str(copy), modalities=["text"])) == text_fp != fp
    assert fingerprint(DataConfig(data_dir=str(copy), modalities=["text", "video"])) == \
        fingerprint(DataConfig(data_dir=str(root), modalities=["text", "video"]))
    # a split file fewer changes what is read
    os.remove(copy / "test.tsv")
    assert fingerprint(DataConfig(data_dir=str(copy), modalities=["text"])) != text_fp


def test_fingerprint_samples_large_feature_files(tmp_path):
    """Beyond 4 MiB only the ends and 16 blocks are read: a change in one of them is seen."""
    from amess.data.base import file_fingerprint

    p = tmp_path / "big.pkl"
    data = bytearray(np.random.default_rng(0).bytes(9 << 20))
    p.write_bytes(data)
    fp = file_fingerprint(p)
    assert fp.startswith(f"{9 << 20}:")
    for pos in (0, len(data) - 1, (1 << 20) + (len(data) - (2 << 20)) // 17 * 5 + 10):  # head, tail, block 5
        data[pos] ^= 1
        p.write_bytes(data)
        assert file_fingerprint(p) != fp, pos
        data[pos] ^= 1
    p.write_bytes(data)
    assert file_fingerprint(p) == fp


def test_fingerprint_of_a_store_and_of_custom_labels(tmp_path):
    write_mintrec(tmp_path)
    assert main(["data", "convert", "--data-dir", str(tmp_path), "--out", str(tmp_path / "st"), "--no-progress"]) == 0
    cfg = DataConfig(data_dir=str(tmp_path), feature_store=str(tmp_path / "st"))
    fp = fingerprint(cfg)
    assert fp != fingerprint(DataConfig(data_dir=str(tmp_path)))
    index = tmp_path / "st" / "audio.index.json"
    index.write_text(index.read_text().replace("S04_E01_1", "S04_E01_X"))
    assert fingerprint(cfg) != fp
    custom = tmp_path / "mine"
    custom.mkdir()
    (custom / "labels.txt").write_text("book\ncancel\n")
    (custom / "train.tsv").write_text("id\ttext\tlabel\na1\tbook it\tbook\na2\tcancel it\tcancel\n")
    ccfg = DataConfig(dataset="custom", data_dir=str(custom), modalities=["text"])
    cfp = fingerprint(ccfg)
    (custom / "labels.txt").write_text("cancel\nbook\n")  # the same rows, other label ids
    assert fingerprint(ccfg) != cfp
    assert [s.label for s in get_reader(ccfg).load(["train"])["train"].samples] == [1, 0]
