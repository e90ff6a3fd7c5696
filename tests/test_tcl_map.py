"""TCL-MAP (`amess.models.tcl_map`): template, shapes, masks, subsets, loss, and the loop on
MIntRec, its binary task, MIntRec2.0 with out-of-scope detection, and a custom dataset."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch

from amess.cli import main
from amess.config import Config, field_docs
from amess.data.batch import Collator, Sample
from amess.data.mintrec import MINTREC_LABELS
from amess.models import METHODS, build_model
from amess.models.tcl_map import TclMapSettings, TemplateHook, nt_xent

V_DIM, A_DIM = 12, 20


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory, tiny_encoder_dir):
    """A random 2-layer BERT (hidden 32) *with* a pooler, which TCL-MAP's classifier reads (the
    conftest encoder is saved without one); the packaged tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_bert_pooler")
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(d)
    return d


def _model(enc_dir, *, video=V_DIM, audio=A_DIM, labels=MINTREC_LABELS, **settings):
    from amess.models.encoders import load_text_encoder

    cfg = Config().override({"model.method": "tcl_map", **{f"tcl_map.{k}": v for k, v in settings.items()}})
    encoder = load_text_encoder(str(enc_dir), parts=METHODS["tcl_map"].encoder_parts)
    torch.manual_seed(0)
    model = build_model("tcl_map", config=cfg, encoder=encoder, num_labels=len(labels), video_dim=video,
                        audio_dim=audio, label_names=list(labels), descriptions=None)
    return model, cfg


def _collator(model, cfg, *, video=V_DIM, audio=A_DIM, text_max_len=30):
    hook = METHODS["tcl_map"].collate_hook(cfg.tcl_map, model.encoder.tokenizer, text_max_len)
    return Collator(model.encoder.tokenizer, text_max_len=text_max_len, video_dim=video, audio_dim=audio, hook=hook)


def _samples(n=4, seed=0, *, video=V_DIM, audio=A_DIM):
    rng = np.random.default_rng(seed)
    return [Sample(id=f"s{i}", text=" ".join(["so", "you", "want", "help"][: 1 + i % 4]), label=(3 * i) % 20,
                   video=rng.standard_normal((2 + 3 * i, video)).astype(np.float32) if video else None,
                   audio=rng.standard_normal((4 + 5 * i, audio)).astype(np.float32) if audio else None)
            for i in range(n)]


# --- registration and settings ---------------------------------------------------------------

def test_registered_and_every_setting_shown_with_its_docstring(capsys):
    assert "tcl_map" in METHODS and METHODS["tcl_map"].Settings is TclMapSettings
    assert main(["methods", "show", "tcl_map"]) == 0
    shown = capsys.readouterr().out
    docs = field_docs(TclMapSettings)
    assert "encoder parts: pooler" in shown
    for f in dataclasses.fields(TclMapSettings):
        assert docs.get(f.name), f.name
        assert f"{f.name} = {f.default!r}" in shown and docs[f.name] in shown
    # the reference's MIntRec config (configs/TCL_MAP_MIntRec.py, data/__init__.py)
    s = TclMapSettings()
    assert (s.prompt_len, s.label_len, s.temperature, s.nheads, s.n_levels, s.shared_dim, s.beta_shift,
            s.mag_dropout, s.embed_dropout, s.attn_dropout, s.res_dropout, s.relu_dropout, s.attn_mask) == \
        (3, 4, 0.5, 8, 5, 256, 0.006, 0.5, 0.2, 0.1, 0.1, 0.0, True)
    with pytest.raises(ValueError, match="tcl_map.temperature must be > 0"):
        Config().override({"model.method": "tcl_map", "tcl_map.temperature": 0})
    with pytest.raises(ValueError, match="tcl_map.mag_dropout"):
        TclMapSettings(mag_dropout=1.0)


# --- the template ----------------------------------------------------------------------------

