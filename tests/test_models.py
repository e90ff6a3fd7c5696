"""Methods on a tiny random BERT and hand-built batches: shapes, masks, gradients, losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, BertTokenizer

from amess.config import Config, ModelConfig
from amess.models.amess import AmessSettings as AmessConfig
from amess.data.batch import Batch
from amess.losses import (description_ce, description_to_rows, margin_triplet, supervised_infonce,
                          symmetric_infonce, triplet_contrastive)
from amess.models import METHODS, build_model
from amess.models.encoders import TextEncoder

PAD, CLS, SEP = 0, 1, 2
SPECIAL = {0, 1, 2, 3, 4}
VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + [f"w{i}" for i in range(5, 100)]
C = 3
DESCRIPTIONS = ["w10 w11 w12", "w20 w21", "w30 w31 w32 w33 w34"]
LABELS = ["greet", "thank", "complain"]
DV, DA = 6, 5
MODALITY_SETS = {"text": (False, False), "text+video": (True, False), "text+audio": (False, True),
                 "all": (True, True)}


def tiny_encoder(seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    return TextEncoder(BertModel(cfg, add_pooling_layer=False), tok, "tiny-bert")


def make_config(**amess) -> Config:
    return Config(model=ModelConfig(dropout=0.0), methods={"amess": AmessConfig(**amess)})


def make_model(method: str = "amess", *, video: bool = True, audio: bool = True, descriptions=True,
               seed: int = 0, **amess):
    encoder = tiny_encoder(seed)
    torch.manual_seed(seed + 1)
    return build_model(method, config=make_config(**amess), encoder=encoder, num_labels=C,
                       video_dim=DV if video else None, audio_dim=DA if audio else None,
                       label_names=LABELS, descriptions=(DESCRIPTIONS if descriptions is True
                                                         else descriptions or None))


def make_batch(*, lengths=(10, 7, 5, 3), labels=None, video: bool = True, audio: bool = True,
               video_lengths=None, audio_lengths=None, seed: int = 0) -> Batch:
    """[CLS]=1 at 0, [SEP]=2 at the last real position, padding 0 with attention 0."""
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), max(lengths)
    ids = torch.zeros(b, n, dtype=torch.long)
    att = torch.zeros(b, n, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, 0] = CLS
        ids[i, 1:length - 1] = torch.randint(5, 100, (length - 2,), generator=g)
        ids[i, length - 1] = SEP
        att[i, :length] = 1
    labels = torch.tensor(labels if labels is not None else [i % C for i in range(b)])
    batch = Batch(ids=[f"s{i}" for i in range(b)], input_ids=ids, attention_mask=att, labels=labels,
                  token_type_ids=torch.zeros_like(ids))

    def stream(dim, frame_lengths, default_m):
        frame_lengths = list(frame_lengths or [default_m - i % 3 for i in range(b)])
        m = max(1, max(frame_lengths))
        x = torch.randn(b, m, dim, generator=g)
        mask = torch.arange(m)[None, :] < torch.tensor(frame_lengths)[:, None]
        return x * mask[..., None], mask

    if video:
        batch.video, batch.video_mask = stream(DV, video_lengths, 7)
    if audio:
        batch.audio, batch.audio_mask = stream(DA, audio_lengths, 9)
    return batch


def rows(batch: Batch, keep: list[int]) -> Batch:
    """The sub-batch of the given rows (same padding width)."""
    sel = torch.tensor(keep)
    pick = lambda t: None if t is None else t[sel]  # noqa: E731
    return Batch(ids=[batch.ids[i] for i in keep], input_ids=pick(batch.input_ids),
                 attention_mask=pick(batch.attention_mask), labels=pick(batch.labels),
                 token_type_ids=pick(batch.token_type_ids), video=pick(batch.video),
                 video_mask=pick(batch.video_mask), audio=pick(batch.audio), audio_mask=pick(batch.audio_mask))


def text_pooled(model, batch: Batch) -> torch.Tensor:
    hidden = model.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return model.encoder.pool(hidden, batch.attention_mask, "cls")


# ----- registry and the text baseline ---------------------------------------------------

def test_registry_and_unknown_method():
    assert {"text", "amess"} <= set(METHODS)
    with pytest.raises(ValueError, match="known methods: .*amess.*text"):
        build_model("nope")


def test_text_baseline_ignores_nonverbal():
    model = make_model("text").eval()
    batch = make_batch()
    out = model(batch)
    assert out.logits.shape == (4, C) and out.pooled.shape == (4, 32)
    assert torch.allclose(out.logits, model(make_batch(video=False, audio=False)).logits)
    assert torch.allclose(model.predict_scores(out), out.logits.softmax(-1))
    loss, parts = model.loss(out, batch)
    assert torch.isfinite(loss) and "ce" in parts


# ----- A-ME: shapes, anchors, masks ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["topk", "learned", "all", "none"])
@pytest.mark.parametrize("mods", list(MODALITY_SETS))
def test_shapes_every_mode_and_modality_subset(mode, mods):
    video, audio = MODALITY_SETS[mods]
    model = make_model(video=video, audio=audio, anchor_mode=mode, num_anchors=3)
    batch = make_batch(video=video, audio=audio)
    out = model(batch)
    b, n = batch.input_ids.shape
    assert out.logits.shape == (b, C) and out.pooled.shape == (b, 32)
    width = n if mode == "all" else 3
    assert out.extras["anchor_index"].shape == (b, width)
    assert out.extras["anchor_index"].dtype == torch.long
    assert out.extras["z_m"].shape == (b, 128)
    # the text view exists only when non-verbal input reaches the encoder
    assert ("z_t" in out.extras) == (model.training and (mode == "learned" or (mode != "none" and (video or audio))))
    if "z_t" in out.extras:
        assert out.extras["z_t"].shape == (b, 128)
    assert out.extras["desc_sims"].shape == (b, C) and out.shared["desc_emb"].shape == (C, 128)
    fused = mode != "none" and (video or audio)
    assert ("gate" in out.extras) == fused
    if mode == "learned":
        assert torch.equal(out.extras["anchor_index"], torch.tensor([[1, 2, 3]] * b))
    elif not fused:
        assert (out.extras["anchor_index"] == -1).all()
    loss, _ = model.loss(out, batch)
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in out.extras.values())


@pytest.mark.parametrize("mode", ["topk", "all"])
def test_anchors_are_real_word_tokens_only(mode):
    # Rows with 8, 3 (one word) and 2 (no word) real tokens; k = 6 exceeds most rows' words.
    model = make_model(anchor_mode=mode, num_anchors=6).eval()
    batch = make_batch(lengths=(8, 3, 2), labels=[0, 1, 2])
    idx = model(batch).extras["anchor_index"]
    for i in range(3):
        chosen = idx[i][idx[i] >= 0]
        assert len(set(chosen.tolist())) == len(chosen)
        assert bool(batch.attention_mask[i, chosen].all())
        assert not set(batch.input_ids[i, chosen].tolist()) & SPECIAL
    assert [(idx[i] >= 0).sum().item() for i in range(3)] == [6, 1, 0]


def test_row_without_word_tokens_equals_text_model():
    # No candidate anchor, hence no fusion: the row's representation is the text model's.
    model = make_model(anchor_mode="topk").eval()
    batch = make_batch(lengths=(6, 2), labels=[0, 1])
    with torch.no_grad():
        pooled = model(batch).pooled
        assert torch.allclose(pooled[1], text_pooled(model, batch)[1], atol=1e-5)


def test_fusion_writes_only_at_valid_anchors():
    model = make_model(anchor_mode="topk", num_anchors=3).eval()
    batch = make_batch(lengths=(8, 3), labels=[0, 1])
    e = model.encoder.embed(batch.input_ids)
    streams = model._streams(batch)
    idx, valid = model._topk(e, model._candidates(batch.input_ids, batch.attention_mask), streams)
    fused, _ = model._fuse_in_place(e, idx, valid, streams)
    changed = (fused - e).abs().sum(-1) > 0  # (b, n)
    expected = torch.zeros_like(changed)
    for i in range(2):
        expected[i, idx[i][valid[i]]] = True
    assert torch.equal(changed, expected) and valid.sum().item() == 4


@pytest.mark.parametrize("mode", ["topk", "learned"])
def test_padding_does_not_change_a_row(mode):
    # Masks, not padding width, decide the result (mean pooling reads the lengthened mask).
    encoder = tiny_encoder()
    torch.manual_seed(1)
    cfg = Config(model=ModelConfig(dropout=0.0, pooling="mean"), methods={"amess": AmessConfig(anchor_mode=mode)})
    model = build_model("amess", config=cfg, encoder=encoder, num_labels=C, video_dim=DV, audio_dim=DA,
                        label_names=LABELS, descriptions=DESCRIPTIONS).eval()
    batch = make_batch(lengths=(10, 5), labels=[0, 1], video_lengths=[7, 3], audio_lengths=[9, 4])
    alone = rows(batch, [1])
    alone.input_ids, alone.attention_mask = alone.input_ids[:, :5], alone.attention_mask[:, :5]
    alone.token_type_ids = alone.token_type_ids[:, :5]
    alone.video, alone.video_mask = alone.video[:, :3], alone.video_mask[:, :3]
    alone.audio, alone.audio_mask = alone.audio[:, :4], alone.audio_mask[:, :4]
    with torch.no_grad():
        assert torch.allclose(model(batch).logits[1], model(alone).logits[0], atol=1e-5)


@pytest.mark.parametrize("mode", ["topk", "learned", "all"])
def test_no_frames_is_finite(mode):
    model = make_model(anchor_mode=mode)
    batch = make_batch(video_lengths=[7, 0, 3, 0], audio_lengths=[0, 0, 9, 0])
    for training in (True, False):  # eval without grad takes PyTorch's fused attention path
        model.train(training)
        with torch.set_grad_enabled(training):
            out = model(batch)
            loss, _ = model.loss(out, batch)
        assert torch.isfinite(out.logits).all() and torch.isfinite(loss)
    model.train()
    model.loss(model(batch), batch)[0].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_dropped_modality_equals_empty_stream():
    # A model built with video, given a batch without it, treats it as zero frames.
    model = make_model(video=True, audio=True).eval()
    full, dropped = make_batch(), make_batch()
    full.video_mask = torch.zeros_like(full.video_mask)
    dropped.video = dropped.video_mask = None
    with torch.no_grad():
        assert torch.allclose(model(full).logits, model(dropped).logits, atol=1e-6)


@pytest.mark.parametrize("mode", ["topk", "learned", "all"])
def test_gradient_reaches_nonverbal_and_fusion(mode):
    model = make_model(anchor_mode=mode)
    batch = make_batch()
    model.loss(model(batch), batch)[0].backward()
    names = [(n, p) for n, p in model.named_parameters() if n.startswith(("nonverbal.", "fusion.", "anchor_"))]
    assert any(n.startswith("nonverbal.video") for n, _ in names) and any(n.startswith("fusion.") for n, _ in names)
    for n, p in names:
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_init_stays_close_to_text_model():
    # A-ME 4: small gate and small W, so training starts from the text model's behaviour.
    batch = make_batch()
    with torch.no_grad():
        none = make_model(anchor_mode="none").eval()
        assert torch.allclose(none(batch).pooled, text_pooled(none, batch), atol=1e-5)
        model = make_model(anchor_mode="topk").eval()
        fused, text = model(batch).pooled, text_pooled(model, batch)
    rel = (fused - text).norm(dim=-1) / text.norm(dim=-1)
    assert float(rel.max()) < 0.02
    assert not torch.allclose(fused, text)  # ... yet the streams do reach the representation


@pytest.mark.parametrize("mode", ["topk", "learned", "all", "none"])
@pytest.mark.parametrize("desc", ["shared", "frozen", "momentum"])
def test_parameters_finite_after_construction(mode, desc):
    model = make_model(anchor_mode=mode, desc_encoder=desc)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point():
            assert torch.isfinite(p).all(), name


# ----- SS: loss functions by hand ---------------------------------------------------------

def test_description_ce_by_hand():
    e = torch.eye(3)
    labels = torch.tensor([0, 2])
    aligned = description_ce(e[labels], e, labels, 0.5)
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert aligned.item() == pytest.approx(expected, rel=1e-6)
    wrong = description_ce(e[torch.tensor([1, 0])], e, labels, 0.5)
    random = description_ce(F.normalize(torch.randn(2, 3), dim=-1), e, labels, 0.5)
    assert aligned < random and aligned < wrong


def test_description_to_rows_by_hand():
    e = torch.eye(3)
    labels = torch.tensor([0, 0, 2])
    # label 0 scores the rows [2, 2, 0] (tau 0.5), both its rows are positives; label 2 scores [0, 0, 2]
    expected = 0.5 * (-math.log(math.exp(2) / (2 * math.exp(2) + 1)) - math.log(math.exp(2) / (math.exp(2) + 2)))
    assert description_to_rows(e[labels], e, labels, 0.5).item() == pytest.approx(expected, rel=1e-6)
    # the direction differs from description_ce: a row far from its description but farther from the
    # others' rows is still picked out by it
    z, y = F.normalize(torch.randn(6, 3), dim=-1), torch.tensor([0, 1, 2, 0, 1, 1])
    assert description_to_rows(z, e, y, 0.2).item() != pytest.approx(description_ce(z, e, y, 0.2).item())
    z_m, z_t = F.normalize(torch.randn(6, 3), dim=-1), F.normalize(torch.randn(6, 3), dim=-1)
    both = [0.5 * (description_ce(v, e, y, 0.2) + description_to_rows(v, e, y, 0.2)) for v in (z_m, z_t)]
    assert triplet_contrastive(z_m, z_t, e, y, 0.2, symmetric=True).item() == pytest.approx(
        (sum(both) + symmetric_infonce(z_m, z_t, 0.2)).item() / 3, rel=1e-6)
    assert triplet_contrastive(z_m, None, e, y, 0.2, text_view=False, symmetric=True).item() == pytest.approx(
        both[0].item(), rel=1e-6)


def test_ss_symmetric_switch_reaches_the_loss():
    batch = make_batch(video=False, audio=False)
    torch.manual_seed(0)
    plain = make_model(video=False, audio=False).train()
    torch.manual_seed(0)
    sym = make_model(video=False, audio=False, ss_symmetric=True).train()
    sym.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    _, a = plain.loss(plain(batch), batch)
    torch.manual_seed(1)
    _, b = sym.loss(sym(batch), batch)
    assert a["ce"] == pytest.approx(b["ce"]) and a["ss"] != pytest.approx(b["ss"])
    with pytest.raises(ValueError, match="ss_symmetric"):
        AmessConfig(ss_symmetric=True, ss_loss="margin")


def test_shared_projection_is_one_map(tmp_path):
    torch.manual_seed(0)
    model = make_model(video=False, audio=False, shared_projection=True)
    assert model.proj_desc is model.proj_utt
    two = make_model(video=False, audio=False)
    assert sum(p.numel() for p in two.parameters()) - sum(p.numel() for p in model.parameters()) == (
        two.proj_desc.weight.numel() + two.proj_desc.bias.numel())
    batch = make_batch(video=False, audio=False)
    model.train()
    loss, _ = model.loss(model(batch), batch)
    loss.backward()
    assert model.proj_utt.weight.grad is not None
    # a saved state reloads into a fresh model with the map still shared
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = make_model(video=False, audio=False, shared_projection=True)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert fresh.proj_desc is fresh.proj_utt and torch.equal(fresh.proj_utt.weight, model.proj_utt.weight)
    # a state saved with two maps never collapses into one: the model takes two, as trained
    two.eval()
    shared = make_model(video=False, audio=False, shared_projection=True).eval()
    shared.load_state_dict(two.state_dict())
    assert shared.proj_desc is not shared.proj_utt and not shared.cfg.shared_projection
    assert torch.equal(shared.proj_desc.weight, two.proj_desc.weight)
    with torch.no_grad():
        assert torch.allclose(shared(batch).extras["desc_sims"], two(batch).extras["desc_sims"])


def test_symmetric_infonce_by_hand():
    a, b = F.normalize(torch.randn(5, 4), dim=-1), F.normalize(torch.randn(5, 4), dim=-1)
    assert symmetric_infonce(a, b, 0.1).item() == pytest.approx(symmetric_infonce(b, a, 0.1).item(), rel=1e-6)
    eye = torch.eye(2)
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert symmetric_infonce(eye, eye, 0.5).item() == pytest.approx(expected, rel=1e-5)
    assert symmetric_infonce(a, a, 0.1) < symmetric_infonce(a, b, 0.1)


def test_triplet_contrastive_is_mean_of_terms():
    z_m, z_t = F.normalize(torch.randn(4, 3), dim=-1), F.normalize(torch.randn(4, 3), dim=-1)
    e, y = F.normalize(torch.randn(C, 3), dim=-1), torch.tensor([0, 1, 2, 0])
    terms = [description_ce(z_m, e, y, 0.2), description_ce(z_t, e, y, 0.2), symmetric_infonce(z_m, z_t, 0.2)]
    assert triplet_contrastive(z_m, z_t, e, y, 0.2).item() == pytest.approx(sum(terms).item() / 3, rel=1e-6)
    assert triplet_contrastive(z_m, None, e, y, 0.2, text_view=False).item() == pytest.approx(terms[0].item())
    with pytest.raises(ValueError, match="z_t"):
        triplet_contrastive(z_m, None, e, y, 0.2)


def test_margin_triplet_by_hand():
    e = torch.eye(3)
    y = torch.tensor([0, 1])
    assert margin_triplet(e[y], e, y, 0.2).item() == 0.0  # cos 1 vs 0: margin satisfied
    z = F.normalize(torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]), dim=-1)  # tied with a negative
    assert margin_triplet(z, e, y, 0.2).item() == pytest.approx(0.2, abs=1e-6)
    z_bad = e[torch.tensor([1, 0])]  # closer to the wrong description: 0.2 - 0 + 1
    assert margin_triplet(z_bad, e, y, 0.2).item() == pytest.approx(1.2, abs=1e-6)


# ----- SS in the model --------------------------------------------------------------------

@pytest.mark.parametrize("ss", ["triplet", "margin", "none"])
def test_oos_rows_are_excluded(ss):
    model = make_model(ss_loss=ss)  # training mode; dropout is 0, so rows are deterministic
    batch = make_batch(lengths=(10, 7, 5, 3, 6), labels=[0, C, 1, C, 2])
    loss, _ = model.loss(model(batch), batch)
    sub = rows(batch, [0, 2, 4])
    loss_sub, _ = model.loss(model(sub), sub)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(loss_sub.item(), rel=1e-5, abs=1e-6)
    oos = rows(batch, [1, 3])
    zero, _ = model.loss(model(oos), oos)
    zero.backward()
    assert zero.item() == 0.0


def test_frozen_descriptions_get_no_gradient_shared_do():
    frozen = make_model(desc_encoder="frozen")
    assert not frozen.desc_cache.requires_grad
    before = frozen.desc_cache.clone()
    frozen.describe().sum().backward()
    assert frozen.proj_desc.weight.grad is not None
    assert all(p.grad is None for p in frozen.encoder.parameters())
    with torch.no_grad():  # the cache is the pretrained encoder's, and stays so as it trains
        for p in frozen.encoder.parameters():
            p.add_(0.1)
    frozen.describe()
    assert torch.equal(frozen.desc_cache, before)
    assert "desc_cache" in frozen.state_dict()  # saved: a reloaded run scores with the cache it trained with

    shared = make_model(desc_encoder="shared")
    assert not hasattr(shared, "desc_cache")
    shared.describe().sum().backward()
    emb = shared.encoder.model.get_input_embeddings().weight.grad
    assert emb is not None and emb[10].abs().sum() > 0  # "w10", a description token


@pytest.mark.parametrize("inference", ["head", "similarity", "both"])
def test_predict_scores_are_probabilities(inference):
    model = make_model(inference=inference).eval()
    with torch.no_grad():
        scores = model.predict_scores(model(make_batch()))
    assert scores.shape == (4, C) and (scores >= 0).all()
    assert torch.allclose(scores.sum(-1), torch.ones(4), atol=1e-6)


def test_auto_inference_is_both_with_an_ss_loss_and_head_without():
    batch = make_batch()
    model = make_model()
    model.eval()
    out = model(batch)
    head = out.logits.softmax(-1)
    sim = (out.extras["desc_sims"] * model.logit_scale()).softmax(-1)
    assert model.cfg.inference == "auto" and model.cfg.inference_mode == "both"
    assert torch.allclose(model.predict_scores(out), 0.5 * (head + sim), atol=1e-6)
    logits = model.decision_logits(out)
    assert torch.allclose(logits.softmax(-1), 0.5 * (head + sim), atol=1e-5)
    # the energy detector reads logsumexp(decision_logits): the mean of the two views' energies,
    # not the constant 0 that the plain log of the averaged probabilities gives every row
    energy = 0.5 * (out.logits.logsumexp(-1) + (out.extras["desc_sims"] * model.logit_scale()).logsumexp(-1))
    assert torch.allclose(logits.logsumexp(-1), energy, atol=1e-4) and energy.std() > 1e-3
    assert not torch.allclose(head, sim, atol=1e-3)  # the two halves differ, so the mix is tested
    # both_weight moves the mix from the head (0) to the similarities (1), scores and logits alike
    for w in (0.0, 0.3, 1.0):
        model.cfg.both_weight = w
        mix = (1 - w) * head + w * sim
        assert torch.allclose(model.predict_scores(out), mix, atol=1e-6)
        assert torch.allclose(model.decision_logits(out).softmax(-1), mix, atol=1e-5), w
    assert torch.allclose(model.decision_logits(out), out.extras["desc_sims"] * model.logit_scale())  # w = 1
    model.cfg.both_weight = 0.0
    assert torch.equal(model.decision_logits(out), out.logits)
    model.cfg.both_weight = 0.5
    with pytest.raises(ValueError, match="both_weight"):
        make_config(both_weight=1.5)
    off = make_model(ss_loss="none").eval()
    out = off(batch)
    assert off.cfg.inference_mode == "head" and torch.equal(off.decision_logits(out), out.logits)
    with pytest.raises(ValueError, match="inference='both'"):
        make_config(ss_loss="none", inference="both")


def test_switches_change_what_is_computed():
    batch = make_batch()
    assert "z_t" not in make_model(text_view=False)(batch).extras
    model = make_model(ss_loss="none")
    assert model.proj_utt is None and "desc_sims" not in model(batch).extras  # training: unused
    assert model.eval()(batch).extras["desc_sims"].shape == (4, C)  # evaluation: for OOD detectors
    fixed = make_model(learn_tau=False, tau=0.07)
    assert fixed.logit_scale().item() == pytest.approx(1 / 0.07) and not fixed.log_scale.requires_grad
    assert fixed.cfg == make_model().cfg  # the default since 2026-12-07: a fixed tau of 0.07
    assert make_model(learn_tau=False, tau=0.05).logit_scale().item() == pytest.approx(20.0)
    learned = make_model(learn_tau=True, tau=0.1)
    assert learned.log_scale.requires_grad and not make_model(ss_loss="margin", learn_tau=True).log_scale.requires_grad
    plain = make_model(ss_loss="none", descriptions=False).eval()
    assert "desc_sims" not in plain(batch).extras


def test_contradictions_are_rejected():
    with pytest.raises(ValueError, match="inference"):
        AmessConfig(inference="similarity", ss_loss="none")
    with pytest.raises(ValueError, match="num_anchors"):
        AmessConfig(anchor_mode="topk", num_anchors=0)
    with pytest.raises(ValueError, match="anchor_mode"):
        AmessConfig(anchor_mode="sparse")
    AmessConfig(anchor_mode="none", num_anchors=0)
    with pytest.raises(ValueError, match="needs label descriptions"):
        make_model(descriptions=False)
    with pytest.raises(ValueError, match="fusion_heads"):
        make_model(fusion_heads=5)
    with pytest.raises(ValueError, match="3 labels"):
        build_model("amess", config=make_config(), encoder=tiny_encoder(), num_labels=C, video_dim=DV,
                    audio_dim=None, label_names=LABELS, descriptions=DESCRIPTIONS[:2])
    assert Config.from_dict({"amess": {"anchor_mode": "learned"}}).amess.anchor_mode == "learned"


@pytest.mark.parametrize("kw", [{}, {"anchor_mode": "learned", "ss_loss": "margin"},
                                {"desc_encoder": "frozen", "learn_tau": False}])
def test_training_steps_reduce_loss(kw):
    model = make_model(**kw)
    batch = make_batch(lengths=(10, 7, 5, 3, 8, 6), labels=[0, 1, 2, 0, 1, 2])
    opt = torch.optim.AdamW(model.param_groups(lr=3e-3, weight_decay=0.01))
    losses = []
    for _ in range(10):
        loss, _ = model.loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.85 * losses[0]


# ----- cost switches (issue "A-MESS at the cost of two text passes") ---------------------

def test_pool_frames_means_real_frames_only():
    from amess.models.amess import pool_frames

    x = torch.arange(2 * 7 * 1, dtype=torch.float32).view(2, 7, 1)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4]).bool()
    x = x * mask[..., None]
    same, same_mask = pool_frames(x, mask, 7)
    assert same is x and same_mask is mask
    p, pm = pool_frames(x, mask, 3)  # window ceil(7 / 3) = 3: windows [0:3], [3:6], [6:7]
    assert p.shape == (2, 3, 1)
    assert p[0, :, 0].tolist() == [1.0, 4.0, 6.0]
    assert p[1, 0, 0].item() == 8.0 and pm[1].tolist() == [True, False, False]  # mean of 7, 8, 9
    assert pm[0].all()
    p2, pm2 = pool_frames(x[1:, :5], mask[1:, :5], 2)  # a padded window counts its real frames only
    assert p2[0, :, 0].tolist() == [8.0, 0.0] and pm2[0].tolist() == [True, False]


def test_pool_frames_ignores_whatever_padding_holds():
    """Windows average the real frames only, whatever the padded frames hold (checked against a
    loop over windows, at a length that leaves a partial last window)."""
    from amess.models.amess import pool_frames

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 23, 4, generator=g)
    lengths = torch.tensor([23, 10, 0])
    mask = torch.arange(23)[None] < lengths[:, None]
    x = torch.where(mask[..., None], x, torch.full_like(x, 1e4))  # padding far from any real value
    p, pm = pool_frames(x, mask, 5)  # window ceil(23 / 5) = 5: 4 whole windows and one of 3 frames
    assert p.shape == (3, 5, 4)
    for i in range(3):
        for j in range(5):
            real = x[i, j * 5:(j + 1) * 5][mask[i, j * 5:(j + 1) * 5]]
            assert pm[i, j] == (len(real) > 0)
            want = real.mean(0) if len(real) else torch.zeros(4)
            assert torch.allclose(p[i, j], want, atol=1e-5), (i, j)


@pytest.mark.parametrize("heads", [1, 4])
def test_anchor_attention_is_multihead_attention(heads):
    """The folded cross-attention of the fusion computes what nn.MultiheadAttention computes,
    values and gradients alike (masked keys, a row without frames, biases that do not cancel)."""
    from torch import nn

    from amess.models.amess import _key_padding, anchor_attention

    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, heads, batch_first=True).double()
    nn.init.normal_(attn.in_proj_bias)
    nn.init.normal_(attn.out_proj.bias)
    q = torch.randn(3, 4, 16, dtype=torch.double, requires_grad=True)
    h = torch.randn(3, 9, 16, dtype=torch.double, requires_grad=True)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2] = False
    kp = _key_padding(mask)
    ref = attn(q, h, h, key_padding_mask=kp, need_weights=False)[0]
    out = anchor_attention(attn, q, h, kp)
    assert torch.allclose(out, ref, atol=1e-10)
    w = torch.randn_like(ref)
    params = [q, h, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight]
    for a, b in zip(torch.autograd.grad((ref * w).sum(), params), torch.autograd.grad((out * w).sum(), params)):
        assert torch.allclose(a, b, atol=1e-10)
    with pytest.raises(ValueError, match="dropout"):
        anchor_attention(nn.MultiheadAttention(16, heads, dropout=0.1, batch_first=True), q.float(), h.float(), kp)


def test_max_frames_bounds_what_the_nonverbal_encoders_see():
    model = make_model(max_frames=2).eval()
    full = make_model().eval()
    batch = make_batch()
    streams = model._streams(batch)
    assert all(h.shape[1] <= 2 for h, _ in streams)
    assert [h.shape[1] for h, _ in full._streams(batch)] == [7, 9]
    assert torch.isfinite(model(batch).logits).all()


def test_desc_refresh_reencodes_every_nth_step_only():
    model = make_model(desc_encoder="shared", desc_refresh=3).train()
    assert {"desc_stale", "desc_step"} <= set(model.state_dict())  # resumed runs keep the schedule
    calls = []
    orig = model._encode_descriptions
    model._encode_descriptions = lambda: calls.append(1) or orig()
    batch = make_batch()
    grads = []
    for _ in range(7):
        model.zero_grad()
        out = model(batch)
        loss, _ = model.loss(out, batch)
        loss.backward()
        emb = model.encoder.model.get_input_embeddings().weight.grad
        grads.append(float(emb[10].abs().sum()))  # "w10" occurs only in a description
    assert len(calls) == 3 and int(model.desc_step) == 7  # steps 0, 3, 6
    assert [g > 0 for g in grads] == [True, False, False, True, False, False, True]
    assert model.proj_desc.weight.grad is not None  # the projection learns on every step
    model.eval()
    with torch.no_grad():
        model(batch)
    assert len(calls) == 4  # evaluation encodes with the current weights
    assert "desc_stale" not in make_model(desc_encoder="shared", desc_refresh=1).state_dict()  # every step: nothing to keep
    old = {k: v for k, v in model.state_dict().items() if k not in ("desc_stale", "desc_step")}
    fresh = make_model(desc_encoder="shared", desc_refresh=3)
    fresh.load_state_dict(old)  # a checkpoint from before the switch still loads
    assert int(fresh.desc_step) == 0


def test_momentum_description_encoder_is_an_ema_copy_without_gradients():
    m = 0.5
    model = make_model(desc_encoder="momentum", desc_momentum=m, desc_refresh=2).train()
    mom, enc = model.desc_momentum_encoder, model.encoder
    assert not any(p.requires_grad for p in mom.parameters())
    trainable = {id(p) for g in model.param_groups(1e-3, 0.0) for p in g["params"]}
    assert not trainable & {id(p) for p in mom.parameters()}  # never in the optimizer
    assert all(torch.equal(a, b) for a, b in zip(mom.parameters(), enc.parameters()))  # starts as a copy
    calls = []
    orig = model._encode_descriptions
    model._encode_descriptions = lambda encoder=None: calls.append(encoder) or orig(encoder)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = make_batch()
    word = lambda module: module.model.get_input_embeddings().weight  # noqa: E731
    for step in range(4):
        before_m, before_e = word(mom).clone(), word(enc).detach().clone()
        opt.zero_grad()
        loss, _ = model.loss(model(batch), batch)
        loss.backward()
        # theta_m <- m theta_m + (1 - m) theta_text, with the text weights of before this step's update
        assert torch.allclose(word(mom), m * before_m + (1 - m) * before_e, atol=1e-6)
        assert float(word(enc).grad[10].abs().sum()) == 0.0  # "w10" is only in a description
        assert model.proj_desc.weight.grad is not None  # the projection still learns
        opt.step()
    assert calls == [mom, mom] and int(model.desc_step) == 4  # re-encoded at steps 0 and 2
    assert not torch.equal(word(mom), word(enc).detach())  # it lags behind the trained encoder
    model.eval()
    with torch.no_grad():
        e = model.describe()
        hidden = mom(input_ids=model.desc_input_ids, attention_mask=model.desc_attention_mask)
        want = F.normalize(model.proj_desc(mom.pool(hidden, model.desc_attention_mask, model.pooling)), dim=-1)
    assert torch.allclose(e, want, atol=1e-6)  # evaluation scores with the momentum copy
    state = model.state_dict()
    assert any(k.startswith("desc_momentum_encoder.") for k in state)  # saved with the run
    fresh = make_model(desc_encoder="momentum", desc_momentum=m, desc_refresh=2, seed=3)
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(batch).logits, model(batch).logits, atol=1e-6)
        assert torch.allclose(fresh.describe(), e, atol=1e-6)
    with pytest.raises(ValueError, match="desc_momentum"):
        AmessConfig(desc_encoder="momentum", desc_momentum=1.0)


def test_text_view_without_gradient_is_a_forward_pass_only():
    batch = make_batch()
    for grad in (True, False):
        model = make_model(text_view_grad=grad).train()
        seen = []
        enc_forward = model.encoder.forward

        def spy(*a, **k):
            seen.append(torch.is_grad_enabled())
            return enc_forward(*a, **k)

        model.encoder.forward = spy
        out = model(batch)
        assert "z_t" in out.extras and out.extras["z_t"].requires_grad  # the projection still learns
        assert seen[-1] is grad  # the text-only pass is the last encoder call


def test_text_only_view_gives_text_alone_a_second_view():
    """`text_only_view`: on text alone z_t is absent by default; `dropout` is the same encoder
    under another dropout draw (differs from z_m in training, equals it without dropout),
    `momentum` the momentum copy's encoding (no gradient into it); with streams it is ignored."""
    batch = make_batch(video=False, audio=False)
    plain = make_model(video=False, audio=False).train()
    assert "z_t" not in plain(batch).extras
    torch.manual_seed(0)
    drop = make_model(video=False, audio=False, text_only_view="dropout").train()

    def set_dropout(p):  # the tiny test encoder is built without dropout
        for mod in drop.encoder.model.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = p

    set_dropout(0.1)
    out = drop(batch)
    z_m, z_t = out.extras["z_m"], out.extras["z_t"]
    assert not torch.allclose(z_m, z_t, atol=1e-4)  # another dropout draw
    assert z_t.requires_grad and drop.encoder.model.embeddings.word_embeddings.weight.grad is None
    loss, parts = drop.loss(out, batch)
    loss.backward()  # three triplet terms now, and the encoder learns only through z_m
    assert parts["ss"] > 0 and drop.encoder.model.embeddings.word_embeddings.weight.grad is not None
    set_dropout(0.0)  # without dropout the second view is z_m itself
    out = drop(batch)
    assert torch.allclose(out.extras["z_m"], out.extras["z_t"], atol=1e-5)
    calls = []

    def record_copy_inputs(model):  # note the input_ids each call of the momentum copy encodes
        key_forward = model.desc_momentum_encoder.forward
        model.desc_momentum_encoder.forward = lambda *a, **k: calls.append(k["input_ids"]) or key_forward(*a, **k)

    mom = make_model(video=False, audio=False, text_only_view="momentum").train()
    record_copy_inputs(mom)
    out = mom(batch)
    assert calls[-1] is batch.input_ids and "z_t" in out.extras  # the utterance, by the copy
    assert not any(p.requires_grad for p in mom.desc_momentum_encoder.parameters())
    fused = make_model(text_only_view="momentum").train()
    calls.clear()
    record_copy_inputs(fused)
    fused_batch = make_batch()
    fused(fused_batch)
    assert calls and all(c is not fused_batch.input_ids for c in calls)  # with streams: the spec's text view
    with pytest.raises(ValueError, match="text_only_view=momentum"):
        AmessConfig(text_only_view="momentum", desc_encoder="shared")
    with pytest.raises(ValueError, match="text_only_view"):
        AmessConfig(text_only_view="other")


