"""MulT on a tiny BERT: settings, shapes, masks, empty streams, the convolution, training, the CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from amess.cli import main
from amess.config import Config, ModelConfig, field_docs
from amess.data.batch import Batch
from amess.models import METHODS, build_model
from amess.models.encoders import TextEncoder, check_finite
from amess.models.mult import MultSettings, TemporalConv, attention_allowed

VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + [f"w{i}" for i in range(5, 100)]
C, DV, DA = 3, 6, 5
SMALL = dict(dst_feature_dims=16, nheads=2, n_levels=2)
"""Small enough for tests in milliseconds; every code path of the defaults."""
NO_DROPOUT = dict(attn_dropout=0.0, attn_dropout_v=0.0, attn_dropout_a=0.0, embed_dropout=0.0, output_dropout=0.0,
                  text_dropout=0.0)


def tiny_encoder(seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    return TextEncoder(BertModel(cfg, add_pooling_layer=False), tok, "tiny-bert")


def make_model(*, video: bool = True, audio: bool = True, seed: int = 0, defaults: bool = False, **settings):
    s = MultSettings(**settings) if defaults else MultSettings(**{**SMALL, **NO_DROPOUT, **settings})
    cfg = Config(model=ModelConfig(method="mult"), methods={"mult": s})
    encoder = tiny_encoder(seed)
    torch.manual_seed(seed + 1)
    return build_model("mult", config=cfg, encoder=encoder, num_labels=C,
                       video_dim=DV if video else None, audio_dim=DA if audio else None)


def make_batch(*, lengths=(10, 7, 5, 3), video_lengths=(7, 4, 0, 2), audio_lengths=(9, 0, 3, 1),
               seed: int = 0) -> Batch:
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
        setattr(batch, name, torch.randn(b, m, dim, generator=g) * mask[..., None])
        setattr(batch, f"{name}_mask", mask)
    return batch


def pad_more(batch: Batch, frames: int = 6, tokens: int = 3) -> Batch:
    """The same samples with extra padding: garbage frames under a False mask, pad tokens."""
    out = dataclasses.replace(batch)
    for name in ("video", "audio"):
        x, mask = getattr(batch, name), getattr(batch, f"{name}_mask")
        b, _, d = x.shape
        setattr(out, name, torch.cat([x, torch.full((b, frames, d), -3.0)], dim=1))
        setattr(out, f"{name}_mask", torch.cat([mask, torch.zeros(b, frames, dtype=torch.bool)], dim=1))
    z = torch.zeros(batch.input_ids.shape[0], tokens, dtype=torch.long)
    out.input_ids = torch.cat([batch.input_ids, z], 1)
    out.attention_mask = torch.cat([batch.attention_mask, z], 1)
    out.token_type_ids = torch.cat([batch.token_type_ids, z], 1)
    return out


# --- registration and settings ------------------------------------------------------------

def test_registered_and_every_setting_shown_with_its_docstring(capsys):
    assert METHODS["mult"].encoder_parts == ()
    assert main(["methods", "show", "mult"]) == 0
    shown = capsys.readouterr().out
    docs = field_docs(MultSettings)
    for f in dataclasses.fields(MultSettings):
        assert f"{f.name} = {f.default!r}" in shown and docs[f.name] and docs[f.name] in shown


@pytest.mark.parametrize("bad, match", [({"nheads": 7}, "must divide mult.dst_feature_dims"),
                                        ({"n_levels": 0}, "mult.n_levels"),
                                        ({"attn_dropout_a": 1.0}, "mult.attn_dropout_a"),
                                        ({"conv1d_kernel_size_l": 0}, "mult.conv1d_kernel_size_l"),
                                        ({"last_state": "first"}, "mult.last_state"),
                                        ({"checkpoint": "some"}, "mult.checkpoint")])
def test_bad_settings_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        Config().override({"model.method": "mult", **{f"mult.{k}": v for k, v in bad.items()}})


def test_text_alone_is_a_clear_error():
    with pytest.raises(ValueError, match="'mult' needs text and at least one of video, audio"):
        make_model(video=False, audio=False)


def test_defaults_are_the_reference_architecture():
    model = make_model(defaults=True)
    check_finite(model, "mult")
    assert sorted(model.cross) == ["audio_text", "audio_video", "text_audio", "text_video", "video_audio",
                                   "video_text"]
    assert all(len(t.layers) == 8 for t in model.cross.values()) and len(model.memory["text"].layers) == 8
    assert model.memory["audio"].layers[0].fc1.in_features == 240 and model.proj1.in_features == 720
    assert model.proj["text"].conv.kernel_size == (5,) and model.proj["audio"].conv.kernel_size == (1,)
    # attention dropout follows the keys' modality (MULT.py `_get_network`)
    assert model.cross["text_audio"].layers[0].attn.dropout == 0.2
    assert model.cross["audio_text"].layers[0].attn.dropout == 0.0
    assert make_model(defaults=True, n_levels=2).memory["video"].layers.__len__() == 3
    out = model.eval()(make_batch())
    assert out.logits.shape == (4, C) and out.pooled.shape == (4, 720) and torch.isfinite(out.logits).all()


# --- forward: shapes, masks, empty streams ---------------------------------------------------

@pytest.mark.parametrize("video, audio, width", [(True, False, 2 * 16), (False, True, 2 * 16), (True, True, 6 * 16)])
@pytest.mark.parametrize("last_state", ["last", "mean"])
def test_shapes_for_every_subset(video, audio, width, last_state):
    model = make_model(video=video, audio=audio, last_state=last_state)
    check_finite(model, "mult")
    out = model(make_batch())
    assert out.logits.shape == (4, C) and out.pooled.shape == (4, width) and torch.isfinite(out.pooled).all()


@pytest.mark.parametrize("kw", [{}, {"attn_mask": False}, {"last_state": "mean"}, {"conv1d_kernel_size_a": 3}])
def test_padded_frames_and_tokens_change_no_output(kw):
    model = make_model(**kw).eval()
    batch = make_batch()
    with torch.no_grad():
        a, b = model(batch), model(pad_more(batch))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-5)


def test_the_last_state_is_the_last_real_step():
    model = make_model().eval()
    batch = make_batch()
    with torch.no_grad():
        seqs = model._sequences(batch)
        x, mask = seqs["text"]
        crossed = [model.cross[f"text_{s}"](x, mask, *seqs[s]) for s in ("audio", "video")]
        h = model.memory["text"](torch.cat(crossed, -1), mask)
    lengths = mask.sum(1)
    assert lengths.tolist() == [6, 3, 1, 1]  # text lengths 10, 7, 5, 3 after the kernel-5 convolution
    got = model._summary(h, mask)
    torch.testing.assert_close(got, h[torch.arange(4), lengths - 1])


def test_no_frames_is_finite_and_equals_a_dropped_stream():
    model = make_model(defaults=True)
    batch = make_batch(video_lengths=(0, 0, 0, 0), audio_lengths=(0, 3, 0, 1))
    out = model(batch)
    loss, _ = model.loss(out, batch)
    loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        full = model(batch)
        dropped = model(dataclasses.replace(batch, video=None, video_mask=None))
    torch.testing.assert_close(dropped.logits, full.logits)
    width = 2 * 120
    assert full.pooled.shape == (4, 3 * width)


def test_temporal_conv_keeps_the_real_steps():
    torch.manual_seed(0)
    conv = TemporalConv(4, 3, kernel=5)
    x = torch.randn(3, 12, 4)
    mask = torch.arange(12)[None, :] < torch.tensor([10, 3, 0])[:, None]
    y, m = conv(x, mask)
    assert m.sum(1).tolist() == [6, 1, 0]
    alone = conv.conv(x[:1, :10].transpose(1, 2)).transpose(1, 2)  # the first sample, unpadded
    torch.testing.assert_close(y[:1, :6], alone)
    short = torch.cat([x[1:2, :3], torch.zeros(1, 2, 4)], 1)  # 3 real steps, zero-padded to the kernel
    torch.testing.assert_close(y[1:2, :1], conv.conv(short.transpose(1, 2)).transpose(1, 2))
    y2, m2 = conv(x[:, :4], mask[:, :4])  # a batch shorter than the kernel is padded to it
    assert y2.shape[1] == 1 and m2.sum(1).tolist() == [1, 1, 0]


def test_attention_mask_is_the_reference_future_mask_on_true_lengths():
    q = torch.tensor([[True, True, True, False]])
    k = torch.tensor([[True, True, True, True, True, False]])
    allowed, has = attention_allowed(q, k, causal=True)  # L_q 3, L_k 5: j <= i + 2
    expect = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]).bool()
    assert torch.equal(allowed[0], expect) and has.tolist() == [True]
    allowed, _ = attention_allowed(k, k, causal=True)  # self-attention: strictly causal over real steps
    assert torch.equal(allowed[0, :5, :5], torch.ones(5, 5).tril().bool())
    none, has = attention_allowed(q, torch.zeros(1, 6, dtype=torch.bool), causal=False)
    assert has.tolist() == [False] and none[0, :, 0].all() and none.sum() == 4  # key 0 only: finite softmax


def test_training_steps_lower_the_loss():
    model = make_model()
    batch = make_batch()
    opt = torch.optim.AdamW(model.param_groups(lr=3e-3, weight_decay=0.01))
    losses = []
    for _ in range(10):
        loss, _ = model.loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]



@pytest.mark.parametrize("mode, calls", [("memory", 3 * 3), ("all", 3 * 3 + 6 * 2)])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(monkeypatch, mode, calls):
    """With every dropout of the defaults on, recomputing layers in backward replays the same
    dropout masks: loss and every gradient equal those without checkpointing; and it does run
    (one checkpointed call per memory layer, or per layer of every transformer)."""
    dropouts = dict(attn_dropout=0.1, attn_dropout_v=0.2, attn_dropout_a=0.2, relu_dropout=0.1, res_dropout=0.1,
                    embed_dropout=0.1, output_dropout=0.2, text_dropout=0.4)
    batch = make_batch()
    results = {}
    seen = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: (seen.append(1), real(*a, **k))[1])
    for m in ("none", mode):
        model = make_model(checkpoint=m, **dropouts)
        model.train()
        torch.manual_seed(7)
        loss, _ = model.loss(model(batch), batch)
        loss.backward()
        results[m] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if m == "none":
            assert not seen
    assert len(seen) == calls
    assert torch.allclose(results["none"][0], results[mode][0], atol=1e-6)
    assert results["none"][1].keys() == results[mode][1].keys() and len(results["none"][1]) > 50
    for n, g in results["none"][1].items():
        assert torch.allclose(g, results[mode][1][n], atol=1e-5), n
    model.eval()  # no recomputation outside training
    with torch.no_grad():
        model(batch)
    assert len(seen) == calls


# --- through the loop and the CLI -------------------------------------------------------------

CLI_SMALL = ["--set", "mult.dst_feature_dims=16", "--set", "mult.nheads=2", "--set", "mult.n_levels=1"]


def _train(out, data_dir, enc, *extra):
    return main(["train", "--data-dir", str(data_dir), "--method", "mult", "--text-encoder", str(enc),
                 "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--no-progress", "--set",
                 "train.plots=false", *CLI_SMALL, "--out", str(out), *extra])


def test_cli_train_then_predict(tmp_path, synth_dir, tiny_encoder_dir):
    from amess import load_run

    data = tmp_path / "data"  # `auto` writes its store into the data folder: not into the shared fixture
    shutil.copytree(synth_dir, data)
    out = tmp_path / "run"
    assert _train(out, data, tiny_encoder_dir, "--feature-store", "auto") == 0
    assert (data / "amess_feature_store" / "manifest.json").is_file()
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert spec["method"] == "mult" and spec["settings"]["dst_feature_dims"] == 16
    assert spec["feature_dims"] == {"video": 256, "audio": 768}
    p = load_run(out)
    rng = np.random.default_rng(0)
    preds = p.predict(["can you help me", "thank you so much"],
                      video=[rng.standard_normal((5, 256)), None], audio=[rng.standard_normal((40, 768)), None])
    assert len(preds) == 2 and all(abs(sum(s for _, s in r.ranked) - 1) < 1e-4 for r in preds)
    assert len(p.predict(["text alone"])) == 1


def test_cli_binary_task_and_text_only_refusal(tmp_path, synth_dir, tiny_encoder_dir, caplog):
    out = tmp_path / "bin"
    assert _train(out, synth_dir, tiny_encoder_dir, "--task", "binary", "--modalities", "text,video") == 0
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert spec["label_names"] == ["Emotion", "Goal"] and spec["feature_dims"] == {"video": 256}
    caplog.clear()
    assert _train(tmp_path / "text", synth_dir, tiny_encoder_dir, "--modalities", "text") == 2
    assert "'mult' needs text and at least one of video, audio" in caplog.records[-1].getMessage()


def test_cli_mintrec2_with_every_detector_and_outlier_exposure(tmp_path, tiny_encoder_dir):
    from amess.data.synth import generate_mintrec2

    data = tmp_path / "synth2"
    generate_mintrec2(data, seed=0, size=120, video_len=(2, 10), audio_len=(4, 20))
    out = tmp_path / "run"
    assert _train(out, data, tiny_encoder_dir, "--dataset", "mintrec2", "--outlier-exposure", "--ood-detector",
                  "msp", "maxlogit", "energy", "mahalanobis", "doc") == 0
    ood = json.loads((out / "summary.json").read_text())["test"]["ood"]
    assert set(ood) == {"msp", "maxlogit", "energy", "mahalanobis", "doc"}
    assert all(0.0 <= ood[d]["f1_overall"]["mean"] <= 1.0 for d in ood)
    with np.load(out / "seed_0" / "outputs_train.npz") as z:
        assert (z["labels"] == 30).any() and z["pooled"].shape[1] == 6 * 16
