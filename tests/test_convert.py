"""`amess data convert` and training from the memory-mapped store."""

from __future__ import annotations

from amess.cli import main


def test_convert_then_train_from_store_matches_pickles(tmp_path, synth_dir, tiny_encoder_dir, capsys):
    store = tmp_path / "store"
    assert main(["data", "convert", "--data-dir", str(synth_dir), "--out", str(store), "--no-progress"]) == 0
    assert "video:" in capsys.readouterr().out
    # a rerun on unchanged sources is skipped
    assert main(["data", "convert", "--data-dir", str(synth_dir), "--out", str(store), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("skipped") == 2
    common = ["train", "--data-dir", str(synth_dir), "--method", "text", "--text-encoder", str(tiny_encoder_dir),
              "--epochs", "1", "--max-steps", "2", "--no-progress", "--set", "train.plots=false"]
    assert main(common + ["--out", str(tmp_path / "a"), "--method", "amess", "--set", "amess.ss_loss=none"]) == 0
    assert main(common + ["--out", str(tmp_path / "b"), "--method", "amess", "--set", "amess.ss_loss=none",
                          "--feature-store", str(store)]) == 0
    # float16 in memory and float16 in the store: the same numbers, so the same predictions
    a = (tmp_path / "a" / "seed_0" / "predictions.csv").read_text()
    b = (tmp_path / "b" / "seed_0" / "predictions.csv").read_text()
    assert a == b


def test_training_from_an_incomplete_store_is_refused(tmp_path, synth_dir, tiny_encoder_dir, caplog):
    (tmp_path / "empty_store").mkdir()
    rc = main(["train", "--data-dir", str(synth_dir), "--method", "amess", "--text-encoder", str(tiny_encoder_dir),
               "--feature-store", str(tmp_path / "empty_store"), "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    assert "amess data convert" in caplog.text


def test_feature_store_auto_converts_once_and_matches_pickles(tmp_path, synth_dir, tiny_encoder_dir, caplog):
    import logging
    import shutil

    caplog.set_level(logging.INFO, logger="amess")
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    common = ["train", "--data-dir", str(data), "--method", "amess", "--text-encoder", str(tiny_encoder_dir),
              "--epochs", "1", "--max-steps", "2", "--no-progress", "--set", "train.plots=false",
              "--set", "amess.ss_loss=none"]
    assert main(common + ["--out", str(tmp_path / "mem")]) == 0
    assert main(common + ["--out", str(tmp_path / "auto1"), "--feature-store", "auto"]) == 0
    store = data / "amess_feature_store"
    assert (store / "manifest.json").is_file() and "converted audio features" in caplog.text
    caplog.clear()
    assert main(common + ["--out", str(tmp_path / "auto2"), "--feature-store", "auto"]) == 0
    assert "converted" not in caplog.text  # unchanged pickles: the store is reused as it is
    preds = [(tmp_path / d / "seed_0" / "predictions.csv").read_text() for d in ("mem", "auto1", "auto2")]
    assert preds[0] == preds[1] == preds[2]
