"""The method seam, the encoder's parts, self-describing run folders, resume and refusal."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from amess.cli import main
from amess.config import Config, field_docs
from amess.models import METHODS, IntentModel, IntentOutput, register_method

# --- 1. a method is one file: this one lives in the test and is edited nowhere else -------
# (TINY_METHOD_LINES counts the lines from the decorator to the end of `forward`)


@register_method("tiny_test")
class TinyMethod(IntentModel):
    """Text [CLS] -> linear head, scaled; with a collator hook that counts words."""

    reads = ("text",)

    @dataclass
    class Settings:
        scale: float = 1.0
        """Multiplies the logits."""

        def __post_init__(self):
            if not self.scale > 0:
                raise ValueError(f"tiny_test.scale must be > 0, got {self.scale}")

    @classmethod
    def collate_hook(cls, settings, tokenizer, text_max_len):
        def hook(samples, batch):
            batch.extras["n_words"] = torch.tensor([len(s.text.split()) for s in samples], dtype=torch.float32)
        return hook

    def __init__(self, *, settings, encoder, num_labels, **_):
        super().__init__()
        self.settings, self.encoder, self.head = settings, encoder, nn.Linear(encoder.hidden_size, num_labels)

    def forward(self, batch):
        pooled = self.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[:, 0]
        assert batch.extras["n_words"].shape == (len(batch),)  # the hook ran
        return IntentOutput(logits=self.head(pooled) * self.settings.scale, pooled=pooled)


TINY_METHOD_LINES = 29


def _train(out, data_dir, enc, *extra, method="text"):
    args = ["train", "--data-dir", str(data_dir), "--method", method, "--text-encoder", str(enc),
            "--batch-size", "8", "--no-progress", "--set", "train.plots=false", "--out", str(out), *extra]
    return main(args)


def test_a_method_defined_in_a_test_file_trains_with_its_own_settings(tmp_path, synth_dir, tiny_encoder_dir, capsys):
    import inspect

    src = inspect.getsource(TinyMethod)
    assert len(src.strip().splitlines()) == TINY_METHOD_LINES  # decorator included
    assert _train(tmp_path / "run", synth_dir, tiny_encoder_dir, "--modalities", "text", "--epochs", "1",
                  "--max-steps", "2", "--set", "tiny_test.scale=2.5", method="tiny_test") == 0
    saved = Config.load(tmp_path / "run" / "config.yaml")
    assert saved.model.method == "tiny_test" and saved.tiny_test.scale == 2.5
    spec = json.loads((tmp_path / "run" / "seed_0" / "model_spec.json").read_text())
    assert spec["method"] == "tiny_test" and spec["settings"] == {"scale": 2.5}
    with pytest.raises(ValueError, match="tiny_test.scale must be > 0"):
        Config().override({"model.method": "tiny_test", "tiny_test.scale": -1})
    with pytest.raises(ValueError, match="no such setting"):
        Config().override({"tiny_test.nope": 1})
    assert main(["methods"]) == 0 and "tiny_test" in capsys.readouterr().out
    assert main(["methods", "show", "tiny_test"]) == 0
    shown = capsys.readouterr().out
    assert "scale = 1.0" in shown and "Multiplies the logits." in shown


def test_every_registered_setting_has_a_docstring():
    for name, cls in METHODS.items():
        if cls.Settings is not None:
            docs = field_docs(cls.Settings)
            undocumented = [f.name for f in dataclasses.fields(cls.Settings) if not docs.get(f.name)]
            assert not undocumented, f"{name}: {undocumented}"


def test_the_loop_has_no_method_specific_branch():
    root = Path(__file__).resolve().parents[1] / "src" / "amess" / "training"
    for f in root.glob("*.py"):
        text = f.read_text()
        for method in [m for m in METHODS if m != "text"]:
            assert f'"{method}"' not in text and f"'{method}'" not in text, f"{f.name} names method {method!r}"


# --- 2. the text encoder exposes its parts ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert_with_pooler(tmp_path_factory, tiny_encoder_dir):
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_bert_pooler")
    AutoTokenizer.from_pretrained(tiny_encoder_dir).save_pretrained(d)
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)
    BertModel(cfg).save_pretrained(d)
    return d


def test_layers_run_in_two_halves_equal_one_pass(tiny_bert_with_pooler):
    from amess.models.encoders import load_text_encoder

    enc = load_text_encoder(str(tiny_bert_with_pooler), parts=("pooler",)).eval()
    tok = enc.tokenizer(["a short one", "a somewhat longer utterance here"], ["ctx", "more context"],
                        padding=True, return_tensors="pt")
    with torch.no_grad():
        full = enc(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                   token_type_ids=tok["token_type_ids"])
        h = enc.embeddings(tok["input_ids"], tok["token_type_ids"])
        mask = enc.extended_mask(tok["attention_mask"], h)
        h = enc.run_layers(h, tok["attention_mask"], 0, 2, mask=mask)
        h = enc.run_layers(h, tok["attention_mask"], 2, None)
        assert enc.num_layers == 4
        torch.testing.assert_close(h, full, atol=1e-5, rtol=1e-5)
        # word embeddings edited in between change the result: the halves really run the layers
        other = enc.run_layers(enc.embeddings(tok["input_ids"]), tok["attention_mask"])
        assert not torch.allclose(other, full, atol=1e-3)  # token types matter
        pooled = enc.pooled_output(full)
        assert pooled.shape == (2, 32) and torch.allclose(pooled, enc.model(**tok).pooler_output, atol=1e-5)
    with pytest.raises(ValueError, match="run_layers"):
        enc.run_layers(h, tok["attention_mask"], 3, 2)


def test_mlm_head_and_missing_pooler(tiny_bert_with_pooler, tiny_encoder_dir):
    from amess.models.encoders import load_text_encoder

    enc = load_text_encoder(str(tiny_bert_with_pooler), parts=("mlm_head",))
    assert enc.mlm_head is not None and not enc.mlm_head_pretrained and enc.pooler is None
    ids = enc.tokenizer(["the [MASK] is here"], return_tensors="pt")
    logits = enc.mlm_logits(enc(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]))
    assert logits.shape[-1] == enc.tokenizer.vocab_size and torch.isfinite(logits).all()
    with pytest.raises(RuntimeError, match="no pretrained pooler"):
        load_text_encoder(str(tiny_encoder_dir), parts=("pooler",))  # saved without one
    with pytest.raises(RuntimeError, match="without an MLM head"):
        load_text_encoder(str(tiny_encoder_dir)).mlm_logits(torch.zeros(1, 2, 32))


def test_non_finite_loaded_parameter_is_refused(tmp_path, tiny_encoder_dir):
    from transformers import BertModel

    from amess.models.encoders import load_text_encoder

    d = tmp_path / "broken"
    shutil.copytree(tiny_encoder_dir, d)
    m = BertModel.from_pretrained(d)
    with torch.no_grad():
        m.encoder.layer[1].attention.self.query.weight[0, 0] = float("nan")
    m.save_pretrained(d)
    with pytest.raises(RuntimeError, match="encoder.layer.1.attention.self.query.weight is not finite"):
        load_text_encoder(str(d))
    with torch.no_grad():
        m.encoder.layer[1].attention.self.query.weight[0, 0] = 1e22  # the transformers 5 trap
    m.save_pretrained(d)
    with pytest.raises(RuntimeError, match="uninitialised memory"):
        load_text_encoder(str(d))


# --- 4. a run folder describes itself: predict without the dataset ---------------------------

def test_predict_after_the_data_folder_is_deleted(tmp_path, synth_dir, tiny_encoder_dir, capsys):
    from amess import load_run
    from amess.data.safe_pickle import safe_load

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    out = tmp_path / "run"
    assert _train(out, data, tiny_encoder_dir, "--epochs", "1", "--max-steps", "3", "--ood-detector", "msp",
                  "energy", "mahalanobis", "doc", "desc_sim", "--set", "amess.desc_encoder=frozen",
                  method="amess") == 0
    test_rows = [line.split("\t") for line in (data / "test.tsv").read_text().splitlines()[1:]]
    ids = ["_".join(r[:3]) for r in test_rows]
    texts = [r[3] for r in test_rows]
    video = safe_load(data / "video_data" / "video_feats.pkl")
    audio = safe_load(data / "audio_data" / "audio_feats.pkl")
    f16 = lambda a: np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)  # noqa: E731 (as loaded)
    vids = [f16(np.asarray(video[i]).reshape(len(video[i]), -1)) if len(video[i]) else None for i in ids]
    auds = [f16(audio[i]) for i in ids]
    shutil.rmtree(data)

    p = load_run(out)
    assert p.method == "amess" and set(p.detectors) == {"msp", "energy", "mahalanobis", "doc", "desc_sim"}
    preds = p.predict(texts, video=vids, audio=auds)
    with np.load(out / "seed_0" / "outputs_test.npz") as z:
        assert [str(i) for i in z["ids"]] == ids
        saved = z["scores"]
    got = np.array([[dict(r.ranked)[n] for n in p.label_names] for r in preds])
    np.testing.assert_allclose(got, saved, atol=2e-4)
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert spec["feature_dims"] == {"video": 256, "audio": 768} and spec["text_max_len"] == 30
    assert len(spec["descriptions"]) == 20 and spec["ood"]["doc"]["threshold"] == 0.0
    assert len(spec["ood"]["doc"]["fitted"]["thresholds_"]) == 20
    assert np.array(spec["ood"]["mahalanobis"]["fitted"]["means_"]).shape[1] == 32
    # the saved detectors reproduce the test-time figures (nothing refitted)
    from amess.training.evaluation import EvalResult, score_detector

    res = EvalResult.load(out / "seed_0" / "outputs_test.npz", "test")
    metrics = json.loads((out / "seed_0" / "metrics.json").read_text())["metrics"]["test"]["ood"]
    for name, fd in p.detectors.items():
        assert score_detector(fd, res)[0]["f1_overall"] == pytest.approx(metrics[name]["f1_overall"])
    with pytest.raises(ValueError, match="expected \\(frames, 256\\)"):
        p.predict(["hi"], video=[np.zeros((3, 10))])

    capsys.readouterr()
    assert main(["predict", str(out), "--text", texts[0], "--top", "3"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("%") == 3 and "out-of-scope (doc):" in shown and "anchor words:" in shown
    tsv = tmp_path / "many.tsv"
    tsv.write_text("id\ttext\n" + "".join(f"u{i}\t{t}\n" for i, t in enumerate(texts[:5])))
    assert main(["predict", str(out), "--tsv", str(tsv), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == [f"u{i}" for i in range(5)] and len(rows[0]["ranked"]) == 5


# --- 5. resume after a kill, refusal of another run's folder ---------------------------------

KILLER = """
import os, signal, sys
import amess.training.loop as loop
save = loop.torch_save
def killing_save(obj, path):
    save(obj, path)
    if str(path).endswith("train_state.pt"):
        os.kill(os.getpid(), signal.SIGKILL)  # right after the first epoch's state is written
