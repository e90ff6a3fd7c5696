"""Out-of-scope detection through the training loop on synthetic MIntRec2.0."""

from __future__ import annotations

import json

import numpy as np
import pytest

from amess.cli import main

OOD_KEYS = ("oos_acc", "f1_is", "f1_oos", "f1_overall", "auroc", "aupr_in", "aupr_out", "fpr95")


@pytest.fixture(scope="module")
def synth2_dir(tmp_path_factory):
    from amess.data.synth import generate_mintrec2

    d = tmp_path_factory.mktemp("synth2")
    generate_mintrec2(d, seed=0, size=260)
    return d


def test_detectors_reported_per_detector_in_summary(tmp_path, synth2_dir, tiny_encoder_dir):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "mintrec2", "--data-dir", str(synth2_dir), "--method", "amess",
               "--text-encoder", str(tiny_encoder_dir), "--epochs", "1", "--max-steps", "2", "--seeds", "0", "1",
               "--no-progress", "--ood-detector", "msp", "maxlogit", "energy", "mahalanobis", "doc", "desc_sim",
               "--set", "amess.desc_encoder=frozen", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    test = summary["test"]
    from amess.training.evaluation import EvalResult, FittedDetector, score_detector

    assert test["acc"]["n"] == 2  # in-scope metrics beside the OOD ones
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    res = EvalResult.load(out / "seed_0" / "outputs_test.npz", "test")
    seed0 = json.loads((out / "seed_0" / "metrics.json").read_text())["metrics"]["test"]["ood"]
    for det in ("msp", "maxlogit", "energy", "mahalanobis", "doc", "desc_sim"):
        again = score_detector(FittedDetector.from_state(spec["ood"][det]), res)[0]  # the saved detector
        for k in OOD_KEYS:
            assert test["ood"][det][k]["n"] == 2
            assert seed0[det][k] == pytest.approx(again[k], abs=1e-9), (det, k)
        assert (out / "seed_0" / f"ood_scores_{det}.png").is_file()
    for plot in ("embeddings.png", "anchors.png", "training_curve.png", "confusion_matrix.png"):
        assert (out / "seed_0" / plot).is_file(), plot
    # training never saw an out-of-scope row without outlier exposure
    with np.load(out / "seed_0" / "outputs_train.npz") as z:
        assert (z["labels"] < 30).all()
    with np.load(out / "seed_0" / "outputs_test.npz") as z:
        assert (z["labels"] == 30).any() and z["scores"].shape[1] == 30
    # evaluating the run again reproduces the detectors' figures from the checkpoints
    assert main(["evaluate", str(out), "--split", "test"]) == 0
    again = json.loads((out / "summary.json").read_text())["test"]["ood"]
    for det in ("msp", "mahalanobis", "doc"):
        assert again[det]["auroc"]["mean"] == pytest.approx(test["ood"][det]["auroc"]["mean"], abs=1e-6)
    # under `--set` the detectors are fitted anew from the overridden scores, as training fits them:
    # the trained setting (auto = both) reproduces every stored figure, the head's logits change them
    from amess.evaluate import evaluate_run

    same = evaluate_run(out, "test", {"amess.inference": "both"})["per_seed"]
    head = evaluate_run(out, "test", {"amess.inference": "head"})["per_seed"]
    for seed in (0, 1):
        stored = json.loads((out / f"seed_{seed}" / "metrics.json").read_text())["metrics"]["test"]["ood"]
        assert set(same[seed]["test"]["ood"]) == set(stored) == set(head[seed]["test"]["ood"])
        for det in stored:
            for k in OOD_KEYS + ("threshold",):
                assert same[seed]["test"]["ood"][det][k] == pytest.approx(stored[det][k], abs=1e-6), (seed, det, k)
        assert head[seed]["test"]["ood"]["energy"]["auroc"] != pytest.approx(stored["energy"]["auroc"], abs=1e-6)
        assert head[seed]["test"]["ood"]["desc_sim"]["auroc"] == pytest.approx(stored["desc_sim"]["auroc"], abs=1e-6)


def test_outlier_exposure_keeps_oos_training_rows(tmp_path, synth2_dir, tiny_encoder_dir):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "mintrec2", "--data-dir", str(synth2_dir), "--method", "text",
               "--text-encoder", str(tiny_encoder_dir), "--epochs", "1", "--max-steps", "2", "--no-progress",
               "--outlier-exposure", "--ood-detector", "msp", "desc_sim", "--out", str(out)])
    assert rc == 0
    with np.load(out / "seed_0" / "outputs_train.npz") as z:
        assert (z["labels"] == 30).any()
    # `text` has no description similarities: desc_sim is skipped, the others reported
    ood = json.loads((out / "summary.json").read_text())["test"]["ood"]
    assert set(ood) == {"msp"}


def test_unknown_detector_is_rejected(tmp_path, synth2_dir, tiny_encoder_dir, caplog):
    rc = main(["train", "--dataset", "mintrec2", "--data-dir", str(synth2_dir), "--method", "text",
               "--text-encoder", str(tiny_encoder_dir), "--ood-detector", "oracle", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "unknown OOD detector" in caplog.text


def test_outlier_exposure_loss():
    import torch

    from amess.losses import outlier_exposure

    flat = torch.zeros(3, 5)
    peaked = torch.tensor([[10.0, 0, 0, 0, 0]] * 3)
    assert outlier_exposure(flat).item() == pytest.approx(np.log(5), rel=1e-5)  # the minimum
    assert outlier_exposure(peaked).item() > outlier_exposure(flat).item()
    assert outlier_exposure(torch.zeros(0, 5)).item() == 0.0
