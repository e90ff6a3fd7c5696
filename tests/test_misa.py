"""MISA: its settings, shapes, masks, losses and runs through the one loop."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import numpy as np
import pytest
import torch

from amess.cli import main
from amess.config import Config, field_docs
from amess.data.batch import Collator, Sample
from amess.models import METHODS, build_model
from amess.models.misa import MisaSettings, cmd, diff_loss, reverse_grad

DV, DA = 7, 5  # feature sizes of the unit tests: nothing may assume 256 / 768


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    from amess.models.encoders import load_text_encoder

    return load_text_encoder(str(tiny_encoder_dir))


def make_model(encoder, *, video=DV, audio=DA, C=4, **settings):
    torch.manual_seed(0)
    cfg = Config().override({"model.method": "misa", **{f"misa.{k}": v for k, v in settings.items()}})
    return build_model("misa", config=cfg, encoder=encoder, num_labels=C, video_dim=video, audio_dim=audio)


def make_batch(encoder, video_lens=(3, 0, 5, 2), audio_lens=(4, 6, 1, 3), *, video=DV, audio=DA, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda n, d: rng.standard_normal((n, d)).astype(np.float32) if n else None  # noqa: E731
    samples = [Sample(id=f"s{i}", text=f"utterance number {i} " + "word " * i, label=i % 4,
                      video=f(nv, video) if video else None, audio=f(na, audio) if audio else None)
               for i, (nv, na) in enumerate(zip(video_lens, audio_lens))]
    col = Collator(encoder.tokenizer, text_max_len=16, video_dim=video or None, audio_dim=audio or None)
    return col(samples)


def test_registered_and_every_setting_shown(capsys):
    assert METHODS["misa"].Settings is MisaSettings
    assert main(["methods", "show", "misa"]) == 0
    shown = capsys.readouterr().out
    docs = field_docs(MisaSettings)
    for f in dataclasses.fields(MisaSettings):
        assert f"{f.name} = {f.default!r}" in shown and docs[f.name] in shown, f.name
    # defaults of configs/misa_bert.py (MIntRec, 20 intents)
    s = MisaSettings()
    assert (s.hidden_size, s.dropout, s.diff_weight, s.sim_weight, s.recon_weight, s.reverse_grad_weight,
            s.similarity, s.rnn_cell) == (256, 0.1, 0.7, 0.7, 0.6, 0.8, "domain", "lstm")
    with pytest.raises(ValueError, match="misa.similarity"):
        MisaSettings(similarity="mmd")
    with pytest.raises(ValueError, match="misa.hidden_size"):
        MisaSettings(hidden_size=7)


def test_forward_shapes_and_finite_parameters(encoder):
    batch = make_batch(encoder)
    for video, audio, s in ((DV, DA, 3), (DV, 0, 2), (0, DA, 2)):
        model = make_model(encoder, video=video or None, audio=audio or None, hidden_size=8).eval()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        b = make_batch(encoder, video=video, audio=audio)
        out = model(b)
        assert out.logits.shape == (4, 4) and out.pooled.shape == (4, s * 8)
        assert out.subspaces.shared.shape == (4, s, 8) and out.subspaces.domain_logits.shape == (4, s, s)
        assert out.extras == {}  # nothing per sample is saved beyond logits and pooled
    # the LSTM width follows the feature size (the reference), or rnn_hidden
    model = make_model(encoder, hidden_size=8)
    assert model.summary["video"].out_dim == 4 * DV and model.summary["audio"].out_dim == 4 * DA
    assert make_model(encoder, hidden_size=8, rnn_hidden=3).summary["audio"].out_dim == 12
    assert make_model(encoder, hidden_size=8, rnn_cell="gru")(batch).logits.shape == (4, 4)


def test_padded_frames_change_nothing_and_frameless_samples_are_finite(encoder):
    model = make_model(encoder, hidden_size=8).eval()
    batch = make_batch(encoder, video_lens=(3, 0, 5, 2))
    with torch.no_grad():
        ref = model(batch)
        padded = dataclasses.replace(batch)
        for name in ("video", "audio"):  # 7 more frames of garbage, masked out
            x, m = getattr(batch, name), getattr(batch, f"{name}_mask")
            setattr(padded, name, torch.cat([x, 1e3 * torch.randn(x.shape[0], 7, x.shape[2])], 1))
            setattr(padded, f"{name}_mask", torch.cat([m, torch.zeros(m.shape[0], 7, dtype=torch.bool)], 1))
        got = model(padded)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled, ref.pooled, atol=1e-5, rtol=1e-5)
    assert not ref.subspaces.present[1, 1] and ref.subspaces.present[:, 0].all()

    # every sample without video, one without audio either: finite outputs, loss and gradients
    model.train()
    batch = make_batch(encoder, video_lens=(0, 0, 0, 0), audio_lens=(0, 2, 3, 1))
    for similarity in ("domain", "cmd"):
        model = make_model(encoder, hidden_size=8, similarity=similarity).train()
        out = model(batch)
        loss, parts = model.loss(out, batch)
        loss.backward()
        assert torch.isfinite(out.logits).all() and math.isfinite(loss.item())
        assert all(math.isfinite(v) for v in parts.values())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # a batch without the stream at all (modality dropped at prediction time)
    no_video = dataclasses.replace(make_batch(encoder), video=None, video_mask=None)
    assert torch.isfinite(make_model(encoder, hidden_size=8).eval()(no_video).logits).all()


def test_text_alone_is_refused_clearly(encoder, tmp_path, synth_dir, tiny_encoder_dir, caplog):
    with pytest.raises(ValueError, match="method 'misa' needs text and at least one of video and audio"):
        make_model(encoder, video=None, audio=None)
    rc = main(["train", "--data-dir", str(synth_dir), "--method", "misa", "--text-encoder", str(tiny_encoder_dir),
               "--modalities", "text", "--no-progress", "--out", str(tmp_path / "run")])
    assert rc == 2 and "method 'misa' needs text and at least one of video, audio" in caplog.text


# ----- the losses --------------------------------------------------------------------------

def reference_cmd(x1, x2, n_moments):
    """methods/MISA/utils.py CMD, transcribed."""
    mx1, mx2 = torch.mean(x1, 0), torch.mean(x2, 0)
    sx1, sx2 = x1 - mx1, x2 - mx2
    scms = torch.sum((mx1 - mx2) ** 2) ** 0.5
    for i in range(n_moments - 1):
        k = i + 2
        scms = scms + torch.sum((torch.mean(sx1 ** k, 0) - torch.mean(sx2 ** k, 0)) ** 2) ** 0.5
    return scms


def reference_diff(input1, input2):
    """methods/MISA/utils.py DiffLoss, transcribed."""
    input1 = input1 - torch.mean(input1, dim=0, keepdims=True)
    input2 = input2 - torch.mean(input2, dim=0, keepdims=True)
    input1_l2 = input1.div(torch.norm(input1, p=2, dim=1, keepdim=True).detach() + 1e-6)
    input2_l2 = input2.div(torch.norm(input2, p=2, dim=1, keepdim=True).detach() + 1e-6)
    return torch.mean((input1_l2.t().mm(input2_l2)).pow(2))


def test_cmd_and_diff_match_the_reference_and_vanish_where_they_should():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 6, generator=g), torch.rand(12, 6, generator=g) ** 2
    assert cmd(x, x.clone(), 5).item() == 0.0  # identical distributions
    assert cmd(x, x[torch.randperm(16)], 5).item() == pytest.approx(0.0, abs=1e-6)  # same set, other order
    assert cmd(x, x + 1.0, 5).item() == pytest.approx(math.sqrt(6), rel=1e-5)  # only the means differ
    torch.testing.assert_close(cmd(x, y, 5), reference_cmd(x, y, 5))
    assert cmd(x, y, 1) < cmd(x, y, 5)
    xa = x.clone().requires_grad_()
    cmd(xa, x, 5).backward()  # gradient at a zero distance: 0, not NaN
    assert torch.isfinite(xa.grad).all()

    # codes whose centred columns lie in orthogonal batch directions: difference 0
    u, w = torch.tensor([1.0, -1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, -1.0])
    a, b = u[:, None] * torch.rand(1, 5, generator=g), w[:, None] * torch.rand(1, 3, generator=g)
    assert diff_loss(a, b).item() == pytest.approx(0.0, abs=1e-12)
    assert diff_loss(a, a).item() > 0.1
    p, q = torch.rand(9, 5, generator=g), torch.rand(9, 3, generator=g)
    torch.testing.assert_close(diff_loss(p, q), reference_diff(p, q))


def test_gradient_reversal():
    x = torch.ones(3, requires_grad=True)
    y = reverse_grad(x, 0.8)
    assert torch.equal(y, x)
    (2 * y).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), -1.6))


@pytest.mark.parametrize("similarity", ["domain", "cmd"])
def test_loss_parts_present_finite_and_combined_with_the_reference_weights(encoder, similarity):
    model = make_model(encoder, hidden_size=8, similarity=similarity, diff_weight=0.3, sim_weight=0.5,
                       recon_weight=0.2).train()
    batch = make_batch(encoder)
    out = model(batch)
    loss, parts = model.loss(out, batch)
    sim = f"sim_{similarity}"
    assert set(parts) == {"ce", "diff", "recon", sim}
    assert all(math.isfinite(v) for v in parts.values()) and parts["diff"] > 0 and parts[sim] > 0
    expected = parts["ce"] + 0.3 * parts["diff"] + 0.5 * parts[sim] + 0.2 * parts["recon"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # the parts are the reference's sums over the modalities that exist (video missing in row 1)
    sub = out.subspaces
    pres = sub.present
    want_diff = sum(reference_diff(sub.private[pres[:, i], i], sub.shared[pres[:, i], i]) for i in range(3))
    for i, j in ((0, 1), (0, 2), (1, 2)):
        rows = pres[:, i] & pres[:, j]
        want_diff = want_diff + reference_diff(sub.private[rows, i], sub.private[rows, j])
    assert parts["diff"] == pytest.approx(want_diff.item(), rel=1e-5)
    want_recon = sum(torch.mean((sub.recon[pres[:, i], i] - sub.utterance[pres[:, i], i]) ** 2)
                     for i in range(3)) / 3
    assert parts["recon"] == pytest.approx(want_recon.item(), rel=1e-5)
    if similarity == "cmd":
        want = sum(reference_cmd(sub.shared[pres[:, i] & pres[:, j], i], sub.shared[pres[:, i] & pres[:, j], j], 5)
                   for i, j in ((0, 1), (0, 2), (1, 2))) / 3
        assert parts[sim] == pytest.approx(want.item(), rel=1e-5)
    # out-of-scope rows (label C) stay out of the cross-entropy, not out of the subspace losses
    oos = dataclasses.replace(batch, labels=torch.full_like(batch.labels, 4))
    _, p2 = model.loss(out, oos)
    assert p2["ce"] == 0.0 and p2["diff"] == parts["diff"]

    # two modalities: one private-private pair, recon over 2, a 2-class discriminator
    model2 = make_model(encoder, audio=None, hidden_size=8, similarity=similarity).train()
    b2 = make_batch(encoder, audio=0)
    loss2, parts2 = model2.loss(model2(b2), b2)
    assert set(parts2) == {"ce", "diff", "recon", sim} and math.isfinite(loss2.item())


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(encoder):
    model = make_model(encoder, hidden_size=16).train()
    batch = make_batch(encoder, video_lens=(3, 0, 5, 2, 4, 1), audio_lens=(4, 6, 1, 3, 2, 5))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss, _ = model.loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


# ----- the one loop ------------------------------------------------------------------------

FAST = ["--set", "misa.rnn_hidden=8", "--set", "misa.hidden_size=16"]


def _train(out, data_dir, enc, *extra):
    return main(["train", "--data-dir", str(data_dir), "--method", "misa", "--text-encoder", str(enc), "--epochs", "1",
                 "--max-steps", "2", "--batch-size", "8", "--no-progress", "--set", "train.plots=false",
                 "--out", str(out), *FAST, *extra])


def test_train_then_predict_with_features(tmp_path, synth_dir, tiny_encoder_dir):
    from amess import load_run
    from amess.data.safe_pickle import safe_load

    out = tmp_path / "run"
    assert _train(out, synth_dir, tiny_encoder_dir, "--ood-detector", "msp", "mahalanobis") == 0
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert spec["method"] == "misa" and spec["settings"]["rnn_hidden"] == 8
    assert spec["feature_dims"] == {"video": 256, "audio": 768}
    with np.load(out / "seed_0" / "outputs_test.npz") as z:
        assert z["pooled"].shape[1] == 3 * 16 and np.isfinite(z["pooled"]).all()
    rows = [line.split("\t") for line in (synth_dir / "test.tsv").read_text().splitlines()[1:4]]
    ids, texts = ["_".join(r[:3]) for r in rows], [r[3] for r in rows]
    video = safe_load(synth_dir / "video_data" / "video_feats.pkl")
    audio = safe_load(synth_dir / "audio_data" / "audio_feats.pkl")
    vids = [np.concatenate(video[i], 0) if len(video[i]) else None for i in ids]
    vids[0] = None  # a sample without video
    preds = load_run(out).predict(texts, video=vids, audio=[audio[i] for i in ids])
    assert len(preds) == 3 and all(abs(sum(p for _, p in r.ranked) - 1) < 1e-4 for r in preds)
    assert set(preds[0].ood) == {"msp", "mahalanobis"}
    assert load_run(out).predict(["no features at all"])[0].ranked


def test_binary_task_text_audio_and_feature_store(tmp_path, synth_dir, tiny_encoder_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    out = tmp_path / "bin"
    assert _train(out, data, tiny_encoder_dir, "--task", "binary", "--modalities", "text,audio",
                  "--feature-store", "auto") == 0
    m = json.loads((out / "seed_0" / "metrics.json").read_text())
    assert m["label_names"] == ["Emotion", "Goal"]
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert spec["modalities"] == ["text", "audio"] and spec["features"]["audio"]["store"]


def test_mintrec2_with_ood_detectors_and_outlier_exposure(tmp_path, tiny_encoder_dir):
    from amess.data.synth import generate_mintrec2

    data = tmp_path / "mintrec2"
    generate_mintrec2(data, seed=0, size=200)
    out = tmp_path / "run"
    dets = ["msp", "maxlogit", "energy", "mahalanobis", "doc"]
    assert _train(out, data, tiny_encoder_dir, "--dataset", "mintrec2", "--ood-detector", *dets,
                  "--outlier-exposure") == 0
    m = json.loads((out / "seed_0" / "metrics.json").read_text())
    assert set(m["metrics"]["test"]["ood"]) == set(dets)
    assert all(math.isfinite(v["f1_overall"]) for v in m["metrics"]["test"]["ood"].values())


def test_custom_reader_with_its_own_feature_sizes(tmp_path, tiny_encoder_dir):
    rng = np.random.default_rng(0)
    d = tmp_path / "mine"
    d.mkdir()
    (d / "labels.txt").write_text("book\ncancel\n")
    video, audio = {}, {}
    for split, n in (("train", 12), ("dev", 4), ("test", 4)):
        lines = ["id\ttext\tlabel"]
        for i in range(n):
            sid = f"{split}{i}"
            lines.append(f"{sid}\t{'book a table' if i % 2 else 'cancel it'} please {i}\t{['book', 'cancel'][i % 2]}")
            video[sid] = rng.standard_normal((int(rng.integers(0, 5)), 6)).astype(np.float32)
            audio[sid] = rng.standard_normal((int(rng.integers(1, 9)), 10)).astype(np.float32)
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    (d / "video.pkl").write_bytes(pickle.dumps(video))
    (d / "audio.pkl").write_bytes(pickle.dumps(audio))
    out = tmp_path / "run"
    assert _train(out, d, tiny_encoder_dir, "--dataset", "custom", "--set", "misa.similarity=cmd") == 0
    assert json.loads((out / "seed_0" / "model_spec.json").read_text())["feature_dims"] == {"video": 6, "audio": 10}
