"""Clip descriptions as a stream: the TSV parser, each granularity's shapes (tiny BERT), the
pickle as the readers see it, atomic output, provenance, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from amess.config import DataConfig
from amess.data import DataError, IntentDataset, get_reader
from amess.data import clip_descriptions as cd
from amess.data.safe_pickle import load_compact, safe_load

FIELDS = ["Speakers Actions", "Emotions and Facial Expressions", "Interaction with Others"]
TEXT_HEADER = ["Dialogue_id", "Utterance_id", "Text", "Label", "Start_timestamp", "End_timestamp", "Source",
               "speaker_name"]
CLIPS = {  # (dialogue, utterance, speaker, label, three description fields)
    "train": [("0", "0", "Amy", "Greet", ("She waves. She smiles!", "She looks happy.", "She greets Jonah.")),
              ("0", "1", "Jonah", "Greet", ("He nods.", "He seems calm. Maybe tired?", "He answers Amy.")),
              ("0", "2", "Amy", "Thank", ("She hands over a box.", "Grateful.", "She thanks him warmly."))],
    "dev": [("1", "0", "Dina", "Warn", ("She points at the door.", "Stern face.", "She warns Glenn."))],
}


def write_tsv(path: Path, header: list[str], rows: list[list[str]], *, crlf: bool = True, bom: bool = False) -> None:
    end = "\r\n" if crlf else "\n"
    text = end.join("\t".join(r) for r in [header] + rows) + end
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


def write_root(root: Path) -> Path:
    """A MIntRec2.0 root as shipped here: in-scope/{train,dev}.tsv and video_descriptions/."""
    for split, rows in CLIPS.items():
        write_tsv(root / "in-scope" / f"{split}.tsv", TEXT_HEADER,
                  [[d, u, f"line {d}.{u}", lab, "0", "1", "friends", spk] for d, u, spk, lab, _ in rows], crlf=False)
        write_tsv(root / "video_descriptions" / f"{split}.tsv", ["Dialogue_id", "Utterance_id"] + FIELDS,
                  [[d, u, *f] for d, u, _, _, f in rows])
    return root


@pytest.fixture(scope="module")
def tiny_encoder(tiny_encoder_dir):
    from amess.models.encoders import load_text_encoder

    return load_text_encoder(str(tiny_encoder_dir))


# --- the parser ------------------------------------------------------------------------

def test_parser_id_layouts_crlf_and_bom(tmp_path):
    p = tmp_path / "train.tsv"
    write_tsv(p, ["Dialogue_id", "Utterance_id"] + FIELDS, [["3", "7", "a.", "b", "c"], ["", "", "", "", ""],
                                                           ["3", "8", "d", "e", "f"]], bom=True)
    f = cd.read_description_tsv(p)
    assert f.id_columns == ["Dialogue_id", "Utterance_id"] and f.field_names == FIELDS
    assert [(r.id, r.fields, r.line) for r in f.rows] == [("dia3_utt7", ("a.", "b", "c"), 2),
                                                          ("dia3_utt8", ("d", "e", "f"), 4)]  # no '\r' kept
    write_tsv(p, ["season", "episode", "clip", "desc"], [["S05", "E16", "329", "a man waves"]], crlf=False)
    assert [r.id for r in cd.read_description_tsv(p).rows] == ["S05_E16_329"]
    write_tsv(p, ["id", "what", "how"], [["clip-1", "x", "y"]])
    f = cd.read_description_tsv(p)
    assert f.rows[0].id == "clip-1" and f.field_names == ["what", "how"]


def test_parser_errors_name_file_and_line(tmp_path):
    p = tmp_path / "dev.tsv"
    write_tsv(p, ["Dialogue_id", "Utterance_id"] + FIELDS, [["0", "0", "a", "b", "c"], ["0", "1", "a", "b"]])
    with pytest.raises(DataError, match=r"dev.tsv: line 3: expected 5 tab-separated fields \(Dialogue_id \| "
                                        r"Utterance_id \| Speakers Actions .*\), got 4"):
        cd.read_description_tsv(p)
    write_tsv(p, ["clip", "text"], [["1", "a"]])
    with pytest.raises(DataError, match=r"dev.tsv: header \['clip', 'text'\]: expected the id column\(s\) first"):
        cd.read_description_tsv(p)
    write_tsv(p, ["id"], [["1"]])
    with pytest.raises(DataError, match="no text field"):
        cd.read_description_tsv(p)
    write_tsv(p, ["id", "text"], [["1", "a"], ["1", "b"]])
    with pytest.raises(DataError, match=r"dev.tsv: line 3: sample 1 already described on line 2"):
        cd.read_description_tsv(p)
    p.write_bytes(b"id\ttext\r\n1\t\xff\r\n")
    with pytest.raises(DataError, match="dev.tsv: not UTF-8"):
        cd.read_description_tsv(p)
    with pytest.raises(DataError, match=r"no description file \(expected one or more of \['train.tsv'"):
        cd.read_description_folder(tmp_path / "nothing")


def test_folder_ids_unique_and_fields_equal_across_files(tmp_path):
    write_tsv(tmp_path / "train.tsv", ["id", "a"], [["1", "x"]])
    write_tsv(tmp_path / "test.tsv", ["id", "a"], [["1", "y"]])
    with pytest.raises(DataError, match=r"test.tsv: line 2: sample 1 is also described in .*train.tsv"):
        cd.read_description_folder(tmp_path)
    write_tsv(tmp_path / "test.tsv", ["id", "b"], [["2", "y"]])
    with pytest.raises(DataError, match=r"test.tsv: text fields \['b'\] differ"):
        cd.read_description_folder(tmp_path)


def test_split_sentences():
    assert cd.split_sentences(" He waves. She smiles!  Why? ok ") == ["He waves.", "She smiles!", "Why?", "ok"]
    assert cd.split_sentences("3.5 metres away") == ["3.5 metres away"]
    assert cd.split_sentences("  ") == []


# --- granularities ---------------------------------------------------------------------

def test_granularity_shapes(tiny_encoder):
    rows = [cd.DescriptionRow("a", ("He waves. He smiles.", "Calm.", ""), 2),
            cd.DescriptionRow("b", ("One long sentence about the man " * 8, "Happy! Loud?", "He talks."), 3)]
    tok = tiny_encoder.tokenizer
    n_tokens = {r.id: sum(len(tok(f, add_special_tokens=False, truncation=True, max_length=30)["input_ids"])
                          for f in r.fields) for r in rows}
    got = {}
    for g in cd.GRANULARITIES:
        stats: dict = {}
        out = dict(cd.embed_rows(rows, tiny_encoder, granularity=g, max_len=32, batch_size=2, progress=False,
                                 stats=stats))
        assert list(out) == ["a", "b"] and all(a.dtype == np.float32 and a.flags.c_contiguous for a in out.values())
        got[g] = out
        if g == "sentence":
            assert stats == {"texts": 7, "truncated": 1}  # b's first field: 48 words
    assert got["field"]["a"].shape == (3, 32) and got["field"]["b"].shape == (3, 32)
    assert got["sentence"]["a"].shape == (3, 32) and got["sentence"]["b"].shape == (4, 32)  # empty field: none
    assert {k: v.shape for k, v in got["token"].items()} == {k: (n, 32) for k, n in n_tokens.items()}
    # padding never leaks: one text at a time gives the same vectors as sorted, padded batches
    for g in cd.GRANULARITIES:
        alone = dict(cd.embed_rows(rows, tiny_encoder, granularity=g, max_len=32, batch_size=1, chunk_size=1,
                                   progress=False))
        assert all(np.allclose(alone[k], got[g][k], atol=1e-5) for k in alone)


def test_truncation_counted_and_bad_settings(tiny_encoder):
    rows = [cd.DescriptionRow("a", ("word " * 50, "short"), 2)]
    stats: dict = {}
    out = dict(cd.embed_rows(rows, tiny_encoder, granularity="token", max_len=12, progress=False, stats=stats))
    assert out["a"].shape == (10 + 1, 32) and stats == {"texts": 2, "truncated": 1}
    with pytest.raises(ValueError, match="granularity must be one of"):
        list(cd.embed_rows(rows, tiny_encoder, granularity="word", progress=False))


# --- the file, as the readers see it ---------------------------------------------------

def test_pickle_provenance_and_mintrec2_video_stream(tmp_path, tiny_encoder, tiny_encoder_dir):
    root = write_root(tmp_path / "m2")
    out = root / "in-scope" / "video_data" / "desc_feats.pkl"
    prov = cd.embed_description_folder(root / "video_descriptions", out, text_encoder=str(tiny_encoder_dir),
                                       encoder=tiny_encoder, granularity="sentence", device="cpu",
                                       progress=False, command="amess data embed-descriptions ...")
    raw = safe_load(out)  # the restricted unpickler: plain dict of float32 numpy arrays
    assert sorted(raw) == ["dia0_utt0", "dia0_utt1", "dia0_utt2", "dia1_utt0"]
    assert all(type(v) is np.ndarray and v.dtype == np.float32 for v in raw.values())
    assert raw["dia0_utt0"].shape == (4, 32) and raw["dia0_utt1"].shape == (4, 32)
    assert set(load_compact(out, np.float16)) == set(raw)
    with open(out, "rb") as f:
        assert pickle.load(f).keys() == raw.keys()  # what the official loaders do
    # provenance beside it
    p = json.loads(cd.provenance_path(out).read_text())
    assert cd.provenance_path(out).name == "desc_feats.pkl.json" and p == prov
    src = root / "video_descriptions" / "train.tsv"
    assert p["sources"][0] == {"file": str(src), "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                               "rows": 3, "id_columns": ["Dialogue_id", "Utterance_id"]}
    assert [s["rows"] for s in p["sources"]] == [3, 1]
    assert p["output"] == {"file": "desc_feats.pkl", "bytes": out.stat().st_size,
                           "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    assert (p["encoder"], p["granularity"], p["max_len"], p["hidden_size"], p["samples"]) == (
        str(tiny_encoder_dir), "sentence", cd.DEFAULT_MAX_LEN, 32, 4)
    assert p["fields"] == FIELDS and p["frames"]["total"] == sum(len(v) for v in raw.values())
    assert p["command"].startswith("amess data embed-descriptions") and p["versions"]["amess"]
    assert p["created"][:2] == "20" and "seconds" in p and p["texts_truncated"] == 0
    # the reader takes it as the video stream, named from the subset folder or from the root; no audio needed
    for video_file in ("video_data/desc_feats.pkl", "in-scope/video_data/desc_feats.pkl"):
        data = get_reader(DataConfig(dataset="mintrec2", data_dir=str(root), subset="in-scope",
                                     modalities=["text", "video"], video_file=video_file)).load(["train", "dev"])
        tr = data["train"]
        assert tr.video.path == str(out) and tr.video.dim == 32 and tr.audio is None
        item = IntentDataset(tr)[1]
        assert item.id == "dia0_utt1" and np.allclose(item.video, raw["dia0_utt1"], atol=1e-2)
    # multi-turn: Amy's previous description comes first in time
    ctx = get_reader(DataConfig(dataset="mintrec2", data_dir=str(root), subset="in-scope", context=True,
                                modalities=["text", "video"], video_file="video_data/desc_feats.pkl")).load(["train"])
    item = IntentDataset(ctx["train"])[2]
    assert item.context == "line 0.0" and item.video.shape == (4 + 3, 32)


def test_atomic_output_no_partial_file(tmp_path, tiny_encoder, monkeypatch):
    root = write_root(tmp_path / "m2")
    out = tmp_path / "feats" / "desc.pkl"

    def broken_dump(obj, f, protocol=None):
        f.write(b"\x80\x04partial")
        raise OSError("disk full")

    monkeypatch.setattr(cd.pickle, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        cd.embed_description_folder(root / "video_descriptions", out, encoder=tiny_encoder, progress=False)
    assert list(out.parent.iterdir()) == []  # neither the pickle, nor its temporary file, nor provenance
    out.write_bytes(b"old")
    with pytest.raises(OSError):
        cd.embed_description_folder(root / "video_descriptions", out, encoder=tiny_encoder, progress=False)
    assert out.read_bytes() == b"old" and [p.name for p in out.parent.iterdir()] == ["desc.pkl"]


def test_cli_embed_then_check(tmp_path, tiny_encoder_dir, capsys):
    from amess.cli import main

    root = write_root(tmp_path / "m2")
    out = root / "in-scope" / "video_data" / "desc_feats.pkl"
    umask = os.umask(0o022)
    try:
        assert main(["data", "embed-descriptions", "--descriptions", str(root / "video_descriptions"), "--out",
                     str(out), "--text-encoder", str(tiny_encoder_dir), "--granularity", "token", "--no-progress",
                     "--device", "cpu"]) == 0
    finally:
        os.umask(umask)
    assert "provenance in" in capsys.readouterr().out
    assert json.loads(cd.provenance_path(out).read_text())["granularity"] == "token"
    assert out.stat().st_mode & 0o777 == 0o644  # the umask's mode, not mkstemp's private 0600
    assert main(["data", "check", "--dataset", "mintrec2", "--data-dir", str(root), "--subset", "in-scope",
                 "--modalities", "text,video", "--video-file", "video_data/desc_feats.pkl"]) == 0
    report = capsys.readouterr().out
    assert "no problems found" in report and "widths {32: 4}" in report
    # the default subset (total) is absent: the error says which one is there
    assert main(["data", "check", "--dataset", "mintrec2", "--data-dir", str(root), "--modalities", "text"]) == 1
    assert "it holds ['in-scope']: choose one with --set data.subset=in-scope" in capsys.readouterr().out
    assert main(["data", "embed-descriptions", "--descriptions", str(tmp_path / "none"), "--out", str(out)]) == 2