def test_cost_switches_are_validated():
    with pytest.raises(ValueError, match="desc_refresh"):
        AmessConfig(desc_refresh=0)
    with pytest.raises(ValueError, match="max_frames"):
        AmessConfig(max_frames=0)


# ----- SS search switches (issue 12): positives, label texts, head init, warm-up ------------

def test_supervised_infonce_by_hand():
    a, b = F.normalize(torch.randn(4, 3), dim=-1), F.normalize(torch.randn(4, 3), dim=-1)
    distinct = torch.arange(4)
    # with every label distinct the only positive is the row itself: CLIP's InfoNCE
    assert supervised_infonce(a, b, distinct, 0.2).item() == pytest.approx(symmetric_infonce(a, b, 0.2).item(), rel=1e-5)
    # one view, labels [0, 0, 1]: row 0's only positive is row 1 among rows {1, 2}; row 2 has none
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    y = torch.tensor([0, 0, 1])
    s = (z @ z.t() / 0.5).tolist()
    r0 = -math.log(math.exp(s[0][1]) / (math.exp(s[0][1]) + math.exp(s[0][2])))
    r1 = -math.log(math.exp(s[1][0]) / (math.exp(s[1][0]) + math.exp(s[1][2])))
    assert supervised_infonce(z, z, y, 0.5).item() == pytest.approx((r0 + r1) / 2, rel=1e-5)
    assert supervised_infonce(z, z, distinct[:3], 0.5).item() == 0.0  # no positives: nothing to learn
    # pulling same-label rows together lowers it
    close = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]]), dim=-1)
    assert supervised_infonce(close, close, y, 0.5) < supervised_infonce(z, z, y, 0.5)