loop.torch_save = killing_save
from amess.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_after_its_first_epoch_resumes_to_the_same_result(tmp_path, synth_dir, tiny_encoder_dir):
    args = ["--modalities", "text", "--epochs", "3", "--patience", "5", "--seeds", "0", "1"]
    assert _train(tmp_path / "straight", synth_dir, tiny_encoder_dir, *args) == 0
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-c", KILLER, "train", "--data-dir", str(synth_dir), "--method", "text",
           "--text-encoder", str(tiny_encoder_dir), "--batch-size", "8", "--no-progress", "--set",
           "train.plots=false", "--out", str(killed), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = torch.load(killed / "seed_0" / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1 and not (killed / "seed_0" / "metrics.json").exists()
    assert not (killed / "summary.json").exists()
    assert _train(killed, synth_dir, tiny_encoder_dir, *args) == 0  # the same command again
    for s in (0, 1):
        a = json.loads((tmp_path / "straight" / f"seed_{s}" / "metrics.json").read_text())
        b = json.loads((killed / f"seed_{s}" / "metrics.json").read_text())
        assert a["metrics"] == b["metrics"] and [h["dev"] for h in a["history"]] == [h["dev"] for h in b["history"]]
        assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
        assert b["resumed_after_epoch"] == (1 if s == 0 else 0) and b["epochs_run"] == 3
        assert ((tmp_path / "straight" / f"seed_{s}" / "predictions.csv").read_text()
                == (killed / f"seed_{s}" / "predictions.csv").read_text())
        assert not (killed / f"seed_{s}" / "train_state.pt").exists()
    # a finished run is reused, and a seed added later is the only one trained
    mtime = (killed / "seed_0" / "model.pt").stat().st_mtime_ns
    assert _train(killed, synth_dir, tiny_encoder_dir, *args[:-3], "--seeds", "0", "1", "2") == 0
    assert (killed / "seed_0" / "model.pt").stat().st_mtime_ns == mtime
    assert json.loads((killed / "summary.json").read_text())["seeds"] == [0, 1, 2]


def test_an_out_folder_of_another_run_is_refused(tmp_path, synth_dir, tiny_encoder_dir, caplog):
    out = tmp_path / "run"
    base = ["--modalities", "text", "--epochs", "1", "--max-steps", "1"]
    assert _train(out, synth_dir, tiny_encoder_dir, *base) == 0
    before = (out / "seed_0" / "metrics.json").read_text()
    caplog.clear()
    assert _train(out, synth_dir, tiny_encoder_dir, *base, "--lr", "3e-4") == 2
    msg = caplog.records[-1].getMessage()
    assert "different configuration" in msg and "train.lr: 0.0001 -> 0.0003" in msg and "--overwrite" in msg
    assert (out / "seed_0" / "metrics.json").read_text() == before  # untouched
    assert _train(out, synth_dir, tiny_encoder_dir, *base, "--lr", "3e-4", "--overwrite") == 0
    assert Config.load(out / "config.yaml").train.lr == 3e-4
    (tmp_path / "afile").write_text("x")
    caplog.clear()
    assert _train(tmp_path / "afile", synth_dir, tiny_encoder_dir, *base) == 2
    assert "is a file" in caplog.records[-1].getMessage()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert _train(foreign, synth_dir, tiny_encoder_dir, *base, "--overwrite") == 2
    assert (foreign / "notes.txt").read_text() == "mine"


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    from amess.training.artifacts import atomic_path, write_json

    path = tmp_path / "summary.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"a": ')  # half written, then the process fails
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
