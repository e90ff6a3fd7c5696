"""A dataset with the user's own intents and descriptions, end to end."""

from __future__ import annotations

import json

import pytest
import yaml

from amess.cli import main

ROWS = {
    "train": [("a1", "can you book me a table for two", "book"), ("a2", "cancel my reservation", "cancel"),
              ("a3", "i want to reserve a room", "book"), ("a4", "please cancel the order", "cancel"),
              ("a5", "what is the weather like", "UNK")],
    "dev": [("b1", "reserve a seat tonight", "book"), ("b2", "drop my booking", "cancel")],
    "test": [("c1", "book a flight", "book"), ("c2", "cancel everything", "cancel"), ("c3", "sing a song", "UNK")],
}


@pytest.fixture()
def custom_dir(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "labels.txt").write_text("book\ncancel\n")
    for split, rows in ROWS.items():
        (d / f"{split}.tsv").write_text("id\ttext\tlabel\n" + "".join("\t".join(r) + "\n" for r in rows))
    (tmp_path / "desc.yaml").write_text(yaml.safe_dump({
        "book": "The speaker wants to reserve or book something.",
        "cancel": "The speaker wants to call off an earlier booking or order."}))
    return d


def test_train_amess_on_own_labels_and_descriptions(tmp_path, custom_dir, tiny_encoder_dir):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "custom", "--data-dir", str(custom_dir), "--modalities", "text",
               "--method", "amess", "--text-encoder", str(tiny_encoder_dir), "--epochs", "1", "--max-steps", "1",
               "--label-descriptions", str(tmp_path / "desc.yaml"), "--ood-detector", "msp", "desc_sim",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "seed_0" / "metrics.json").read_text())
    assert m["label_names"] == ["book", "cancel"]
    assert "desc_sim" in m["metrics"]["test"]["ood"]


def test_own_labels_without_descriptions_is_a_clear_error(tmp_path, custom_dir, tiny_encoder_dir, caplog):
    rc = main(["train", "--dataset", "custom", "--data-dir", str(custom_dir), "--modalities", "text",
               "--method", "amess", "--text-encoder", str(tiny_encoder_dir), "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "needs label descriptions" in caplog.text


def test_unknown_label_in_custom_data(tmp_path, custom_dir):
    from amess.config import DataConfig
    from amess.data import DataError, get_reader

    with open(custom_dir / "train.tsv", "a") as f:
        f.write("z9\thello\tgreet\n")
    reader = get_reader(DataConfig(dataset="custom", data_dir=str(custom_dir), modalities=["text"]))
    with pytest.raises(DataError, match=r"train.tsv: row 7 \(sample z9\): unknown label 'greet'"):
        reader.read_rows("train")