def test_label_positives_change_the_triplet_loss():
    z_m, z_t = F.normalize(torch.randn(4, 3), dim=-1), F.normalize(torch.randn(4, 3), dim=-1)
    e, y = F.normalize(torch.randn(C, 3), dim=-1), torch.tensor([0, 1, 0, 1])
    terms = [description_ce(z_m, e, y, 0.2), description_ce(z_t, e, y, 0.2), supervised_infonce(z_m, z_t, y, 0.2)]
    got = triplet_contrastive(z_m, z_t, e, y, 0.2, positives="label")
    assert got.item() == pytest.approx(sum(terms).item() / 3, rel=1e-6)
    alone = triplet_contrastive(z_m, None, e, y, 0.2, text_view=False, positives="label")
    assert alone.item() == pytest.approx((terms[0] + supervised_infonce(z_m, z_m, y, 0.2)).item() / 2, rel=1e-6)
    with pytest.raises(ValueError, match="positives"):
        triplet_contrastive(z_m, z_t, e, y, 0.2, positives="batch")
    # in the model: on text alone (no z_t) the label positives add a term, so the loss differs
    batch = make_batch(labels=[0, 1, 0, 1])
    losses = []
    for pos in ("self", "label"):
        model = make_model(video=False, audio=False, ss_positives=pos).train()
        losses.append(model.loss(model(batch), batch)[0].item())
    assert losses[0] != pytest.approx(losses[1])