def test_template_uses_the_mask_token_and_fits_a_text_at_exactly_the_max_length(enc_dir):
    model, cfg = _model(enc_dir)
    tok = model.encoder.tokenizer
    assert tok.convert_tokens_to_ids("MASK") == tok.unk_token_id  # the reference's placeholder: [UNK]
    col = _collator(model, cfg)
    exact = " ".join(["hello"] * 28)  # 28 pieces + [CLS] + [SEP] = text_max_len 30
    longer = " ".join(["hello"] * 40)
    samples = [Sample(id="a", text="can you help", label=19), Sample(id="b", text=exact, label=0),
               Sample(id="c", text=longer, label=1)]
    for s in samples:
        s.video, s.audio = np.ones((3, V_DIM), np.float32), np.ones((5, A_DIM), np.float32)
    batch = col(samples)
    ids, am, pos = batch.extras["tcl_input_ids"], batch.extras["tcl_attention_mask"], batch.extras["tcl_mask_pos"]
    assert batch.input_ids.shape[1] == 30 and ids.shape[1] == 30 + 3 + 4  # the explicit budget
    assert not (ids == tok.unk_token_id).any()
    toks = tok.convert_ids_to_tokens(ids[0].tolist())
    assert toks[:4] == ["[CLS]", "can", "you", "help"] and toks[4:11] == ["[MASK]"] * 7 and toks[11] == "[SEP]"
    assert int(pos[0]) == 4 + 3 and am[0].sum() == 12 and toks[12] == "[PAD]"
    assert int(pos[1]) == 29 + 3 and am[1].sum() == 37 and ids[1, -1] == tok.sep_token_id
    assert ids[1, 1:29].tolist() == tok.convert_tokens_to_ids(["hello"] * 28)  # nothing of the text lost
    assert torch.equal(ids[2], ids[1])  # the longer text is truncated to the same budget first
    model.train()
    out = model(batch)  # the full-length template runs (and trains)
    assert torch.isfinite(model.loss(out, batch)[0])
    # the augmented view writes the label's pieces, padded with the mask token, never [UNK]
    words = model.label_tokens
    assert tok.convert_ids_to_tokens(words[MINTREC_LABELS.index("Ask for help")].tolist()) == \
        ["ask", "for", "help", "[MASK]"]
    assert not (words == tok.unk_token_id).any()


def test_template_with_a_context_segment():
    from transformers import AutoTokenizer

    from amess.models.encoders import resolve_encoder_path

    tok = AutoTokenizer.from_pretrained(resolve_encoder_path("packaged:minilm"))
    hook = TemplateHook(prompt_len=2, label_len=3, mask_id=tok.mask_token_id, pad_id=tok.pad_token_id)
    col = Collator(tok, text_max_len=20, video_dim=None, audio_dim=None, hook=hook)
    batch = col([Sample(id="a", text="thanks", label=0, context="here you go"),
                 Sample(id="b", text="ok", label=0, context="bye")])
    toks = tok.convert_ids_to_tokens(batch.extras["tcl_input_ids"][0].tolist())
    assert toks == ["[CLS]", "thanks", "[SEP]", "here", "you", "go"] + ["[MASK]"] * 5 + ["[SEP]"]
    assert batch.extras["tcl_token_type_ids"][0].tolist() == [0, 0, 0] + [1] * 9
    assert int(batch.extras["tcl_mask_pos"][0]) == 8


# --- forward, masks, subsets -----------------------------------------------------------------

def test_forward_shapes_and_initialisation(enc_dir):
    model, cfg = _model(enc_dir)
    batch = _collator(model, cfg)(_samples())
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert out.logits.shape == (4, 20) and out.pooled.shape == (4, 32)
    assert set(out.extras) == {"mask_repr"} and out.extras["mask_repr"].shape == (4, 32)  # no augmented view at eval
    model.train()
    out = model(batch)
    assert out.extras["label_repr"].shape == (4, 32)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the reference's init: prompt scale 1e-4, new LayerNorms (1, 0), new Linear N(0, 0.02), zero biases
    assert torch.all(model.prompt.gamma == 1e-4)
    assert torch.all(model.mag.norm.weight == 1) and torch.all(model.mag.norm.bias == 0)
    assert abs(float(model.mag.shift["video"].weight.detach().std()) - 0.02) < 0.005 and not model.classifier.bias.any()
    # the augmented view has its own copy of the encoder (model.py Cons_Model), in the encoder's LR group
    assert model.cons_encoder is not None and model.cons_encoder.pooler is None
    assert torch.equal(model.cons_encoder.model.embeddings.word_embeddings.weight,
                       model.encoder.model.embeddings.word_embeddings.weight)
    groups = model.param_groups(1e-3, 0.01, encoder_lr=1e-5)
    cons = {id(p) for p in model.cons_encoder.parameters()}
    assert all(g["lr"] == 1e-5 for g in groups if any(id(p) in cons for p in g["params"]))


