"""Open intent (TEXTOIR's protocol, `--known-ratio R`): per seed round(R * C) intents are
known, the model learns only those, and rows of the others are out-of-scope at test time."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from amess.cli import main
from amess.config import Config
from amess.data import get_reader
from amess.training.data import HOLDOUT_KEY, choose_known_labels, prepare_data

SHARED_MINTREC2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mintrec2"
DETECTORS = ["msp", "maxlogit", "energy", "doc", "mahalanobis"]


def expected_known(names: list[str], ratio: float, seed: int) -> list[str]:
    """Independently: numpy's Generator seeded by the seed, round(R * C) drawn, label order."""
    n = round(len(names) * ratio)
    idx = np.random.default_rng(seed).choice(len(names), n, replace=False)
    return [names[i] for i in range(len(names)) if i in set(idx.tolist())]


def data_cfg(data_dir, **kw) -> Config:
    o = {"data.data_dir": str(data_dir), "data.modalities": ["text"], **kw}
    return Config().override(o)


@pytest.fixture(scope="module")
def synth2_dir(tmp_path_factory):
    from amess.data.synth import generate_mintrec2

    d = tmp_path_factory.mktemp("synth2_oi")
    generate_mintrec2(d, seed=0, size=200)
    return d


@pytest.fixture()
def custom_dir(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "labels.txt").write_text("book\ncancel\npay\nask\n")
    rows = {"train": [("a1", "book a table", "book"), ("a2", "cancel it", "cancel"), ("a3", "pay the bill", "pay"),
                      ("a4", "ask a thing", "ask"), ("a5", "book a room", "book"), ("a6", "cancel the room", "cancel"),
                      ("a7", "pay now", "pay"), ("a8", "ask again", "ask"), ("a9", "the weather", "UNK")],
            "dev": [("b1", "book a seat", "book"), ("b2", "cancel that", "cancel"), ("b3", "pay it", "pay"),
                    ("b4", "ask her", "ask"), ("b5", "sing", "UNK")],
            "test": [("c1", "book a flight", "book"), ("c2", "cancel all", "cancel"), ("c3", "pay me", "pay"),
                     ("c4", "ask him", "ask"), ("c5", "dance", "UNK")]}
    for split, rs in rows.items():
        (d / f"{split}.tsv").write_text("id\ttext\tlabel\n" + "".join("\t".join(r) + "\n" for r in rs))
    return d


# --- the known set --------------------------------------------------------------------

def test_known_set_is_seeded_sized_and_in_label_order():
    from amess.data.mintrec import MINTREC_LABELS
    from amess.data.mintrec2 import MINTREC2_LABELS

    for names in (list(MINTREC_LABELS), list(MINTREC2_LABELS)):
        for ratio in (0.25, 0.5, 0.75):
            sets = []
            for seed in range(5):
                known = choose_known_labels(names, ratio, seed)
                assert known == choose_known_labels(names, ratio, seed)  # deterministic per seed
                assert known == expected_known(names, ratio, seed)
                assert len(known) == round(ratio * len(names)) and len(set(known)) == len(known)
                assert known == [n for n in names if n in known]  # the dataset's order
                sets.append(tuple(known))
            assert len(set(sets)) == 5, (len(names), ratio)  # a different draw per seed
    assert len(choose_known_labels(list(MINTREC2_LABELS), 0.25, 0)) == 8  # round(7.5): Python's, as TEXTOIR
    assert len(choose_known_labels(list(MINTREC2_LABELS), 0.75, 0)) == 22  # round(22.5)


@pytest.mark.parametrize("ratio", [0.1, 0.9])
def test_known_count_outside_one_to_c_minus_one_is_refused(ratio):
    with pytest.raises(ValueError, match="expected 1 to 3"):
        choose_known_labels(["a", "b", "c", "d"], ratio, 0)  # round(0.4) = 0, round(3.6) = 4


# --- the splits -------------------------------------------------------------------------

def _names(split, label_names, oos="UNK"):
    return {s.id: (label_names[s.label] if s.label < len(label_names) else oos) for s in split.samples}