def test_desc_text_chooses_what_stands_for_a_label():
    tok = tiny_encoder().tokenizer
    decode = lambda m: [tok.decode(r[r > 4].tolist()) for r in m.desc_input_ids]  # noqa: E731
    assert decode(make_model()) == DESCRIPTIONS
    # the label names are not in the tiny vocabulary: they become [UNK], so compare token counts
    named = make_model(desc_text="name")
    assert named.desc_input_ids.shape[1] == 3  # [CLS] name [SEP]
    both = make_model(desc_text="name+description")
    expected = [tok(f"{n}: {d}")["input_ids"] for n, d in zip(LABELS, DESCRIPTIONS)]
    assert [r[m.bool()].tolist() for r, m in zip(both.desc_input_ids, both.desc_attention_mask)] == expected
    # the control: every label gets the next label's description, none its own
    assert decode(make_model(desc_text="mismatched")) == DESCRIPTIONS[1:] + DESCRIPTIONS[:1]
    with pytest.raises(ValueError, match="desc_text"):
        AmessConfig(desc_text="title")


@pytest.mark.parametrize("desc_encoder", ["shared", "frozen"])
def test_head_init_from_projected_descriptions(desc_encoder):
    model = make_model(head_init="descriptions", desc_encoder=desc_encoder).eval()
    random = make_model(desc_encoder=desc_encoder)
    with torch.no_grad():
        e = model.describe()  # (C, p) from the encoder as built
        direction = F.normalize(e @ model.proj_utt.weight, dim=-1)
        assert torch.allclose(F.normalize(model.head.weight, dim=-1), direction, atol=1e-5)
        assert torch.all(model.head.bias == 0)
        norm = random.head.weight.norm(dim=1).mean()
        assert model.head.weight.norm(dim=1).allclose(norm.expand(C), rtol=1e-4)
        assert not torch.allclose(F.normalize(random.head.weight, dim=-1), direction, atol=1e-2)
    with pytest.raises(ValueError, match="head_init"):
        AmessConfig(head_init="descriptions", ss_loss="none")


