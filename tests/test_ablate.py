"""Ablations: the row table covers every switch of the spec; runs, tables, resume, CLI."""

from __future__ import annotations

import argparse
import csv

import pytest

from amess import ablate, training as train
from amess.config import Config

ROWS = ["A-MESS (default)", "topk k=1", "text baseline"]


def _base(synth_dir, enc) -> Config:
    return Config().override({"data.data_dir": str(synth_dir), "model.text_encoder": str(enc),
                              "train.seeds": [0, 1], "train.epochs": 1, "train.max_steps": 1,
                              "train.batch_size": 8, "train.plots": False, "train.progress": False})


def test_rows_cover_every_switch_of_the_spec():
    rows = {a.name: a for a in ablate.ABLATIONS}
    assert list(rows)[0] == ablate.DEFAULT_ROW and rows[ablate.DEFAULT_ROW].overrides == {}
    assert len(rows) == len(ablate.ABLATIONS) == 18 and {a.group for a in ablate.ABLATIONS} == set(ablate.GROUPS)
    values = lambda key: [a.overrides[key] for a in ablate.ABLATIONS if key in a.overrides]  # noqa: E731
    assert set(values("amess.anchor_mode")) == {"none", "learned", "all"}
    assert sorted(values("amess.num_anchors")) == [1, 8]
    assert set(values("amess.ss_loss")) == {"none", "margin"}
    assert values("amess.text_view") == [False]
    assert values("amess.desc_encoder") == ["frozen", "shared", "momentum"]
    assert sorted(map(tuple, values("data.modalities"))) == [("text",), ("text", "audio"), ("text", "video")]
    assert values("model.method") == ["text"]
    # the default row is the documented default, and every row resolves to a valid config
    d = ablate.resolve(Config(), rows[ablate.DEFAULT_ROW])
    assert (d.model.method, d.amess.anchor_mode, d.amess.num_anchors, d.amess.ss_loss, d.amess.text_view,
            d.amess.desc_encoder, d.data.modalities) == ("amess", "topk", 4, "triplet", True, "momentum",
                                                         ["text", "video", "audio"])
    assert ablate.resolve(Config(), rows["text baseline"]).model.method == "text"
    assert len({a.slug for a in ablate.ABLATIONS}) == 18


def test_row_selection_by_group_and_name():
    assert [a.name for a in ablate.select_rows("anchors,k")] == [
        "anchors: none", "anchors: learned", "anchors: all", "topk k=1", "topk k=8"]
    assert [a.name for a in ablate.select_rows(["baseline", "default"])] == ["A-MESS (default)", "text baseline"]
    assert [a.name for a in ablate.select_rows("text+")] == ["text+audio", "text+video"]
    assert len(ablate.select_rows(None)) == len(ablate.ABLATIONS)
    with pytest.raises(ValueError, match="matches no ablation row"):
        ablate.select_rows("anchors,nonsense")


def test_contradictory_base_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match="ss_loss=none"):
        ablate.run_ablation(Config().override({"amess.inference": "similarity"}), tmp_path, rows="default,ss")


def test_run_writes_tables_then_resumes_without_training(tmp_path, monkeypatch, synth_dir, tiny_encoder_dir, capsys):
    out = tmp_path / "abl"
    base = _base(synth_dir, tiny_encoder_dir)
    summaries = ablate.run_ablation(base, out, rows=ROWS)
    assert list(summaries) == ROWS
    for a in ablate.select_rows(ROWS):
        assert (out / a.slug / "summary.json").is_file()
    assert ablate.Config.load(out / "text-baseline" / "config.yaml").model.method == "text"
    assert ablate.Config.load(out / "topk-k-1" / "config.yaml").amess.num_anchors == 1

    md = (out / "ablation.md").read_text()
    assert "`test`" in md and "| seeds | Δ acc | Δ f1_macro |" in md
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert set(ROWS) <= set(lines)
    assert "+0.00 ± 0.00" in lines["A-MESS (default)"]  # paired by seed against itself
    cells = [c.strip() for c in lines["topk k=1"].strip("|").split("|")]
    assert "±" in cells[1] and cells[-3] == "2" and cells[-2][0] in "+-" and "±" in cells[-2]
    with open(out / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["row"] for r in rows} == set(ROWS) and {r["split"] for r in rows} == {"dev", "test"}
    acc = [r for r in rows if r["metric"] == "acc" and r["split"] == "test"]
    assert len(acc) == 3 and all(r["n"] == "2" and 0 <= float(r["mean"]) <= 1 and float(r["std"]) >= 0
                                 for r in acc)

    # resume: nothing retrains; a changed setting or a new row trains only what changed
    calls = []

    def fake_run(cfg, run_dir, overwrite=False):
        calls.append(run_dir.name)
        overwrites.append(overwrite)
        return summaries[ablate.DEFAULT_ROW]

    overwrites = []

    monkeypatch.setattr(train, "run", fake_run)
    again = ablate.run_ablation(base.override({"train.progress": True}), out, rows=ROWS)
    assert calls == [] and again == summaries
    ablate.run_ablation(base, out, rows=ROWS + ["SS off"])
    assert calls == ["ss-off"]
    ablate.run_ablation(base.override({"train.lr": 3e-4}), out, rows=["default"])
    assert calls == ["ss-off", "a-mess-default"]
    assert overwrites == [False, True]  # a new row; a row whose finished run had another lr is replaced
    calls.clear()
    ablate.run_ablation(base, out, rows=["text baseline"], resume=False)
    assert calls == ["text-baseline"]

    # the CLI maps its flags onto the same config, so it reuses the finished rows
    calls.clear()
    parser = argparse.ArgumentParser()
    ablate.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ablate", "--data-dir", str(synth_dir), "--text-encoder", str(tiny_encoder_dir),
                              "--seeds", "0", "1", "--epochs", "1", "--max-steps", "1", "--batch-size", "8",
                              "--set", "train.plots=false", "--no-progress", "--out", str(out),
                              "--rows", "topk k=1,baseline"])
    assert args.func(args) == 0
    assert calls == []
    printed = capsys.readouterr().out
    # the rows asked for, and the finished default row from the first call, with deltas
    table = [line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| ")][1:]
    assert table == ROWS and "Δ acc" in printed and "| – | – |" not in printed
    assert printed.strip().splitlines()[0] in (out / "ablation.md").read_text()
    # without the default row the deltas are left empty
    md = ablate.ablation_markdown({"topk k=1": summaries["topk k=1"]}, "test")
    assert md.rstrip().endswith("| 2 | – | – |")


def test_cli_rejects_unknown_rows_and_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("trained"))
    parser = argparse.ArgumentParser()
    ablate.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ablate", "--out", str(tmp_path), "--rows", "bogus"])
    with pytest.raises(ValueError, match="matches no ablation row"):
        args.func(args)
    args = parser.parse_args(["ablate", "--out", str(tmp_path), "--set", "amess.no_such=1"])
    with pytest.raises(ValueError, match="no such setting"):
        args.func(args)


def test_csv_flattens_nested_detector_metrics(tmp_path):
    v = {"mean": 0.5, "std": 0.1, "n": 3}
    summaries = {"A-MESS (default)": {"test": {"acc": v, "ood": {"msp": {"auroc": v}}}, "seeds": [0, 1, 2]}}
    ablate.write_csv(tmp_path / "a.csv", summaries)
    with open(tmp_path / "a.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["metric"], r["mean"], r["n"]) for r in rows] == [("acc", "0.500000", "3"),
                                                               ("ood.msp.auroc", "0.500000", "3")]
