"""Generalised zero-shot: intents held out of training are scored from their descriptions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from amess.cli import main
from amess.data.mintrec import MINTREC_LABELS


def test_holdout_labels_are_unseen_in_training_and_reported_apart(tmp_path, synth_dir, tiny_encoder_dir):
    out = tmp_path / "run"
    held = ["Complain", "Inform"]
    rc = main(["train", "--data-dir", str(synth_dir), "--method", "amess", "--text-encoder", str(tiny_encoder_dir),
               "--epochs", "1", "--max-steps", "2", "--no-progress", "--holdout-labels", ",".join(held),
               "--set", "amess.inference=both", "--set", "amess.desc_encoder=frozen", "--out", str(out)])
    assert rc == 0
    held_ids = [MINTREC_LABELS.index(n) for n in held]
    with np.load(out / "seed_0" / "outputs_train.npz") as z:
        assert not np.isin(z["labels"], held_ids).any()
    with np.load(out / "seed_0" / "outputs_dev.npz") as z:
        assert not np.isin(z["labels"], held_ids).any()
    with np.load(out / "seed_0" / "outputs_test.npz") as z:
        assert np.isin(z["labels"], held_ids).any()  # test keeps them
        assert z["scores"].shape[1] == 20
    test = json.loads((out / "summary.json").read_text())["test"]
    with np.load(out / "seed_0" / "outputs_test.npz") as z:
        unseen = np.isin(z["labels"], held_ids)
        hit = z["scores"].argmax(1) == z["labels"]
    s, u = hit[~unseen].mean(), hit[unseen].mean()
    assert test["acc_seen"]["mean"] == pytest.approx(s) and test["acc_unseen"]["mean"] == pytest.approx(u)
    assert test["acc_h"]["mean"] == pytest.approx(0.0 if s + u == 0 else 2 * s * u / (s + u))


def test_unknown_holdout_label_is_rejected(tmp_path, synth_dir, tiny_encoder_dir, caplog):
    rc = main(["train", "--data-dir", str(synth_dir), "--method", "amess", "--text-encoder", str(tiny_encoder_dir),
               "--holdout-labels", "Complain,Sing", "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    assert "Sing" in caplog.text