def test_ss_warmup_ramps_the_ss_weight_and_is_resumable():
    batch = make_batch()
    model = make_model(ss_warmup=4, ss_lambda=0.8).train()
    weights = []
    for _ in range(6):
        out = model(batch)
        loss, parts = model.loss(out, batch)
        weights.append(parts["ss_weight"])
        assert loss.item() == pytest.approx(parts["ce"] + parts["ss_weight"] * parts["ss"], rel=1e-5)
    assert weights == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    model.eval()
    with torch.no_grad():
        model.loss(model(batch), batch)
    assert int(model.ss_step) == 6  # evaluation does not advance the ramp
    assert "ss_step" in model.state_dict() and "ss_step" not in make_model().state_dict()
    fresh = make_model(ss_warmup=4)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k != "ss_step"})
    assert int(fresh.ss_step) == 0
    with pytest.raises(ValueError, match="ss_warmup"):
        AmessConfig(ss_warmup=-1)


def test_tau_schedule_anneals_a_fixed_temperature_and_is_resumable():
    batch = make_batch()
    model = make_model(learn_tau=False, tau=0.5, tau_end=0.1, tau_steps=4).train()
    assert not isinstance(model.log_scale, torch.nn.Parameter)
    scales = []
    for _ in range(6):
        scales.append(model.loss(model(batch), batch)[1]["scale"])
    taus = [0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi * min(t, 4) / 4)) for t in range(6)]
    assert scales == pytest.approx([1 / t for t in taus], rel=1e-5)  # 0.5 -> 0.1, then 0.1
    model.eval()
    with torch.no_grad():
        out = model(batch)
        assert model.loss(out, batch)[1]["scale"] == pytest.approx(10.0)  # evaluation: the end value
        sims = (out.extras["desc_sims"] * 10.0).softmax(-1)
    model.cfg.inference = "similarity"
    assert torch.allclose(model.predict_scores(out), sims, atol=1e-6)
    assert int(model.tau_step) == 6  # evaluation does not advance the schedule
    fresh = make_model(learn_tau=False, tau=0.5, tau_end=0.1, tau_steps=4)
    fresh.load_state_dict(model.state_dict())
    assert int(fresh.tau_step) == 6 and float(fresh.logit_scale()) == pytest.approx(10.0)
    assert "tau_step" not in make_model().state_dict()
    for bad in ({"tau_end": 0.1, "learn_tau": True}, {"tau_end": 0.1, "learn_tau": False, "ss_loss": "margin"},
                {"tau_end": 0.0, "learn_tau": False}, {"tau_end": 0.1, "learn_tau": False, "tau_steps": 0}):
        with pytest.raises(ValueError, match="tau_"):
            AmessConfig(**bad)


