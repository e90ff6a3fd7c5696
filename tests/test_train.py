"""The one training loop: smoke run, run-folder contents, seed determinism, evaluate."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from amess.cli import main


def _train(out, data_dir, enc, *extra):
    args = ["train", "--data-dir", str(data_dir), "--method", "text", "--text-encoder", str(enc),
            "--epochs", "2", "--max-steps", "2", "--batch-size", "8", "--no-progress", "--out", str(out), *extra]
    assert main(args) == 0


def test_two_step_training_writes_a_complete_run_folder(tmp_path, synth_dir, tiny_encoder_dir):
    out = tmp_path / "run"
    _train(out, synth_dir, tiny_encoder_dir, "--seeds", "0", "1")
    summary = json.loads((out / "summary.json").read_text())
    from amess.metrics import classification_metrics
    from amess.training.evaluation import EvalResult

    for split in ("test", "dev"):
        per_seed = [classification_metrics((r := EvalResult.load(out / f"seed_{s}" / f"outputs_{split}.npz", split)).labels,
                                           r.preds, 20) for s in (0, 1)]
        for k in ("acc", "f1_macro", "precision_macro", "recall_macro", "f1_weighted", "precision_weighted",
                  "recall_weighted"):  # the summary is the mean over seeds of the metric of the saved outputs
            assert summary[split][k]["mean"] == pytest.approx(np.mean([m[k] for m in per_seed]), abs=1e-9)
            assert summary[split][k]["n"] == 2
    for s in (0, 1):
        d = out / f"seed_{s}"
        for f in ("config.yaml", "metrics.json", "predictions.csv", "model.pt", "training_curve.png",
                  "confusion_matrix.png", "outputs_test.npz"):
            assert (d / f).is_file(), f
        m = json.loads((d / "metrics.json").read_text())
        assert m["steps"] == 2 and m["seed"] == s
        with open(d / "predictions.csv") as f:
            rows = list(csv.DictReader(f))
        assert {r["split"] for r in rows} == {"dev", "test"}
        probs = np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in rows])
        assert probs.shape[1] == 20 and np.allclose(probs.sum(1), 1, atol=1e-3)
    import yaml

    assert yaml.safe_load((out / "seed_1" / "config.yaml").read_text())["train"]["seeds"] == [1]


def test_same_seed_same_result(tmp_path, synth_dir, tiny_encoder_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a, synth_dir, tiny_encoder_dir, "--modalities", "text")
    _train(b, synth_dir, tiny_encoder_dir, "--modalities", "text")
    pa = (a / "seed_0" / "predictions.csv").read_text()
    pb = (b / "seed_0" / "predictions.csv").read_text()
    assert pa == pb
    c = tmp_path / "c"
    _train(c, synth_dir, tiny_encoder_dir, "--modalities", "text", "--seeds", "1")
    assert (c / "seed_1" / "predictions.csv").read_text() != pa


def test_evaluate_reproduces_test_metrics(tmp_path, synth_dir, tiny_encoder_dir):
    out = tmp_path / "run"
    _train(out, synth_dir, tiny_encoder_dir)
    before = json.loads((out / "summary.json").read_text())["test"]
    assert main(["evaluate", str(out), "--split", "test"]) == 0
    after = json.loads((out / "summary.json").read_text())["test"]
    for k in before:
        assert after[k]["mean"] == pytest.approx(before[k]["mean"], abs=1e-6)


def test_heldback_dev_and_missing_test_split(tmp_path, real_mintrec_text, tiny_encoder_dir):
    out = tmp_path / "run"
    _train(out, real_mintrec_text, tiny_encoder_dir, "--modalities", "text", "--dev-split", "train:0.1",
           "--test-splits", "dev", "test")
    summary = json.loads((out / "summary.json").read_text())
    assert "train_holdout" in summary and "dev" in summary and "test" not in summary
    m = json.loads((out / "seed_0" / "metrics.json").read_text())
    with open(out / "seed_0" / "predictions.csv") as f:
        dev = [r for r in csv.DictReader(f) if r["split"] == "dev"]
    assert len(dev) == len((real_mintrec_text / "dev.tsv").read_text().splitlines()) - 1  # all of dev.tsv reported
    assert m["metrics"]["dev"]["acc"] == pytest.approx(np.mean([r["gold"] == r["pred"] for r in dev]))


def test_missing_training_split_is_a_clear_error(tmp_path, real_mintrec_text, tiny_encoder_dir, caplog):
    (real_mintrec_text / "dev.tsv").unlink()
    args = ["train", "--data-dir", str(real_mintrec_text), "--modalities", "text", "--method", "text",
            "--text-encoder", str(tiny_encoder_dir), "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(args) == 2
    assert "dev.tsv: split 'dev' is needed for training but missing" in caplog.text


def test_unloadable_encoder_says_how_to_fix(tmp_path):
    from amess.models.encoders import load_text_encoder

    with pytest.raises(RuntimeError, match="Point --text-encoder at a local folder"):
        load_text_encoder(str(tmp_path / "no-such-model"))


def test_hub_name_offline_says_how_to_use_a_local_folder(monkeypatch):
    from amess.models.encoders import load_text_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"'bert-base-uncased'.*not a local folder.*local folder holding config.json"):
        load_text_encoder("bert-base-uncased")


def test_bf16_mixed_precision_trains(tmp_path, synth_dir, tiny_encoder_dir):
    out = tmp_path / "run"
    _train(out, synth_dir, tiny_encoder_dir, "--precision", "bf16", "--modalities", "text")
    m = json.loads((out / "seed_0" / "metrics.json").read_text())
    assert np.isfinite(m["history"][0]["train_loss"])


def test_text_method_never_loads_features_it_does_not_read(tmp_path, synth_dir, tiny_encoder_dir, caplog):
    import logging
    import shutil

    caplog.set_level(logging.INFO, logger="amess")
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    for f in ("video_data/video_feats.pkl", "audio_data/audio_feats.pkl"):
        (data / f).write_bytes(b"not a pickle")  # any attempt to read these would fail
    # all modalities configured (the default), but `text` reads text only
    _train(tmp_path / "text", data, tiny_encoder_dir)
    assert "does not read video, audio" in caplog.text
    args = ["train", "--data-dir", str(data), "--method", "amess", "--text-encoder", str(tiny_encoder_dir),
            "--max-steps", "1", "--no-progress", "--out", str(tmp_path / "amess")]
    assert main(args) == 2
    assert "video_feats.pkl" in caplog.text


def test_fit_releases_the_optimiser_state_and_gradients(tmp_path, synth_dir, tiny_encoder_dir, monkeypatch):
    """After training, only the weights stay in memory: the best checkpoint is then loaded beside
    them, and keeping AdamW's two moments and the gradients alive made that load a run's peak."""
    import gc
    import weakref

    import torch

    from amess.config import Config
    from amess.training.distributed import make_accelerator
    from amess.training.loop import fit
    from amess.training.runner import setup_seed

    cfg = Config().override({"data.data_dir": str(synth_dir), "model.method": "amess", "model.text_encoder":
                             str(tiny_encoder_dir), "train.batch_size": 8, "train.epochs": 1, "train.max_steps": 2,
                             "train.progress": False, "data.test_splits": []})
    acc = make_accelerator(cfg)
    data, model, collator, _ = setup_seed(cfg, 0)
    made = []
    real = torch.optim.AdamW.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        made.append(weakref.ref(self))

    monkeypatch.setattr(torch.optim.AdamW, "__init__", spy)
    model, fr = fit(cfg, 0, model, data, collator, acc, tmp_path)
    gc.collect()
    assert fr.steps == 2 and len(made) == 1 and made[0]() is None  # no reference keeps the optimiser
    assert all(p.grad is None for p in acc.unwrap_model(model).parameters())


def test_evaluate_set_switches_inference_on_the_same_checkpoints_and_writes_nothing(tmp_path, synth_dir,
                                                                                    tiny_encoder_dir, caplog):
    from amess.evaluate import evaluate_run
    from amess.predictor import Predictor

    out = tmp_path / "run"
    _train(out, synth_dir, tiny_encoder_dir, "--method", "amess", "--modalities", "text")
    def contents():
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    files = contents()
    stored = json.loads((out / "seed_0" / "metrics.json").read_text())["metrics"]["test"]["acc"]
    both = evaluate_run(out, "test", {"amess.inference": "both"})  # what the default `auto` resolves to
    assert both["per_seed"][0]["test"]["acc"] == pytest.approx(stored, abs=1e-9)  # the trained setting: same figures
    sim = evaluate_run(out, "test", {"amess.inference": "similarity"})
    assert set(sim["per_seed"]) == {0}
    # both_weight 1 is the similarity view alone, 0 the head alone
    assert evaluate_run(out, "test", {"amess.both_weight": "1.0"})["per_seed"][0]["test"] == sim["per_seed"][0]["test"]
    head = evaluate_run(out, "test", {"amess.inference": "head"})["per_seed"][0]["test"]
    assert evaluate_run(out, "test", {"amess.both_weight": "0"})["per_seed"][0]["test"] == head
    assert contents() == files  # nothing written or overwritten
    texts = ["can you help me with this", "i am so sorry about that"]
    p_head, p_sim = (Predictor(out / "seed_0", {"amess.inference": m}) for m in ("head", "similarity"))
    assert p_sim.model.cfg.inference == "similarity" and p_head.model.cfg.inference_mode == "head"
    assert Predictor(out / "seed_0").model.cfg.inference_mode == "both"  # the trained `auto`
    r_head, r_sim = p_head.predict(texts), p_sim.predict(texts)
    assert any(a.ranked != b.ranked for a, b in zip(r_head, r_sim))  # the switch reached the model
    with pytest.raises(ValueError, match=r"amess.tau would change the trained 'amess' model.*\['amess.inference', 'amess.both_weight'\]"):
        Predictor(out / "seed_0", {"amess.tau": "0.1"})
    assert main(["evaluate", str(out), "--split", "test", "--set", "train.lr=1.0"]) == 2
    assert "train.lr would change the trained 'amess' model" in caplog.text