@pytest.mark.parametrize("dev_split", ["dev", "train:0.2"])
def test_splits_are_remapped_by_name(synth_dir, dev_split):
    cfg = data_cfg(synth_dir, **{"data.known_ratio": 0.5, "data.dev_split": dev_split})
    reader = get_reader(cfg.data)
    full = reader.load(["train", "dev", "test"])
    names = reader.label_names
    for seed in (0, 1):
        data = prepare_data(cfg, seed)
        known = expected_known(names, 0.5, seed)
        K = len(known)
        assert data.label_names == known == data.known_labels and data.all_label_names == names
        assert data.unknown_labels == [n for n in names if n not in known]
        orig = {**_names(full["train"], names), **_names(full["dev"], names)}
        for split in (data.train, data.dev):
            assert split.samples and all(s.label < K for s in split.samples)
            assert all(orig[s.id] == known[s.label] for s in split.samples)  # the same intent, by name
        # every train row of a known intent is kept (train, or the held-back dev slice)
        kept = {s.id for s in data.train.samples} | ({s.id for s in data.dev.samples} if dev_split != "dev" else set())
        assert kept == {i for i, n in _names(full["train"], names).items() if n in known}
        if dev_split == "dev":
            assert {s.id for s in data.dev.samples} == {i for i, n in _names(full["dev"], names).items() if n in known}
        else:
            assert data.dev_key == HOLDOUT_KEY
        test = data.tests["test"]
        assert [s.id for s in test.samples] == [s.id for s in full["test"].samples]  # no row lost
        for s, o in zip(test.samples, full["test"].samples):
            name = names[o.label]
            assert s.label == (known.index(name) if name in known else K), (s.id, name)
        assert any(s.label == K for s in test.samples) and any(s.label < K for s in test.samples)
        assert all(o.label < len(names) for o in full["test"].samples)  # the reader's samples untouched


def test_mintrec2_out_of_scope_rows_map_to_k(synth2_dir):
    cfg = data_cfg(synth2_dir, **{"data.dataset": "mintrec2", "data.known_ratio": 0.25})
    reader = get_reader(cfg.data)
    names, C = reader.label_names, len(reader.label_names)
    full = reader.load(["dev", "test"])
    data = prepare_data(cfg, 2)
    K = len(data.label_names)
    assert K == 8 and data.label_names == expected_known(names, 0.25, 2)
    assert all(s.label < K for s in data.train.samples)  # no outlier exposure: no out-of-scope row in train
    dev_full = {s.id: s.label for s in full["dev"].samples}
    for s in data.dev.samples:  # the dataset's own out-of-scope rows stay in dev (as K), unknown intents leave
        assert (s.label == K) == (dev_full[s.id] == C)
        assert dev_full[s.id] == C or names[dev_full[s.id]] in data.label_names
    assert any(s.label == K for s in data.dev.samples)
    for s, o in zip(data.tests["test"].samples, full["test"].samples):
        assert s.label == (K if o.label == C or names[o.label] not in data.label_names
                           else data.label_names.index(names[o.label]))


def test_custom_reader(custom_dir):
    cfg = data_cfg(custom_dir, **{"data.dataset": "custom", "data.known_ratio": 0.5})
    data = prepare_data(cfg, 0)
    known = expected_known(["book", "cancel", "pay", "ask"], 0.5, 0)
    assert data.label_names == known and len(known) == 2
    gold_train = dict(zip([f"a{i}" for i in range(1, 9)], ["book", "cancel", "pay", "ask"] * 2))
    # rows of unknown intents leave train, and the UNK row a9 too (no outlier exposure)
    assert {s.id: known[s.label] for s in data.train.samples} == {i: n for i, n in gold_train.items() if n in known}
    test = {s.id: s.label for s in data.tests["test"].samples}
    gold = {"c1": "book", "c2": "cancel", "c3": "pay", "c4": "ask"}
    assert test == {**{i: known.index(n) if n in known else 2 for i, n in gold.items()}, "c5": 2}