@pytest.mark.parametrize("desc_encoder", ["shared", "frozen"])
def test_several_descriptions_per_label_average_into_one_label_embedding(desc_encoder):
    several = [[d, f"{d} again", "more words here"] if c % 2 == 0 else d for c, d in enumerate(DESCRIPTIONS)]
    model = make_model(descriptions=several, desc_encoder=desc_encoder, desc_refresh=1).eval()
    n = sum(3 if c % 2 == 0 else 1 for c in range(C))
    assert model.desc_input_ids.shape[0] == n
    with torch.no_grad():
        e = model.describe()
        assert e.shape == (C, model.cfg.proj_dim)
        pooled = model.desc_cache if desc_encoder == "frozen" else model._encode_descriptions()
        each = F.normalize(model.proj_desc(pooled), dim=-1)
        row = 0
        for c in range(C):
            k = 3 if c % 2 == 0 else 1
            assert torch.allclose(e[c], F.normalize(each[row:row + k].mean(0), dim=0), atol=1e-6)
            row += k
    batch = make_batch()
    model.train()
    loss, _ = model.loss(model(batch), batch)
    loss.backward()
    assert model.proj_desc.weight.grad is not None and torch.isfinite(model.proj_desc.weight.grad).all()
    named = make_model(descriptions=several, desc_text="name+description")
    assert named.desc_input_ids.shape[0] == n
    with pytest.raises(ValueError, match="empty"):
        make_model(descriptions=[[]] + list(DESCRIPTIONS[1:]))