def test_padding_frames_change_nothing_and_zero_frames_stay_finite(enc_dir):
    model, cfg = _model(enc_dir)
    col = _collator(model, cfg)
    model.eval()
    s = _samples(4)
    alone = col([s[1]])
    with_longer = col([s[1], dataclasses.replace(s[3], text=s[1].text)])  # s[1]'s frames padded
    assert with_longer.video.shape[1] > alone.video.shape[1]
    with torch.no_grad():
        a, b = model(alone), model(with_longer)
        with_longer.video[0, ~with_longer.video_mask[0]] = 1e3  # garbage in the padded frames
        with_longer.audio[0, ~with_longer.audio_mask[0]] = -1e3
        c = model(with_longer)
    for x in (b, c):
        torch.testing.assert_close(x.logits[:1], a.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.pooled[:1], a.pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.extras["mask_repr"][:1], a.extras["mask_repr"], atol=1e-5, rtol=1e-5)
    # zero frames of both streams (no speaker, empty audio), and a batch without audio at all
    empty = [dataclasses.replace(s[0], video=None, audio=np.zeros((0, A_DIM), np.float32)), s[2]]
    model.train()
    batch = col(empty)
    assert not batch.video_mask[0].any() and not batch.audio_mask[0].any()
    out = model(batch)
    loss, _ = model.loss(out, batch)
    loss.backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    no_audio = _collator(model, cfg, audio=None)(_samples(2, audio=None))
    with torch.no_grad():
        assert torch.isfinite(model(no_audio).logits).all()


@pytest.mark.parametrize("video,audio,shared", [(V_DIM, None, False), (None, A_DIM, True)])
def test_text_and_one_stream(enc_dir, video, audio, shared):
    model, cfg = _model(enc_dir, video=video, audio=audio, shared_cons_encoder=shared)
    assert list(model.stream_dims) == (["video"] if video else ["audio"])
    assert (model.cons_encoder is None) == shared  # shared: both views through the one encoder
    batch = _collator(model, cfg, video=video, audio=audio)(_samples(3, video=video, audio=audio))
    model.train()
    loss, parts = model.loss(model(batch), batch)
    assert torch.isfinite(loss) and set(parts) == {"ce", "tcl"}


def test_text_alone_and_too_long_labels_are_clear_errors(enc_dir, tmp_path, synth_dir, caplog):
    with pytest.raises(ValueError, match="tcl_map needs video or audio features"):
        _model(enc_dir, video=None, audio=None)
    rc = main(["train", "--data-dir", str(synth_dir), "--method", "tcl_map", "--text-encoder", str(enc_dir),
               "--modalities", "text", "--no-progress", "--out", str(tmp_path / "r")])
    assert rc == 2 and "'tcl_map' needs text and at least one of video, audio" in caplog.text
    labels = ["book", "request technical support urgently please"]
    with pytest.raises(ValueError, match=r"more word pieces than tcl_map.label_len=4.*label_len=5"):
        _model(enc_dir, labels=labels)
    model, _ = _model(enc_dir, labels=labels, label_len=5)
    assert model.label_tokens.shape == (2, 5)
    with pytest.raises(ValueError, match="nheads=3 must divide"):
        _model(enc_dir, nheads=3)


# --- the loss --------------------------------------------------------------------------------

def _reference_supcon(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """loss.py `SupConLoss.forward` without labels (mask = eye), contrast_mode 'all', transcribed."""
    features = torch.nn.functional.normalize(features, dim=2)
    bsz = features.shape[0]
    mask = torch.eye(bsz)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values
    mask = mask.repeat(2, 2)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(bsz * 2).view(-1, 1), 0)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    return -((mask * log_prob).sum(1) / mask.sum(1)).view(2, bsz).mean()


def test_nt_xent_is_the_reference_supcon_without_labels():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    ref = _reference_supcon(torch.stack([a, b], dim=1), 0.5)
    torch.testing.assert_close(nt_xent(a, b, 0.5), ref)
    assert float(nt_xent(a[:1], b[:1], 0.5)) == pytest.approx(0.0, abs=1e-6)  # one pair: nothing to contrast


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(enc_dir):
    model, cfg = _model(enc_dir, embed_dropout=0.0, attn_dropout=0.0, res_dropout=0.0)
    for m in model.modules():  # MAG's 0.5 and BERT's 0.1 as well: the loss of a fixed batch, not of noise
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = _collator(model, cfg)(_samples(6))
    oos = dataclasses.replace(_samples(1, seed=3)[0], id="oos", label=20)  # out-of-scope: no label words
    batch_oos = _collator(model, cfg)(_samples(6) + [oos])
    model.train()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.param_groups(3e-3, 0.0, 3e-3))
    losses = []
    for _ in range(8):
        loss, parts = model.loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0] and parts["tcl"] < losses[0] - parts["ce"], losses
    out = model(batch_oos)
    assert not out.extras["label_repr"][-1].any()  # no augmented view for the out-of-scope row
    assert torch.isfinite(model.loss(out, batch_oos)[0])


# --- the loop ---------------------------------------------------------------------------------

def _train(out, data_dir, enc, *extra):
    return main(["train", "--data-dir", str(data_dir), "--method", "tcl_map", "--text-encoder", str(enc),
                 "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--no-progress", "--set",
                 "train.plots=false", "--out", str(out), *extra])