# --- refusals -----------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2", "nan"])
def test_ratio_outside_zero_one_is_refused(tmp_path, synth_dir, caplog, ratio):
    rc = main(["train", "--data-dir", str(synth_dir), "--modalities", "text", "--known-ratio", ratio,
               "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2 and "strictly between 0 and 1" in caplog.text
    assert not (tmp_path / "r").exists()


def test_with_holdout_labels_is_refused(tmp_path, synth_dir, caplog):
    rc = main(["train", "--data-dir", str(synth_dir), "--modalities", "text", "--known-ratio", "0.5",
               "--holdout-labels", "Complain", "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2 and "--known-ratio and --holdout-labels cannot be combined" in caplog.text
    with pytest.raises(ValueError, match="cannot be combined"):  # a config file too
        Config.from_dict({"data": {"known_ratio": 0.5, "holdout_labels": ["Complain"]}})


def test_dev_split_also_a_test_split_is_refused(synth_dir):
    cfg = data_cfg(synth_dir, **{"data.known_ratio": 0.5, "data.test_splits": ["dev", "test"]})
    with pytest.raises(ValueError, match="also a test split"):
        prepare_data(cfg, 0)


def test_too_few_intents_for_the_ratio_is_refused(tmp_path, custom_dir, tiny_encoder_dir, caplog):
    rc = main(["train", "--dataset", "custom", "--data-dir", str(custom_dir), "--modalities", "text",
               "--method", "text", "--text-encoder", str(tiny_encoder_dir), "--known-ratio", "0.1",
               "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2 and "= 0 of the 4 intents" in caplog.text


# --- a trained run ---------------------------------------------------------------------------

def test_trained_run_records_known_intents_and_scores_open_ones(tmp_path, synth_dir, tiny_encoder_dir, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(synth_dir), "--modalities", "text", "--method", "text",
            "--text-encoder", str(tiny_encoder_dir), "--epochs", "1", "--max-steps", "1", "--seeds", "0", "1",
            "--no-progress", "--set", "train.plots=false", "--ood-detector", *DETECTORS, "--out", str(out)]
    assert main(args + ["--known-ratio", "0.5"]) == 0
    names = get_reader(data_cfg(synth_dir).data).label_names
    knowns = []
    for seed in (0, 1):
        sd = out / f"seed_{seed}"
        known = expected_known(names, 0.5, seed)
        K = len(known)
        knowns.append(known)
        m = json.loads((sd / "metrics.json").read_text())
        assert m["known_labels"] == m["label_names"] == known and m["known_ratio"] == 0.5
        assert m["all_labels"] == names and m["unknown_labels"] == [n for n in names if n not in known]
        spec = json.loads((sd / "model_spec.json").read_text())
        assert spec["label_names"] == spec["known_labels"] == known and spec["all_labels"] == names
        with np.load(sd / "outputs_train.npz") as z:
            assert (z["labels"] < K).all() and z["scores"].shape[1] == K
        with np.load(sd / "outputs_dev.npz") as z:
            assert (z["labels"] < K).all()
        with np.load(sd / "outputs_test.npz") as z:
            labels, scores = z["labels"], z["scores"]
        assert scores.shape[1] == K and (labels == K).any() and (labels < K).any()
        test = m["metrics"]["test"]
        # in-scope figures: argmax over the known intents, on the rows of known intents only
        assert test["acc"] == pytest.approx(float(np.mean((scores.argmax(1) == labels)[labels < K])))
        for det in DETECTORS:  # every detector fitted and scored, with in-scope and out-of-scope rows
            r = test["ood"][det]
            for k in ("oos_acc", "f1_is", "f1_oos", "f1_overall", "auroc", "aupr_in", "aupr_out", "fpr95"):
                assert k in r, (det, k)
            # dev holds known intents only: tuned thresholds keep 95% of it; DOC keeps its own cut
            assert r["fallback_tpr95"] == (0.0 if det == "doc" else 1.0)
        assert "ood detector msp: dev split has no out-of-scope rows" in caplog.text
    assert knowns[0] != knowns[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["ood"]["msp"]["auroc"]["n"] == 2
    cfg = Config.load(out / "config.yaml")
    assert cfg.data.known_ratio == 0.5

    # the predictor knows only the seed's known intents; the others get the detectors' verdict
    import amess

    p = amess.load_run(out, seed=1)
    assert p.label_names == p.known_labels == knowns[1]
    (r,) = p.predict(["could you help me with these boxes?"])
    assert {n for n, _ in r.ranked} == set(knowns[1]) and set(r.ood) == set(DETECTORS)

    # `amess evaluate` remaps with each seed's own known intents and reproduces the figures
    assert main(["evaluate", str(out), "--split", "test"]) == 0
    again = json.loads((out / "summary.json").read_text())["test"]
    for det in DETECTORS:
        assert again["ood"][det]["auroc"]["mean"] == pytest.approx(summary["test"]["ood"][det]["auroc"]["mean"],
                                                                   abs=1e-6)
    assert again["acc"]["mean"] == pytest.approx(summary["test"]["acc"]["mean"], abs=1e-6)

    # another ratio is another run: refused on the same folder; the same command reuses the seeds
    caplog.clear()
    assert main(args + ["--known-ratio", "0.25"]) == 2
    assert "data.known_ratio: 0.5 -> 0.25" in caplog.text
    assert main(args) == 2 and "data.known_ratio: 0.5 -> None" in caplog.text
    caplog.clear()
    assert main(args + ["--known-ratio", "0.5"]) == 0
    assert "finished earlier" in caplog.text


def test_amess_with_descriptions_on_mintrec2(tmp_path, synth2_dir, tiny_encoder_dir):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "mintrec2", "--data-dir", str(synth2_dir), "--modalities", "text",
               "--method", "amess", "--text-encoder", str(tiny_encoder_dir), "--epochs", "1", "--max-steps", "1",
               "--no-progress", "--set", "train.plots=false", "--set", "amess.desc_encoder=frozen",
               "--known-ratio", "0.25", "--ood-detector", "msp", "desc_sim", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "seed_0" / "metrics.json").read_text())
    K = len(m["known_labels"])
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    from amess.labels import load_descriptions

    assert spec["descriptions"] == load_descriptions("mintrec2", m["known_labels"])  # the known intents' only
    with np.load(out / "seed_0" / "outputs_test.npz") as z:
        assert z["extra_desc_sims"].shape[1] == K and (z["labels"] == K).any()
    ood = m["metrics"]["test"]["ood"]
    assert set(ood) == {"msp", "desc_sim"} and "auroc" in ood["desc_sim"]
    assert ood["msp"]["fallback_tpr95"] == 0.0  # dev keeps the dataset's own out-of-scope rows: tuned on them


@pytest.mark.skipif(not (SHARED_MINTREC2 / "in-scope" / "train.tsv").is_file(),
                    reason="shared MIntRec2.0 text not present")
def test_real_mintrec2_in_scope_smoke(tmp_path, tiny_encoder_dir):
    """The README's command on the real MIntRec2.0 text (the first rows of each file), 1 step."""
    d = tmp_path / "mintrec2" / "in-scope"
    d.mkdir(parents=True)
    for split, n in (("train", 400), ("dev", 120)):
        lines = (SHARED_MINTREC2 / "in-scope" / f"{split}.tsv").read_text(encoding="utf-8").splitlines(True)
        (d / f"{split}.tsv").write_text("".join(lines[: n + 1]), encoding="utf-8")
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "mintrec2", "--data-dir", str(d.parent), "--set", "data.subset=in-scope",
               "--set", "data.dev_split=train:0.1", "--set", "data.test_splits=[dev]", "--modalities", "text",
               "--method", "text", "--text-encoder", str(tiny_encoder_dir), "--known-ratio", "0.75",
               "--ood-detector", ",".join(DETECTORS),
               "--set", "train.max_steps=1", "--epochs", "1", "--set", "train.plots=false", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "seed_0" / "metrics.json").read_text())
    assert len(m["known_labels"]) == 22 and len(m["all_labels"]) == 30
    dev = m["metrics"]["dev"]
    assert set(dev["ood"]) == set(DETECTORS) and all("auroc" in dev["ood"][d] for d in DETECTORS)
    with np.load(out / "seed_0" / f"outputs_{HOLDOUT_KEY}.npz") as z:
        assert (z["labels"] < 22).all()
