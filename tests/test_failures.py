"""No silent wrong results in the loop and the run folder: a NaN model stops, stale seeds
are never averaged, a broken checkpoint is named, Ctrl-C leaves consistent files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from amess.cli import main
from amess.models import METHODS, IntentModel, IntentOutput, register_method

if "nan_after_test" not in METHODS:
    @register_method("nan_after_test")
    class NanAfter(IntentModel):
        """Text [CLS] -> head; its logits turn NaN from the given optimiser step on."""

        reads = ("text",)

        def __init__(self, *, encoder, num_labels, **_):
            super().__init__()
            self.encoder, self.head, self.calls = encoder, nn.Linear(encoder.hidden_size, num_labels), 0

        def forward(self, batch):
            pooled = self.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[:, 0]
            self.calls += self.training
            logits = self.head(pooled)
            return IntentOutput(logits=logits * float("nan") if self.calls >= 3 else logits, pooled=pooled)


def _train(out, data_dir, enc, *extra, method="text"):
    return main(["train", "--data-dir", str(data_dir), "--method", method, "--text-encoder", str(enc),
                 "--modalities", "text", "--batch-size", "8", "--no-progress", "--set", "train.plots=false",
                 "--out", str(out), *extra])


def test_a_nan_loss_stops_the_run_without_results(tmp_path, synth_dir, tiny_encoder_dir, caplog):
    out = tmp_path / "run"
    assert _train(out, synth_dir, tiny_encoder_dir, "--epochs", "2", method="nan_after_test") == 2
    msg = caplog.records[-1].getMessage()
    assert "training loss is not finite" in msg and "check the features" in msg
    assert not (out / "summary.json").exists() and not (out / "seed_0" / "metrics.json").exists()
    assert not (out / "seed_0" / "model.pt").exists()


def test_evaluate_uses_exactly_the_runs_seeds_and_names_a_missing_one(tmp_path, synth_dir, tiny_encoder_dir, caplog):
    out = tmp_path / "run"
    assert _train(out, synth_dir, tiny_encoder_dir, "--epochs", "1", "--max-steps", "1", "--seeds", "0", "1") == 0
    shutil.copytree(out / "seed_1", out / "seed_7")  # a stale folder of another run
    assert main(["evaluate", str(out), "--split", "test"]) == 0
    assert json.loads((out / "summary.json").read_text())["test"]["acc"]["n"] == 2
    (out / "seed_1" / "metrics.json").unlink()
    caplog.clear()
    assert main(["evaluate", str(out), "--split", "test"]) == 2
    assert "seed(s) [1] of this run are not finished" in caplog.records[-1].getMessage()


def test_a_truncated_checkpoint_is_a_one_line_error(tmp_path, synth_dir, tiny_encoder_dir, caplog):
    out = tmp_path / "run"
    assert _train(out, synth_dir, tiny_encoder_dir, "--epochs", "1", "--max-steps", "1") == 0
    ckpt = out / "seed_0" / "model.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    caplog.clear()
    assert main(["predict", str(out), "--text", "hello there"]) == 2
    msg = caplog.records[-1].getMessage()
    assert "model.pt: not a readable checkpoint" in msg and "weights_only=False" not in msg
    state = {k: v for k, v in torch.load(out / "seed_0" / "train_state.pt", weights_only=True)["model"].items()} \
        if (out / "seed_0" / "train_state.pt").exists() else None
    assert state is None  # a finished seed keeps no training state
    torch.save({"head.weight": torch.full((20, 32), float("nan"))}, ckpt)
    caplog.clear()
    assert main(["predict", str(out), "--text", "hello there"]) == 2
    assert "does not fit the model" in caplog.records[-1].getMessage()


def test_ctrl_c_exits_130_and_leaves_no_partial_file(tmp_path, synth_dir, tiny_encoder_dir, monkeypatch, caplog):
    import amess.training.loop as loop

    real = loop.train_step
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_step", interrupted)
    out = tmp_path / "run"
    assert _train(out, synth_dir, tiny_encoder_dir, "--epochs", "3") == 130
    assert "Rerun the same command to resume" in caplog.records[-1].getMessage()
    assert not list(out.rglob("*.tmp")) and not (out / "summary.json").exists()


def test_ood_reads_the_scores_the_method_predicts_with(tmp_path, synth_dir, tiny_encoder_dir):
    from amess.training.evaluation import EvalResult

    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(synth_dir), "--method", "amess", "--text-encoder", str(tiny_encoder_dir),
                 "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--no-progress", "--set",
                 "train.plots=false", "--set", "amess.desc_encoder=frozen", "--set", "amess.inference=similarity",
                 "--ood-detector", "msp", "--out", str(out)]) == 0
    res = EvalResult.load(out / "seed_0" / "outputs_test.npz", "test")
    b = res.bundle()
    assert res.decision_logits is not None and not np.allclose(b.logits, res.logits)
    np.testing.assert_array_equal(b.preds(), res.preds)  # C+1 predictions follow the in-scope ones
    from amess.ood import softmax

    np.testing.assert_allclose(softmax(b.logits), res.scores, atol=1e-5)


def test_a_run_on_changed_data_is_not_reused(tmp_path, synth_dir, tiny_encoder_dir, caplog):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    out = tmp_path / "run"
    args = ("--epochs", "1", "--max-steps", "1")
    assert _train(out, data, tiny_encoder_dir, *args) == 0
    rows = (data / "train.tsv").read_text().splitlines()
    head, first = rows[0], rows[1].split("\t")
    first[3] = first[3] + " indeed"
    (data / "train.tsv").write_text("\n".join([head, "\t".join(first)] + rows[2:]) + "\n")
    caplog.clear()
    assert _train(out, data, tiny_encoder_dir, *args) == 2
    assert "holds a run on other data" in caplog.records[-1].getMessage()
    from amess.config import Config
    from amess.training.runner import holds_other_run

    cfg = Config.load(out / "config.yaml")
    assert holds_other_run(out, cfg)  # callers that own their folders (ablate, compare, demo) re-run it
    assert _train(out, data, tiny_encoder_dir, *args, "--overwrite") == 0 and not holds_other_run(out, cfg)


def test_two_processes_never_train_into_one_folder(tmp_path, synth_dir, tiny_encoder_dir, caplog):
    """A second `amess train` on a folder another process is training into is refused (its
    seeds would mix with the first's); once that process is gone, the folder is usable."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from amess.training.runner import run_lock\n"
        "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)"), str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _train(out, synth_dir, tiny_encoder_dir, "--epochs", "1", "--max-steps", "1") == 2
        msg = caplog.records[-1].getMessage()
        assert f"another amess process (pid {holder.pid}) is training into it" in msg
        assert [p.name for p in out.iterdir()] == [".lock"]  # nothing written beside the other's run
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert _train(out, synth_dir, tiny_encoder_dir, "--epochs", "1", "--max-steps", "1") == 0  # the lock died with it
    assert (out / "summary.json").is_file()