def test_cli_run_and_load_run_predict(tmp_path, synth_dir, enc_dir):
    from amess import load_run
    from amess.data.safe_pickle import safe_load

    out = tmp_path / "run"
    assert _train(out, synth_dir, enc_dir, "--ood-detector", "msp", "mahalanobis") == 0
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert spec["method"] == "tcl_map" and spec["settings"]["label_len"] == 4
    assert spec["encoder"]["parts"] == ["pooler"] and spec["feature_dims"] == {"video": 256, "audio": 768}
    assert np.array(spec["ood"]["mahalanobis"]["fitted"]["means_"]).shape[1] == 32  # pooled: the pooler's output
    rows = [ln.split("\t") for ln in (synth_dir / "test.tsv").read_text().splitlines()[1:4]]
    ids, texts = ["_".join(r[:3]) for r in rows], [r[3] for r in rows]
    video = safe_load(synth_dir / "video_data" / "video_feats.pkl")
    audio = safe_load(synth_dir / "audio_data" / "audio_feats.pkl")
    vids = [np.asarray(video[i]).reshape(len(video[i]), -1) if len(video[i]) else None for i in ids]
    p = load_run(out)
    preds = p.predict(texts, video=vids, audio=[audio[i] for i in ids])
    assert len(preds) == 3 and preds[0].label in MINTREC_LABELS and set(preds[0].ood) == {"msp", "mahalanobis"}
    assert sum(pr for _, pr in preds[0].ranked) == pytest.approx(1.0, abs=1e-4)
    with np.load(out / "seed_0" / "outputs_test.npz") as z:
        row = [str(i) for i in z["ids"]].index(ids[0])
        np.testing.assert_allclose([dict(preds[0].ranked)[n] for n in p.label_names], z["scores"][row], atol=2e-3)
        assert z["extra_mask_repr"].shape[1] == 32
    assert p.predict(["text only, no frames"])[0].label in MINTREC_LABELS


def test_binary_task_from_the_feature_store(tmp_path, synth_dir, enc_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    out = tmp_path / "run"
    assert _train(out, data, enc_dir, "--task", "binary", "--feature-store", "auto") == 0
    m = json.loads((out / "seed_0" / "metrics.json").read_text())
    assert m["label_names"] == ["Emotion", "Goal"] and (data / "amess_feature_store").is_dir()
    assert m["train_samples_per_second"] > 0


def test_mintrec2_with_ood_detectors_and_outlier_exposure(tmp_path_factory, tmp_path, enc_dir):
    from amess.data.synth import generate_mintrec2

    data = tmp_path_factory.mktemp("synth2")
    generate_mintrec2(data, seed=0, size=150)
    out = tmp_path / "run"
    dets = ["msp", "maxlogit", "energy", "mahalanobis", "doc"]
    assert _train(out, data, enc_dir, "--dataset", "mintrec2", "--outlier-exposure", "--ood-detector", *dets,
                  "--set", "data.video_max_len=24", "--set", "data.audio_max_len=48") == 0
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert len(spec["label_names"]) == 30 and spec["text_max_len"] == 50
    ood = json.loads((out / "summary.json").read_text())["test"]["ood"]
    assert set(ood) == set(dets) and all(0 <= ood[d]["f1_overall"]["mean"] <= 1 for d in dets)
    with np.load(out / "seed_0" / "outputs_train.npz") as z:
        assert (z["labels"] == 30).any()  # out-of-scope rows trained through outlier exposure


def test_custom_labels_with_several_word_pieces(tmp_path, enc_dir):
    data = tmp_path / "mine"
    data.mkdir()
    labels = ["book a table", "cancel", "weather forecast"]
    (data / "labels.txt").write_text("\n".join(labels) + "\n")
    rng = np.random.default_rng(0)
    video, audio = {}, {}
    for split, n in (("train", 12), ("dev", 6), ("test", 6)):
        rows = []
        for i in range(n):
            sid = f"{split}{i}"
            rows.append(f"{sid}\tplease do it number {i}\t{labels[i % 3] if i % 5 else 'UNK'}\n")
            video[sid] = rng.standard_normal((1 + i % 4, 7)).astype(np.float32)
            audio[sid] = rng.standard_normal((3 + i, 9)).astype(np.float32)
        (data / f"{split}.tsv").write_text("id\ttext\tlabel\n" + "".join(rows))
    for name, feats in (("video.pkl", video), ("audio.pkl", audio)):
        with open(data / name, "wb") as f:
            pickle.dump(feats, f)
    out = tmp_path / "run"
    assert _train(out, data, enc_dir, "--dataset", "custom", "--ood-detector", "msp") == 0
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert spec["label_names"] == labels and spec["feature_dims"] == {"video": 7, "audio": 9}
