"""`amess compare`: methods side by side, paired differences, resumable; publishable figures."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from amess.cli import main


def _compare(out, data_dir, enc, *extra):
    return main(["compare", "--data-dir", str(data_dir), "--text-encoder", str(enc), "--seeds", "0", "1",
                 "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--no-progress",
                 "--set", "train.plots=false", "--set", "amess.desc_encoder=frozen", "--out", str(out), *extra])


def test_compare_tables_paired_differences_and_resume(tmp_path, synth_dir, tiny_encoder_dir, capsys):
    out = tmp_path / "cmp"
    assert _compare(out, synth_dir, tiny_encoder_dir, "--methods", "text,amess", "--reference", "text",
                    "--in-process") == 0
    md = (out / "compare.md").read_text()
    assert "| text |" in md and "| amess |" in md and "Δ acc" in md
    rows = list(csv.DictReader(open(out / "compare.csv")))
    acc = {r["method"]: r for r in rows if r["split"] == "test" and r["metric"] == "acc"}
    # the paired difference is the mean of the per-seed differences, from the seed folders
    per = {m: [json.loads((out / m / f"seed_{s}" / "metrics.json").read_text())["metrics"]["test"]["acc"]
               for s in (0, 1)] for m in ("text", "amess")}
    assert float(acc["amess"]["delta_mean"]) == pytest.approx(np.mean(np.subtract(per["amess"], per["text"])), abs=1e-5)
    assert acc["text"]["delta_mean"] == "" and float(acc["amess"]["mean"]) == pytest.approx(np.mean(per["amess"]), abs=1e-5)
    amess_line = next(line for line in md.splitlines() if line.startswith("| amess |"))
    assert " M |" in amess_line  # parameter count column
    for f in ("compare_acc.pdf", "compare_acc.png", "compare_f1_macro.png"):
        assert (out / f).is_file()
    # rerun: nothing retrains; a changed A-MESS setting re-runs A-MESS only
    stamps = {m: (out / m / "seed_0" / "model.pt").stat().st_mtime_ns for m in ("text", "amess")}
    assert _compare(out, synth_dir, tiny_encoder_dir, "--methods", "text,amess", "--reference", "text",
                    "--in-process") == 0
    assert {m: (out / m / "seed_0" / "model.pt").stat().st_mtime_ns for m in stamps} == stamps
    assert _compare(out, synth_dir, tiny_encoder_dir, "--methods", "text,amess", "--reference", "text",
                    "--in-process", "--set", "amess.num_anchors=2") == 0
    assert (out / "text" / "seed_0" / "model.pt").stat().st_mtime_ns == stamps["text"]
    assert (out / "amess" / "seed_0" / "model.pt").stat().st_mtime_ns != stamps["amess"]


def test_compare_in_fresh_processes_skips_undefined_methods(tmp_path, synth_dir, tiny_encoder_dir, capsys):
    from amess.models import METHODS, IntentModel, register_method

    out = tmp_path / "cmp"
    assert _compare(out, synth_dir, tiny_encoder_dir, "--methods", "text,amess", "--modalities", "text") == 0
    md = (out / "compare.md").read_text()
    line = next(line for line in md.splitlines() if line.startswith("| text |"))
    assert line.rstrip(" |").split("|")[-1].strip() not in ("–", "")  # peak memory of its own process
    with pytest.raises(ValueError, match="--reference 'nope'"):
        from amess.compare import run_compare
        from amess.config import Config

        run_compare(Config(), ["text"], tmp_path / "x", reference="nope")
    if "needs_video_test" not in METHODS:
        @register_method("needs_video_test")
        class NeedsVideo(IntentModel):
            """A method that cannot run on text alone."""
            requires = ("text", "video")

    assert _compare(tmp_path / "cmp2", synth_dir, tiny_encoder_dir, "--methods", "text,needs_video_test",
                    "--modalities", "text", "--in-process") == 0
    assert "not defined for these modalities (needs video)" in (tmp_path / "cmp2" / "compare.md").read_text()


def test_train_prints_the_out_of_scope_table(tmp_path, tiny_encoder_dir, capsys):
    from amess.data.synth import generate_mintrec2

    data = tmp_path / "m2"
    generate_mintrec2(data, seed=0, size=300)
    assert main(["train", "--dataset", "mintrec2", "--data-dir", str(data), "--method", "text", "--text-encoder",
                 str(tiny_encoder_dir), "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--no-progress",
                 "--set", "train.plots=false", "--ood-detector", "msp", "energy", "--out", str(tmp_path / "run")]) == 0
    shown = capsys.readouterr().out
    assert "out-of-scope detection on test" in shown and "| msp |" in shown and "| energy |" in shown
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    msp = next(line for line in shown.splitlines() if line.startswith("| msp |"))
    assert f"{100 * summary['test']['ood']['msp']['f1_oos']['mean']:.2f}" in msp


def test_figures_are_publishable():
    from amess import plots

    y = np.array([0, 0, 1, 2, 2, 2])
    p = np.array([0, 1, 1, 2, 2, 0])
    fig = plots.confusion_matrix(y, p, ["a", "b", "c"], title="t")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(texts) == ["1", "1", "1", "1", "2"]  # counts in the non-empty cells
    assert len(fig.axes) == 2 and "row-normalised" in fig.axes[0].get_title()  # colour bar + note
    hist = [{"epoch": e, "train_loss": 1.0 / e, "dev": {"acc": 0.1 * e}} for e in (1, 2, 3)]
    ticks = plots.training_curve(hist, "acc").axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)
    rng = np.random.default_rng(0)
    desc = np.repeat(np.eye(4)[:1], 4, 0) + 1e-3 * rng.normal(size=(4, 4))  # four stars on one spot
    fig = plots.embedding_projection(rng.normal(size=(30, 4)), rng.integers(0, 4, 30), desc, list("wxyz"),
                                     method="pca")
    fig.canvas.draw()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t) for t in fig.axes[0].texts]  # the words (an annotation's box includes its line)
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_compare_variants_are_named_rows_with_their_own_settings(tmp_path, synth_dir, tiny_encoder_dir, capsys,
                                                                  caplog):
    import yaml

    out = tmp_path / "cmp"
    assert _compare(out, synth_dir, tiny_encoder_dir, "--methods", "text,amess_text,mb_text",
                    "--variant", "amess_text=amess:data.modalities=[text],amess.tau=0.2",
                    "--variant", "mb_text=mag_bert:data.modalities=[text]",
                    "--reference", "text", "--in-process") == 0
    cfg = yaml.safe_load((out / "amess_text" / "config.yaml").read_text())
    assert cfg["model"]["method"] == "amess" and cfg["data"]["modalities"] == ["text"]
    assert cfg["amess"]["tau"] == 0.2
    assert yaml.safe_load((out / "text" / "config.yaml").read_text())["data"]["modalities"] == ["text", "video", "audio"]
    md = (out / "compare.md").read_text()
    assert "| amess_text |" in md and "not defined for these modalities" in md.split("| mb_text |")[1].splitlines()[0]
    assert "`amess_text` = `amess` with `data.modalities=[text]`, `amess.tau=0.2`" in md
    caplog.clear()
    assert _compare(tmp_path / "cmp3", synth_dir, tiny_encoder_dir, "--methods", "text", "--variant", "x=amess",
                    "--in-process") == 0
    assert "not listed in --methods" in caplog.text and not (tmp_path / "cmp3" / "x").exists()
    for methods, variant, why in (("amess", "amess=text", "are methods already"),
                                  ("y", "y=amess:amess.nope=1", "no such setting")):
        caplog.clear()
        assert _compare(out, synth_dir, tiny_encoder_dir, "--methods", methods, "--variant", variant,
                        "--in-process") == 2
        assert why in caplog.text


def test_parse_variant_keeps_bracketed_commas():
    from amess.config import parse_variant

    assert parse_variant("a=amess:data.modalities=[text,video],amess.tau=0.1") == (
        "a", "amess", {"data.modalities": "[text,video]", "amess.tau": "0.1"})
    assert parse_variant("b=text") == ("b", "text", {})
    for bad in ("nomethod", "=amess", "c=amess:tau"):
        with pytest.raises(ValueError, match="--variant"):
            parse_variant(bad)


def test_a_terminated_compare_takes_its_training_child_with_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import sys; from amess.compare import run_child; run_child([sys.executable, '-c', {child!r}])"])
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    try:  # the child was reaped by the parent: its pid is gone (or, at worst, reused by another process)
        os.kill(child_pid, 0)
        alive = open(f"/proc/{child_pid}/cmdline", "rb").read().find(b"time.sleep(120)") >= 0
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive
