"""MAG-BERT on a tiny BERT with a pooler: settings, shapes, masks, the gate, training, the CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
import pickle

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from amess.cli import main
from amess.config import Config, DataConfig, ModelConfig, field_docs
from amess.data.batch import Batch
from amess.models import METHODS, build_model
from amess.models.encoders import TextEncoder, check_finite, load_text_encoder
from amess.models.mag_bert import MAG, MagBertSettings, area_align

VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + [f"w{i}" for i in range(5, 100)]
C, DV, DA = 3, 6, 5


def tiny_encoder(seed: int = 0, layers: int = 2) -> TextEncoder:
    """A random BERT (hidden 32) with a pooler, built in memory; no dropout."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    return TextEncoder(BertModel(cfg, add_pooling_layer=True), tok, "tiny-bert")


def make_model(*, video: bool = True, audio: bool = True, task: str = "intent", seed: int = 0, layers: int = 2,
               **settings) -> torch.nn.Module:
    settings.setdefault("dropout", 0.0)
    cfg = Config(data=DataConfig(task=task), model=ModelConfig(method="mag_bert", dropout=0.0),
                 methods={"mag_bert": MagBertSettings(**settings)})
    encoder = tiny_encoder(seed, layers)
    torch.manual_seed(seed + 1)
    return build_model("mag_bert", config=cfg, encoder=encoder, num_labels=C,
                       video_dim=DV if video else None, audio_dim=DA if audio else None)


def make_batch(*, lengths=(10, 7, 5, 3), video_lengths=(7, 4, 0, 2), audio_lengths=(9, 0, 3, 1),
               seed: int = 0) -> Batch:
    """[CLS] words [SEP] then padding; frames zero past each sample's length."""
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), max(lengths)
    ids = torch.zeros(b, n, dtype=torch.long)
    att = torch.zeros(b, n, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, 0], ids[i, length - 1] = 1, 2
        ids[i, 1:length - 1] = torch.randint(5, 100, (length - 2,), generator=g)
        att[i, :length] = 1
    batch = Batch(ids=[f"s{i}" for i in range(b)], input_ids=ids, attention_mask=att,
                  labels=torch.arange(b) % C, token_type_ids=torch.zeros_like(ids))
    for name, dim, ls in (("video", DV, video_lengths), ("audio", DA, audio_lengths)):
        m = max(1, max(ls))
        mask = torch.arange(m)[None, :] < torch.tensor(ls)[:, None]
        x = torch.randn(b, m, dim, generator=g) * mask[..., None]
        setattr(batch, name, x)
        setattr(batch, f"{name}_mask", mask)
    return batch


def pad_more(batch: Batch, frames: int = 5, tokens: int = 3) -> Batch:
    """The same samples with extra padding: garbage frames under a False mask, pad tokens."""
    out = dataclasses.replace(batch)
    for name in ("video", "audio"):
        x, mask = getattr(batch, name), getattr(batch, f"{name}_mask")
        b, _, d = x.shape
        setattr(out, name, torch.cat([x, torch.full((b, frames, d), 7.0)], dim=1))
        setattr(out, f"{name}_mask", torch.cat([mask, torch.zeros(b, frames, dtype=torch.bool)], dim=1))
    z = torch.zeros(batch.input_ids.shape[0], tokens, dtype=torch.long)
    out.input_ids = torch.cat([batch.input_ids, z], 1)
    out.attention_mask = torch.cat([batch.attention_mask, z], 1)
    out.token_type_ids = torch.cat([batch.token_type_ids, z], 1)
    return out


# --- registration and settings ------------------------------------------------------------

def test_registered_and_every_setting_shown_with_its_docstring(capsys):
    assert METHODS["mag_bert"].encoder_parts == ("pooler",)
    assert main(["methods", "show", "mag_bert"]) == 0
    shown = capsys.readouterr().out
    docs = field_docs(MagBertSettings)
    for f in dataclasses.fields(MagBertSettings):
        assert f"{f.name} = {f.default!r}" in shown and docs[f.name] and docs[f.name] in shown
    assert "encoder parts: pooler" in shown


@pytest.mark.parametrize("bad, match", [({"align": "ctx"}, "mag_bert.align"),
                                        ({"beta_shift": 0.0}, "mag_bert.beta_shift"),
                                        ({"dropout": 1.0}, "mag_bert.dropout"),
                                        ({"injection_index": -1}, "mag_bert.injection_index"),
                                        ({"classify": "mean"}, "mag_bert.classify")])
def test_bad_settings_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        Config().override({"model.method": "mag_bert", **{f"mag_bert.{k}": v for k, v in bad.items()}})


def test_text_alone_and_a_too_deep_gate_are_clear_errors():
    with pytest.raises(ValueError, match="'mag_bert' needs text and at least one of video, audio"):
        make_model(video=False, audio=False)
    with pytest.raises(ValueError, match="injection_index=3: the encoder 'tiny-bert' has 2 layers"):
        make_model(injection_index=3)
    enc = tiny_encoder()
    enc.model.pooler = None
    with pytest.raises(ValueError, match="without a pooler"):
        build_model("mag_bert", config=Config(model=ModelConfig(method="mag_bert")), encoder=enc, num_labels=C,
                    video_dim=DV, audio_dim=None)


def test_beta_shift_defaults_to_the_reference_value_of_the_task():
    assert make_model().mag.beta_shift == 0.005
    assert make_model(task="binary").mag.beta_shift == 0.04
    assert make_model(task="binary", beta_shift=0.1).mag.beta_shift == 0.1


# --- forward: shapes, masks, empty streams ---------------------------------------------------

@pytest.mark.parametrize("video, audio", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("align", ["area", "ctc"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_shapes_for_every_subset_alignment_and_position(video, audio, align, index):
    model = make_model(video=video, audio=audio, align=align, injection_index=index)
    check_finite(model, "mag_bert")
    batch = make_batch()
    out = model(batch)
    assert out.logits.shape == (4, C) and out.pooled.shape == (4, 32) and out.extras["alpha"].shape == (4,)
    assert torch.isfinite(out.logits).all() and ((out.extras["alpha"] >= 0) & (out.extras["alpha"] <= 1)).all()
    assert sorted(model.mag.gate) == sorted(n for n, on in (("video", video), ("audio", audio)) if on)


@pytest.mark.parametrize("align", ["area", "ctc"])
def test_padded_frames_and_tokens_change_no_output(align):
    model = make_model(align=align, injection_index=1).eval()
    batch = make_batch()
    with torch.no_grad():
        a, b = model(batch), model(pad_more(batch))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("align", ["area", "ctc"])
def test_no_frames_is_finite_and_equals_a_dropped_stream(align):
    model = make_model(align=align)
    batch = make_batch(video_lengths=(0, 0, 0, 0), audio_lengths=(0, 3, 0, 1))
    out = model(batch)
    loss, parts = model.loss(out, batch)
    loss.backward()
    assert torch.isfinite(out.logits).all() and np.isfinite(parts["alpha"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        full = model(batch).logits
        dropped = dataclasses.replace(batch, video=None, video_mask=None)
        torch.testing.assert_close(model(dropped).logits, full)
        # a sample with no frames at all leaves the text unshifted: alpha = 0
        assert model(batch).extras["alpha"][[0, 2]].eq(0).all()


def test_area_alignment_by_hand():
    x = torch.arange(4.0)[None, :, None].repeat(1, 1, 2)  # frames 0, 1, 2, 3
    fm = torch.tensor([[True, True, True, True]])
    # 2 tokens over 4 frames: means of (0, 1) and (2, 3); the padded token gets nothing
    got = area_align(x, fm, torch.tensor([[True, True, False]]))[0, :, 0]
    torch.testing.assert_close(got, torch.tensor([0.5, 2.5, 0.0]))
    # 3 tokens over 2 frames: frame 0, half-half, frame 1
    got = area_align(x[:, :2], fm[:, :2], torch.tensor([[True, True, True]]))[0, :, 0]
    torch.testing.assert_close(got, torch.tensor([0.0, 0.5, 1.0]))
    # no frames: zeros
    assert area_align(x, torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)).eq(0).all()


def test_gate_shift_is_capped_at_beta_times_the_text_norm():
    torch.manual_seed(0)
    mag = MAG(8, {"video": 4}, beta_shift=0.05, dropout=0.0, init_std=1.0).eval()
    e, v = torch.randn(2, 5, 8), 100 * torch.randn(2, 5, 4)
    with torch.no_grad():
        _, alpha = mag(e, {"video": (v, torch.tensor([True, True]))})
        h = torch.relu(mag.gate["video"](torch.cat([v, e], -1))) * mag.proj["video"](v)
    shift = (alpha[..., None] * h).norm(dim=-1)
    assert (shift <= 0.05 * e.norm(dim=-1) + 1e-4).all() and (alpha < 1).all()


def test_classify_cls_reads_the_cls_state_and_freezes_the_unused_pooler():
    batch = make_batch()
    pooler, cls = make_model(), make_model(classify="cls")
    cls.load_state_dict(pooler.state_dict())
    pooler.eval(), cls.eval()
    assert not any(p.requires_grad for p in cls.encoder.pooler.parameters())
    assert all(p.requires_grad for p in pooler.encoder.pooler.parameters())
    with torch.no_grad():
        a, b = pooler(batch), cls(batch)
        assert not torch.allclose(a.logits, b.logits)
        for p in cls.encoder.pooler.parameters():  # the pooler does not enter the `cls` logits
            p.add_(1.0)
        assert torch.equal(cls(batch).logits, b.logits)
        # `cls` reads exactly the [CLS] state the reference's pooler maps through tanh(W h + b)
        dense = pooler.encoder.pooler.dense
        assert torch.allclose(torch.tanh(b.pooled @ dense.weight.t() + dense.bias), a.pooled, atol=1e-5)


def test_training_steps_lower_the_loss():
    model = make_model()
    batch = make_batch()
    opt = torch.optim.AdamW(model.param_groups(lr=3e-3, weight_decay=0.01))
    losses = []
    for _ in range(20):  # the head starts at BERT's init (std 0.02): logits near 0 at first
        loss, _ = model.loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]


# --- through the loop and the CLI -------------------------------------------------------------

@pytest.fixture(scope="module")
def pooler_encoder_dir(tmp_path_factory, tiny_encoder_dir):
    """The tiny test BERT (hidden 32, 2 layers) saved WITH a pooler (conftest's has none)."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny_bert_pooler")
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=128, type_vocab_size=2)
    BertModel(cfg).save_pretrained(d)
    return d


def _train(out, data_dir, enc, *extra):
    return main(["train", "--data-dir", str(data_dir), "--method", "mag_bert", "--text-encoder", str(enc),
                 "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--no-progress", "--set",
                 "train.plots=false", "--out", str(out), *extra])


def test_parameters_finite_after_loading_the_real_way(pooler_encoder_dir):
    enc = load_text_encoder(str(pooler_encoder_dir), parts=("pooler",))
    for align in ("area", "ctc"):
        cfg = Config(model=ModelConfig(method="mag_bert")).override({"mag_bert.align": align})
        model = build_model("mag_bert", config=cfg, encoder=enc, num_labels=20, video_dim=256, audio_dim=768)
        check_finite(model, f"mag_bert ({align})")


def test_cli_train_then_predict(tmp_path, synth_dir, pooler_encoder_dir):
    from amess import load_run

    data = tmp_path / "data"  # `auto` writes its store into the data folder: not into the shared fixture
    shutil.copytree(synth_dir, data)
    out = tmp_path / "run"
    assert _train(out, data, pooler_encoder_dir, "--feature-store", "auto") == 0
    assert (data / "amess_feature_store" / "manifest.json").is_file()
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert spec["method"] == "mag_bert" and spec["encoder"]["parts"] == ["pooler"]
    assert spec["settings"]["beta_shift"] is None and spec["feature_dims"] == {"video": 256, "audio": 768}
    metrics = json.loads((out / "seed_0" / "metrics.json").read_text())
    assert np.isfinite(metrics["history"][0]["train_loss"])
    p = load_run(out)
    rng = np.random.default_rng(0)
    preds = p.predict(["can you help me", "thank you so much"],
                      video=[rng.standard_normal((5, 256)), None], audio=[rng.standard_normal((40, 768)), None])
    assert len(preds) == 2 and all(abs(sum(s for _, s in r.ranked) - 1) < 1e-4 for r in preds)
    assert len(p.predict(["text alone"])) == 1  # no features at all: streams with no frames


def test_cli_binary_task_and_text_only_refusal(tmp_path, synth_dir, pooler_encoder_dir, caplog):
    out = tmp_path / "bin"
    assert _train(out, synth_dir, pooler_encoder_dir, "--task", "binary", "--modalities", "text,audio") == 0
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert spec["label_names"] == ["Emotion", "Goal"] and spec["feature_dims"] == {"audio": 768}
    caplog.clear()
    assert _train(tmp_path / "text", synth_dir, pooler_encoder_dir, "--modalities", "text") == 2
    assert "'mag_bert' needs text and at least one of video, audio" in caplog.records[-1].getMessage()


def test_cli_mintrec2_with_every_detector_and_outlier_exposure(tmp_path, pooler_encoder_dir):
    from amess.data.synth import generate_mintrec2

    data = tmp_path / "synth2"
    generate_mintrec2(data, seed=0, size=120, video_len=(2, 10), audio_len=(4, 20))
    out = tmp_path / "run"
    assert _train(out, data, pooler_encoder_dir, "--dataset", "mintrec2", "--outlier-exposure", "--ood-detector",
                  "msp", "maxlogit", "energy", "mahalanobis", "doc") == 0
    ood = json.loads((out / "summary.json").read_text())["test"]["ood"]
    assert set(ood) == {"msp", "maxlogit", "energy", "mahalanobis", "doc"}
    assert all(0.0 <= ood[d]["f1_overall"]["mean"] <= 1.0 for d in ood)
    with np.load(out / "seed_0" / "outputs_train.npz") as z:
        assert (z["labels"] == 30).any() and z["pooled"].shape[1] == 32  # OOS rows trained on (OE)


def test_cli_custom_reader_with_features(tmp_path, pooler_encoder_dir):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "labels.txt").write_text("book\ncancel\n")
    rng = np.random.default_rng(0)
    rows = {"train": ["book a table", "cancel my order", "reserve a room", "call it off", "what time is it"],
            "dev": ["book a seat", "cancel that"], "test": ["book it", "cancel now", "sing a song"]}
    labels = ["book", "cancel", "book", "cancel", "UNK"]
    video, audio = {}, {}
    for split, texts in rows.items():
        lines = []
        for i, t in enumerate(texts):
            sid = f"{split}{i}"
            lines.append(f"{sid}\t{t}\t{labels[i] if split == 'train' else labels[i % 2] if i < 2 else 'UNK'}\n")
            video[sid] = rng.standard_normal((int(rng.integers(0, 4)), 12)).astype(np.float32)
            audio[sid] = rng.standard_normal((int(rng.integers(1, 9)), 10)).astype(np.float32)
        (d / f"{split}.tsv").write_text("id\ttext\tlabel\n" + "".join(lines))
    for name, feats in (("video.pkl", video), ("audio.pkl", audio)):
        with open(d / name, "wb") as f:
            pickle.dump(feats, f)
    out = tmp_path / "run"
    assert _train(out, d, pooler_encoder_dir, "--dataset", "custom", "--ood-detector", "msp") == 0
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert spec["feature_dims"] == {"video": 12, "audio": 10} and spec["label_names"] == ["book", "cancel"]
