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
