"""A-MESS: anchor-based multimodal embedding (A-ME) with semantic synchronisation (SS).

Implements docs/amess-method.md; section numbers below ("A-ME 3", "SS 4") refer to it.
Read top to bottom: helpers, the non-verbal encoder, the anchor fusion, then the model.

Choices the paper leaves open (each is an `AmessSettings` switch or documented here):
- Non-verbal positions are sinusoidal, so that no maximum stream length is fixed at
  construction (feature lengths come from the dataset, never from a constant here).
- `topk` scores a token by the scaled dot product between its word embedding and the
  masked mean of the projected non-verbal streams. The choice of positions is not
  differentiable; the streams' projection learns through the cross-attention, and the
  choice follows it.
- Special tokens are the tokenizer's special ids; position 0 and the last real token
  ([CLS] / [SEP] in BERT-style encoders) are excluded as well, so a batch built without
  a tokenizer still never anchors on them.
- `all` means every real word token (specials and padding excluded): `topk` with k = n.
- z_m and z_t share one projection (both are the same encoder's pooled utterance), the
  descriptions have their own: descriptions are a different kind of text.
- With `ss_loss=none` nothing is projected: `desc_sims` are cosines of the pooled vectors.

einops legend:
    b  batch              n  text tokens (n + k with `learned` anchors)
    m  frames of one non-verbal stream (m_v video, m_a audio)
    d  encoder embedding size      h  encoder hidden size (pooled)
    k  anchors            s  non-verbal streams the model was built with (1 or 2)
    C  intent labels      p  shared semantic space (`proj_dim`)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import einsum, repeat
from torch import nn

from amess.config import Config
from amess.data.batch import Batch
from amess.losses import POSITIVES, margin_triplet, triplet_contrastive
from amess.models.base import IntentModel, IntentOutput, register_method
from amess.models.encoders import TextEncoder

FUSION_INIT_STD = 1e-3
"""Std of the fusion output projection W at init: with the gate at sigmoid(gate_init) the
first update of an anchor is a few per cent of a word embedding (A-ME 4: start from the
text model, yet let gradients reach the fusion and the non-verbal encoders)."""
MAX_LOGIT_SCALE = 100.0
"""Upper clamp of a learned SS logit scale 1/tau, as in CLIP (avoids collapse to huge logits)."""

ANCHOR_MODES = ("topk", "learned", "all", "none")
SS_LOSSES = ("none", "triplet", "margin")
DESC_ENCODERS = ("shared", "frozen", "momentum")
INFERENCE_MODES = ("auto", "head", "similarity", "both")
DESC_TEXTS = ("description", "name", "name+description", "mismatched")
HEAD_INITS = ("random", "descriptions")
TEXT_ONLY_VIEWS = ("none", "dropout", "momentum")


@dataclass
class AmessSettings:
    """A-MESS switches (docs/amess-method.md): the `amess` section of a config."""

    anchor_mode: str = "topk"
    """A-ME anchors: `topk` (text tokens most relevant to the non-verbal streams), `learned`
    (k learned vectors inserted after [CLS]), `all` (every word token: dense fusion) or
    `none` (no fusion: the ablation row)."""
    num_anchors: int = 4
    """k, the number of anchors for `topk` and `learned`."""
    fusion_heads: int = 4
    """Attention heads of the anchor cross-attention and of the non-verbal layer; must divide
    the encoder's embedding size."""
    nonverbal_layer: bool = True
    """Run one light Transformer layer over each projected non-verbal stream."""
    ss_loss: str = "triplet"
    """SS loss: `triplet` (z_m and z_t against descriptions, plus z_m-z_t InfoNCE), `margin`
    (z_m, gold description, hardest negative description) or `none`."""
    ss_lambda: float = 0.5
    """Weight of the SS loss: L = CE + ss_lambda * L_SS."""
    tau: float = 0.07
    """Temperature of the SS similarities (initial value when `learn_tau`). Default 0.07 fixed
    since 2026-12-07 (was 0.1, learned; CLIP's initial value): trained and scored by
    `inference=both` with `desc_momentum=0.999`, fixed 0.05 / 0.07 / 0.1 measured +0.31 / +0.94 /
    +0.94 points of accuracy over `text` on the MIntRec text and +1.16 / +0.94 / +0.38 on the
    MIntRec2.0 in-scope text (5 seeds each, paired, at 5 and 2 epochs; README "The temperature,
    scored by `both`"): 0.07 is the best on the two together. At MIntRec's 10 epochs the default
    is level with `text` (-0.54 +- 1.57): SS learns faster rather than ends higher. Over ten
    seeds (0-4 and the new 5-9) at the short budgets: +0.74 +- 0.92 and +0.60 +- 0.73."""
    learn_tau: bool = False
    """Learn the logit scale 1/tau (CLIP style, clamped to [1, 100]) with the triplet loss; False,
    or the margin loss (raw cosines, no temperature), keeps `tau` fixed. Default False since
    2026-12-07 (was True): at the head's learning rate (1e-4) over the few hundred steps of a
    MIntRec run the learned scale barely moves (10.0 -> 10.2 in every run measured), so it was a
    fixed tau = 0.1 in practice, and a fixed `tau` is the switch that was measured."""
    tau_end: float | None = None
    """A temperature schedule (with `learn_tau=false` and the triplet loss): tau moves from `tau`
    to `tau_end` along a half cosine over the first `tau_steps` training steps, then stays at
    `tau_end` (also at evaluation). None keeps `tau` constant."""
    tau_steps: int = 375
    """Length of the temperature schedule in training steps (375: about 5 epochs of MIntRec's 90%
    train slice at batch 16)."""
    proj_dim: int = 128
    """p, the size of the shared semantic space."""
    shared_projection: bool = False
    """Project utterances and descriptions into the shared space with one linear map instead of
    two (SS 3 leaves it open). With two, the description side has its own map, which can move
    each label's anchor freely (C anchors, a map of p x h), so the similarity view can become a
    cosine classifier whose weights started from the descriptions; with one, an anchor is where
    the description encoder's output lands under the utterances' own map. Measured over ten seeds
    (README "Three more switches, and a control"): +1.12 +- 1.41 and +0.72 +- 0.92 points of
    accuracy over `text` on the MIntRec and MIntRec2.0 in-scope text, the best SS measured, but
    only +0.38 +- 1.39 and +0.12 +- 0.88 over the default (p = 0.41, 0.68), with the held-back
    slices hardly separating the two: a switch, not (yet) the default. A state saved with two maps
    loads as two whatever this says (`load_state_dict`), so earlier runs never collapse them."""
    text_view: bool = True
    """Use the text-only view z_t (a second encoder pass) in the triplet loss; ignored otherwise."""
    desc_encoder: str = "momentum"
    """Description encoder: `momentum` (MoCo-style: a copy of the text encoder whose weights
    follow the trained encoder as an exponential moving average, `desc_momentum`, updated
    every training step; it encodes the descriptions without gradients, every
    `desc_refresh`-th step, and at evaluation; it is saved with the model, so a run is ~2x
    the encoder's size on disk and in memory), `shared` (the trained text encoder itself,
    with gradients, re-encoded every `desc_refresh`-th step: the spec's default) or `frozen`
    (the pretrained encoder, encoded once at construction and cached). Default `momentum`
    since 2026-12-04 (was `shared`): the best SS measured on the real text of both datasets,
    +1.26 +- 1.01 points of accuracy over `shared` on MIntRec and +0.45 +- 0.88 on MIntRec2.0
    in-scope (5 seeds each, paired; README "Searching for an SS that earns its keep")."""
    desc_momentum: float = 0.999
    """With `desc_encoder=momentum`: theta_desc <- m * theta_desc + (1 - m) * theta_text at
    every training step (MoCo's value; MIntRec has ~75 steps an epoch, so after 5 epochs the
    pretrained weights still weigh 0.999^380 = 0.68 in the copy). Default 0.999 since
    2026-12-07 (was 0.99): the same with head inference on both real texts (5 seeds, paired:
    -0.09 +- 0.37 and -0.07 +- 0.35 points) and better with `inference=both` (README)."""
    desc_max_len: int = 64
    """Max tokens of a label description, special tokens included."""
    desc_refresh: int = 8
    """With the `shared` description encoder: re-encode the descriptions through the encoder
    (with gradients) every N-th training step (with `momentum`, the default: through the
    momentum copy, without gradients); the steps in between reuse the pooled vectors
    of the last re-encoding (no gradient into the encoder from them; the projection still
    learns). 1 = every step (the cost of the description pass, ~3x the utterance pass on
    MIntRec, is then paid every step). Evaluation always encodes with the current weights.
    Default 8 (was 4): on the real MIntRec text the same accuracy over 5 seeds (-0.09 +- 1.22
    points, paired) at 1.53x the `text` step instead of 2.15x (README, BENCHMARKS.md)."""
    text_only_view: str = "none"
    """What z_t is when no non-verbal stream reaches the encoder (text-only runs, anchor mode
    `none`), where the text-only view would be z_m again: `none` (the default: no z_t, SS is the
    description term of z_m alone), `dropout` (the same encoder on the same text under another
    dropout draw, as SimCSE's positive pair, Gao et al. 2021) or `momentum` (the utterance
    encoded by the momentum description encoder, without dropout: MoCo's key view, He et al.
    2020; needs `desc_encoder=momentum`). With either, the triplet loss gets its three terms on
    text alone. Like the text view, it runs without gradients unless `text_view_grad`. Measured
    (README "A second view of the utterance on text alone", 5 seeds, paired): `dropout` lifts
    the head alone by +1.12 / +0.45 points over the default's head on the MIntRec / MIntRec2.0
    text, but scored by `both` it is +0.04 / -0.33 against the default (+0.99 / +0.61 over `text`)
    at a forward pass more per step (1.49x `text` against 1.20x); `momentum` -0.22 on MIntRec.
    Over ten MIntRec seeds the head's gain holds (+0.94 +- 1.04, p = 0.02), the mix's does not
    (+0.09 +- 1.14 against the default)."""
    text_view_grad: bool = False
    """Back-propagate through the encoder's text-only pass for z_t. False runs that pass
    without gradients (a stop-gradient view: a forward pass instead of a forward and a
    backward one); the shared projection still learns from z_t."""
    max_frames: int | None = 16
    """Average-pool each non-verbal stream over consecutive real frames to at most this many
    frames before its encoder (masks from the true lengths; a pooled frame averages only real
    frames). None keeps every frame. Default 16 (was 32): cheaper inference with video and
    audio at the same demo accuracy (BENCHMARKS.md, 2026-12-03). Chosen on synthetic data, the
    only multimodal data here: real features (MIntRec: up to 225 video, 477 audio frames) may
    want 32 back."""
    inference: str = "auto"
    """Scores at evaluation (and for choosing the checkpoint on the early-stopping split):
    `head` (classifier softmax), `similarity` (softmax over the scaled cosine similarities to the
    descriptions), `both` (the average of the two) or `auto` (the default since 2026-12-07, was
    `head`): `both` when an SS loss trains the shared space, `head` with `ss_loss=none`. With the
    default tau, `both` beat `head` on the same checkpoints by +0.99 points on the MIntRec text and
    +1.57 on MIntRec2.0 (5 seeds; README). Out-of-scope detectors read the same scores
    (`decision_logits`); on MIntRec with 5 of 20 intents unknown, `both` against `head` on the
    same checkpoints: AUROC within noise for MSP, MaxLogit and energy, -2.9 for DOC, open-intent
    F1 +2.4 to +4.3 with every detector (5 seeds); on MIntRec2.0 (8 of 30 unknown, 3 seeds) the
    same pattern: DOC -2.8, open-intent F1 +0.8 to +1.9 (README)."""
    both_weight: float = 0.5
    """With `inference=both`: the weight of the similarity view, scores = (1 - w) * head + w *
    similarity (0.5: the plain average). An inference-time setting (`amess evaluate RUN --set
    amess.both_weight=0.7`). 0.5 since it was added (2026-12-07): on the held-back slices of the
    default's 5-seed runs the best weight was 0.5 on MIntRec and 0.9 on MIntRec2.0 (README), so no
    one other value is better on both."""
    margin: float = 0.2
    """Cosine margin of the `margin` SS loss."""
    desc_text: str = "description"
    """What stands for a label in SS: its `description` (the dataset's label descriptions),
    its `name` alone ("Complain"), `name+description` ("Complain: <description>"), or
    `mismatched`, a control: label c gets the description(s) of label (c + 1) mod C, so the
    anchors keep the descriptions' geometry and lose their meaning (what SS gains from the
    meaning of the descriptions is the gap between `description` and `mismatched`). Measured
    (5 seeds, README "Three more switches, and a control"): -0.63 +- 0.82 and -0.31 +- 0.71
    points of accuracy against the default on the MIntRec and MIntRec2.0 in-scope text, which
    keeps +0.31 and +0.63 of the default's +0.94 over `text` on the same seeds."""
    head_init: str = "random"
    """Classifier init: `random` (PyTorch's default), or `descriptions`: row c of the head is
    P_u^T e_c (e_c the projected, normalised description of label c from the pretrained
    encoder, P_u the utterance projection), rescaled to the default init's row norm, bias 0:
    at step 0 the head scores a pooled utterance by its (unnormalised) similarity to each
    description in the shared space. Needs an SS loss and descriptions."""
    ss_positives: str = "self"
    """Positives of the in-batch contrastive term of the triplet loss: `self` (z_m_i against
    z_t_i only, as SS 4) or `label` (supervised contrastive: every row of the same intent;
    on text alone, where there is no z_t, this adds a SupCon term of z_m against itself)."""
    ss_symmetric: bool = False
    """With the triplet loss: make each description term symmetric, as CLIP's loss and FLYP's
    fine-tuning are (Goyal et al. 2023): besides each utterance choosing its description among
    the C (`description_ce`), each label present in the batch chooses its own utterances among
    the batch's rows (`losses.description_to_rows`); the two directions are averaged. Measured
    (README "Three more switches, and a control"): -0.18 +- 0.80 points of accuracy against the
    default on the MIntRec text (5 seeds, held-back slices equal), lower on both MIntRec2.0 seeds
    run; not the default."""
    ss_warmup: int = 0
    """Training steps over which the SS weight rises linearly from 0 to `ss_lambda` (0 = the
    full weight from the first step)."""
    gate_init: float = -2.0
    """Initial bias of the fusion gate: sigmoid(-2) = 0.12, so training starts near the text model."""

    def __post_init__(self) -> None:
        choices = {"anchor_mode": ANCHOR_MODES, "ss_loss": SS_LOSSES, "desc_encoder": DESC_ENCODERS,
                   "inference": INFERENCE_MODES, "desc_text": DESC_TEXTS, "head_init": HEAD_INITS,
                   "ss_positives": POSITIVES, "text_only_view": TEXT_ONLY_VIEWS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"amess.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.anchor_mode in ("topk", "learned") and self.num_anchors < 1:
            raise ValueError(f"amess.num_anchors must be >= 1 with anchor_mode {self.anchor_mode!r}, "
                             f"got {self.num_anchors}")
        if self.fusion_heads < 1:
            raise ValueError(f"amess.fusion_heads must be >= 1, got {self.fusion_heads}")
        if self.ss_lambda < 0:
            raise ValueError(f"amess.ss_lambda must be >= 0, got {self.ss_lambda}")
        if not self.tau > 0:
            raise ValueError(f"amess.tau must be > 0, got {self.tau}")
        if self.learn_tau and not 0.01 <= self.tau <= 1.0:
            raise ValueError(f"amess.tau must lie in [0.01, 1] with learn_tau (the scale 1/tau is "
                             f"clamped to [1, 100]), got {self.tau}")
        if self.tau_end is not None:
            if self.learn_tau or self.ss_loss != "triplet":
                raise ValueError("amess.tau_end schedules a fixed temperature of the triplet loss; "
                                 "set amess.learn_tau=false and amess.ss_loss=triplet, or tau_end=null")
            if not self.tau_end > 0:
                raise ValueError(f"amess.tau_end must be > 0, got {self.tau_end}")
            if self.tau_steps < 1:
                raise ValueError(f"amess.tau_steps must be >= 1 (training steps), got {self.tau_steps}")
        if self.proj_dim < 1:
            raise ValueError(f"amess.proj_dim must be >= 1, got {self.proj_dim}")
        if not 0.0 <= self.desc_momentum < 1.0:
            raise ValueError(f"amess.desc_momentum must lie in [0, 1), got {self.desc_momentum}")
        if self.desc_refresh < 1:
            raise ValueError(f"amess.desc_refresh must be >= 1 (re-encode every N steps), got {self.desc_refresh}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"amess.max_frames must be >= 1 or null, got {self.max_frames}")
        if self.desc_max_len < 3:
            raise ValueError(f"amess.desc_max_len must be >= 3, got {self.desc_max_len}")
        if self.ss_loss == "margin" and not 0 < self.margin <= 2:
            raise ValueError(f"amess.margin must lie in (0, 2] (a cosine margin), got {self.margin}")
        if not 0.0 <= self.both_weight <= 1.0:
            raise ValueError(f"amess.both_weight must lie in [0, 1] (the similarity view's share), got {self.both_weight}")
        if self.text_only_view == "momentum" and self.desc_encoder != "momentum":
            raise ValueError("amess.text_only_view=momentum encodes the utterance with the momentum "
                             "description encoder; set amess.desc_encoder=momentum or another text_only_view")
        if self.ss_symmetric and self.ss_loss != "triplet":
            raise ValueError("amess.ss_symmetric makes the triplet loss's description terms symmetric; "
                             f"it does nothing with amess.ss_loss={self.ss_loss!r}: set ss_loss=triplet or drop it")
        if self.ss_warmup < 0:
            raise ValueError(f"amess.ss_warmup must be >= 0 (steps), got {self.ss_warmup}")
        if self.head_init == "descriptions" and self.ss_loss == "none":
            raise ValueError("amess.head_init=descriptions initialises the head from the projected "
                             "descriptions, which amess.ss_loss=none does not build; use head_init=random")
        if self.inference not in ("head", "auto") and self.ss_loss == "none":
            raise ValueError(f"amess.inference={self.inference!r} scores by similarity to the label "
                             "descriptions, a space that amess.ss_loss=none never trains; use "
                             "inference=head or an SS loss")

    @property
    def inference_mode(self) -> str:
        """`inference` with `auto` resolved: `both` with an SS loss, `head` without one."""
        if self.inference == "auto":
            return "head" if self.ss_loss == "none" else "both"
        return self.inference


def _has_frames(mask: torch.Tensor) -> torch.Tensor:
    """(b, m) bool -> (b,) bool: whether a sample has any real frame."""
    return mask.any(dim=1)


def _key_padding(mask: torch.Tensor) -> torch.Tensor:
    """Key padding mask for attention (True = ignore) that never masks a whole row.

    Softmax over an all-masked row is NaN, and a sample can have zero frames (A-ME 1:
    masks from the true lengths, always). Such rows get their first position unmasked;
    the callers discard what those rows produce.
    """
    pad = ~mask  # (b, m)
    empty = ~_has_frames(mask)  # (b,)
    first = torch.zeros_like(pad)
    first[:, 0] = True
    return pad & ~(first & empty[:, None])


def pool_frames(x: torch.Tensor, mask: torch.Tensor, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, m, d), (b, m) bool -> at most `max_frames` frames: means over consecutive windows
    of w = ceil(m / max_frames) frames, counting real frames only; a window is real when it
    holds one. Frames are left-aligned (padding after the real frames), so the pooled mask is
    again a prefix: true length ceil(len / w)."""
    m = x.shape[1]
    if m <= max_frames:
        return x, mask
    w = math.ceil(m / max_frames)
    out_m = math.ceil(m / w)
    # One (b, out_m, m) averaging matrix (row i weighs the real frames of window i by 1 / their
    # count) and one batched product: the stream is read once, where padding it to whole
    # windows and weighting it copies it three times (4.5x faster on MIntRec's 477 audio frames).
    window = torch.arange(m, device=x.device) // w  # (m,)
    member = (window[None, :] == torch.arange(out_m, device=x.device)[:, None]).to(x.dtype)  # (out_m, m)
    weights = member[None] * mask.to(x.dtype)[:, None, :]  # (b, out_m, m)
    count = weights.sum(-1)  # (b, out_m)
    pooled = torch.bmm(weights / count.clamp_min(1.0)[..., None], x)
    return pooled, count > 0


def _sinusoidal(m: int, d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(m, d) fixed sinusoidal positions (Vaswani et al.); d may be odd."""
    pos = torch.arange(m, device=device, dtype=torch.float32)[:, None]  # (m, 1)
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    angles = pos * freq  # (m, ceil(d/2))
    out = torch.zeros(m, d, device=device, dtype=torch.float32)
    out[:, 0::2] = torch.sin(angles)
    out[:, 1::2] = torch.cos(angles[:, : d // 2])
    return out.to(dtype)


class NonverbalEncoder(nn.Module):
    """A-ME 1: a video or audio stream `(b, m, d_in) -> (b, m, d)`.

    Linear + LayerNorm to the text embedding size, sinusoidal positions, dropout, and
    optionally one light pre-norm Transformer layer over time (key padding from the mask).
    """

    def __init__(self, in_dim: int, d: int, *, heads: int, layer: bool, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, d)
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.layer = (nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=dropout,
                                                 activation="gelu", batch_first=True, norm_first=True)
                      if layer else None)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.proj(x))  # (b, m, d)
        h = self.dropout(h + _sinusoidal(h.shape[1], h.shape[2], h.device, h.dtype))
        if self.layer is not None:
            h = self.layer(h, src_key_padding_mask=_key_padding(mask))
        # Padded frames are zeroed so that nothing downstream can read them by accident.
        return h * mask[..., None].to(h.dtype)


def anchor_attention(attn: nn.MultiheadAttention, q: torch.Tensor, h: torch.Tensor,
                     key_padding: torch.Tensor) -> torch.Tensor:
    """`attn(q, h, h, key_padding_mask=key_padding)[0]` for few queries over long streams,
    with the key and value projections moved to the query side.

    Per head j (width e = d / H, projections W_j, biases b_j):
        Q_j K_j^T = Q_j (h W_kj^T + b_kj)^T = (Q_j W_kj) h^T + Q_j b_kj,
    and Q_j b_kj is the same for every key, so it cancels in the softmax; and since each
    row of the softmax P_j sums to 1,
        P_j V_j = P_j (h W_vj^T + b_vj) = (P_j h) W_vj^T + b_vj.
    So the (b, m, d) stream is never projected: the cost is O(b k d^2 + b H k m d) instead
    of O(b m d^2), which is what an anchor (k = 4) over 32 pooled frames per stream pays at
    every forward pass. The same function as `nn.MultiheadAttention` (the module keeps its
    parameters and its state-dict keys: checkpoints load unchanged); only the order of the
    floating-point operations differs. Attention dropout must be 0 (the module's default).

    q: (b, k, d) queries; h: (b, m, d) keys = values; key_padding: (b, m) bool, True = ignore.
    """
    if attn.dropout or not attn._qkv_same_embed_dim or attn.in_proj_bias is None or not attn.batch_first:
        raise ValueError("anchor_attention needs a batch-first nn.MultiheadAttention with packed, biased "
                         "projections and no attention dropout")
    d, heads = attn.embed_dim, attn.num_heads
    e = d // heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)  # (d, d) each: rows = output features
    b_q, _, b_v = attn.in_proj_bias.chunk(3)
    q_heads = F.linear(q, w_q, b_q).unflatten(-1, (heads, e))  # (b, k, H, e)
    q_abs = einsum(q_heads, w_k.view(heads, e, d), "b k H e, H e d -> b H k d")
    scores = einsum(q_abs, h, "b H k d, b m d -> b H k m") / math.sqrt(e)
    scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
    ctx = einsum(scores.softmax(dim=-1), h, "b H k m, b m d -> b H k d")
    v = einsum(ctx, w_v.view(heads, e, d), "b H k d, H e d -> b k H e") + b_v.view(heads, e)
    return attn.out_proj(v.flatten(-2))  # (b, k, d)


class AnchorFusion(nn.Module):
    """A-ME 4: each anchor cross-attends to every stream; a gate adds the result.

    a' = a + g * W [u_v; u_a],  g = sigmoid(G [a; u_v; u_a])
    G starts at zero weights and bias `gate_init` (g = sigmoid(gate_init) everywhere) and
    W small and bias-free: the model starts close to the text model, and a sample with
    no frames in any stream (u = 0) leaves its anchors exactly unchanged. The cross-attention
    runs as `anchor_attention` (the stream's key and value projections folded into the
    queries: the same function, a fraction of the cost).
    """

    def __init__(self, d: int, *, heads: int, streams: int, gate_init: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(d)
        self.attn = nn.ModuleList(nn.MultiheadAttention(d, heads, batch_first=True) for _ in range(streams))
        self.gate = nn.Linear((1 + streams) * d, d)
        self.out = nn.Linear(streams * d, d, bias=False)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_init)
        nn.init.normal_(self.out.weight, std=FUSION_INIT_STD)

    def forward(self, a: torch.Tensor, streams: list[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """a: (b, k, d) anchors; streams: [(h (b, m, d), mask (b, m) bool)] in build order.

        Returns the fused anchors (b, k, d) and the mean gate per anchor (b, k).
        """
        q = self.query_norm(a)  # (b, k, d)
        us = []
        for attn, (h, mask) in zip(self.attn, streams):
            u = anchor_attention(attn, q, h, _key_padding(mask))  # (b, k, d)
            us.append(torch.where(_has_frames(mask)[:, None, None], u, torch.zeros_like(u)))
        u = torch.cat(us, dim=-1)  # (b, k, s*d)
        g = torch.sigmoid(self.gate(torch.cat([a, u], dim=-1)))  # (b, k, d)
        return a + g * self.out(u), g.mean(dim=-1)


@register_method("amess")
class AMESS(IntentModel):
    """A-MESS (docs/amess-method.md): A-ME fusion into the text encoder, plus SS.

    Built by the training loop with `config` (reads `config.model`), its `settings`
    (`AmessSettings`),
    the shared `encoder`, `num_labels` C, the feature sizes of the used streams (None for
    an unused one), and `descriptions`: one string per label, or a list of strings for a
    label with several descriptions (SS 2: e_c is then the normalised mean of their
    normalised embeddings) (needed unless `amess.ss_loss=none`; without them there is no
    `desc_sims`).

    `forward` returns `IntentOutput(logits (b, C), pooled z_m (b, h), extras)` with extras:
    - `anchor_index` (b, k) long: positions in the input sequence where non-verbal
      information was injected, -1 for none (k = n in `all` mode, so its width varies
      by batch; with `learned`, positions 1..k of the lengthened sequence);
    - `gate` (b, k): mean fusion gate per anchor (only when fusion ran);
    - `z_m` (b, p): normalised projected multimodal embedding (for plots);
    - `desc_sims` (b, C): cosine similarity of z_m to each description;
    - `z_t` (b, p): normalised projected text-only view (only when the triplet loss uses it).
    and `shared["desc_emb"]` (C, p), the normalised description embeddings.
    The description keys are present whenever descriptions were given, except in training
    with `ss_loss=none` (nothing would use them).
    """

    Settings = AmessSettings
    uses_descriptions = True
    inference_settings = ("inference", "both_weight")

    def __init__(self, *, config: Config, settings: AmessSettings, encoder: TextEncoder, num_labels: int,
                 video_dim: int | None = None, audio_dim: int | None = None,
                 label_names: Sequence[str] | None = None,
                 descriptions: Sequence[str] | None = None, **_):
        super().__init__()
        cfg = settings
        self.cfg = cfg
        self.num_labels = num_labels
        self.encoder = encoder
        self.pooling = config.model.pooling
        embeddings = encoder.model.get_input_embeddings()
        d = embeddings.embedding_dim

        # A-ME 1: one encoder per non-verbal stream the run uses, in a fixed order.
        self.stream_names = [name for name, dim in (("video", video_dim), ("audio", audio_dim)) if dim is not None]
        fuse = cfg.anchor_mode != "none" and bool(self.stream_names)
        if fuse and d % cfg.fusion_heads:
            raise ValueError(f"amess.fusion_heads={cfg.fusion_heads} must divide the encoder's embedding "
                             f"size {d} ({encoder.name})")
        dims = {"video": video_dim, "audio": audio_dim}
        self.nonverbal = nn.ModuleDict({
            name: NonverbalEncoder(dims[name], d, heads=cfg.fusion_heads, layer=cfg.nonverbal_layer,
                                   dropout=config.model.dropout)
            for name in (self.stream_names if fuse else [])
        })
        self.fusion = (AnchorFusion(d, heads=cfg.fusion_heads, streams=len(self.stream_names),
                                    gate_init=cfg.gate_init) if fuse else None)
        # A-ME 3 `learned`: anchor vectors at the scale of real word embeddings.
        self.anchor_vectors = (nn.Parameter(torch.randn(cfg.num_anchors, d) * float(embeddings.weight.detach().std()))
                               if cfg.anchor_mode == "learned" else None)
        # Special-token ids are never anchors (A-ME 3).
        tok = encoder.tokenizer
        special = sorted(set(getattr(tok, "all_special_ids", None) or [])) if tok is not None else []
        self.register_buffer("special_ids", torch.tensor(special, dtype=torch.long), persistent=False)

        # A-ME 5: classifier head on the pooled multimodal representation.
        self.dropout = nn.Dropout(config.model.dropout)
        self.head = nn.Linear(encoder.hidden_size, num_labels)

        # SS 3: the text-only view differs from z_m only when non-verbal input reaches the
        # encoder; with no stream (text-only runs, anchor mode `none`) it would be z_m again
        # under other dropout, so it is skipped (its cost is a second encoder pass) unless
        # `text_only_view` asks for a dropout or momentum view in its place.
        self.fused_view = self.fusion is not None or cfg.anchor_mode == "learned"
        self.uses_text_view = cfg.text_view and (self.fused_view or cfg.text_only_view != "none")
        self._eval_desc: torch.Tensor | None = None

        # SS 2-3: description encoder and the shared space.
        self.has_descriptions = descriptions is not None
        if cfg.ss_loss != "none" and not self.has_descriptions:
            raise ValueError(f"amess.ss_loss={cfg.ss_loss!r} needs label descriptions (one per label); "
                             "give the dataset's descriptions or set amess.ss_loss=none")
        if self.has_descriptions:
            self._register_descriptions(self._label_texts(list(descriptions), label_names), num_labels,
                                        label_names)
        if cfg.ss_loss != "none":
            self.proj_utt = nn.Linear(encoder.hidden_size, cfg.proj_dim)
            self.proj_desc = self.proj_utt if cfg.shared_projection else nn.Linear(encoder.hidden_size, cfg.proj_dim)
        else:
            self.proj_utt = self.proj_desc = None
        if cfg.head_init == "descriptions":
            self._init_head_from_descriptions()
        if cfg.ss_warmup > 0:  # saved, so that a resumed run continues the ramp
            self.register_buffer("ss_step", torch.zeros((), dtype=torch.long))
        if cfg.tau_end is not None:  # saved, so that a resumed run continues the schedule
            self.register_buffer("tau_step", torch.zeros((), dtype=torch.long))
        # The margin loss compares raw cosines, so only the triplet loss can learn 1/tau; a
        # parameter without gradient would also trip DDP. Similarity inference reads it too.
        log_scale = torch.tensor(math.log(1.0 / cfg.tau))
        if cfg.learn_tau and cfg.ss_loss == "triplet":
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    # ----- SS 1-2: descriptions -------------------------------------------------------

    def _label_texts(self, descriptions: list[str | list[str]],
                     label_names: Sequence[str] | None) -> list[list[str]]:
        """The texts that stand for each label (`desc_text`): one or several per label."""
        texts = [[d] if isinstance(d, str) else list(d) for d in descriptions]
        if self.cfg.desc_text == "description":
            return texts
        if self.cfg.desc_text == "mismatched":
            if len(texts) < 2:
                raise ValueError("amess.desc_text=mismatched needs at least two labels to swap descriptions between")
            return texts[1:] + texts[:1]
        if label_names is None or len(label_names) != len(descriptions):
            raise ValueError(f"amess.desc_text={self.cfg.desc_text!r} needs the label names, one per label")
        if self.cfg.desc_text == "name":
            return [[n] for n in label_names]
        return [[f"{n}: {d}" for d in ds] for n, ds in zip(label_names, texts)]

    def _init_head_from_descriptions(self) -> None:
        """`head_init=descriptions`: head row c = P_u^T e_c at the default init's row norm."""
        if not self.has_descriptions:
            raise ValueError("amess.head_init=descriptions needs label descriptions")
        was_training = self.encoder.training
        self.encoder.eval()
        with torch.no_grad():
            pooled = self.desc_cache if self.cfg.desc_encoder == "frozen" else self._encode_descriptions()
            e = self._label_embeddings(self.proj_desc(pooled))  # (C, p)
            w = e @ self.proj_utt.weight  # (C, h)
            target = self.head.weight.norm(dim=1).mean()
            self.head.weight.copy_(w / w.norm(dim=1, keepdim=True).clamp_min(1e-12) * target)
            self.head.bias.zero_()
        self.encoder.train(was_training)

    def _register_descriptions(self, descriptions: list[list[str]], num_labels: int,
                               label_names: Sequence[str] | None) -> None:
        """Tokenise the descriptions (N >= C texts, one or more per label) once; in `frozen`
        mode also encode them once.

        `frozen` encodes with the encoder as it is now (the pretrained weights), in eval
        mode and without gradients: the same as a frozen copy of the encoder, but no copy
        is kept, so the memory cost is the (N, h) cache alone. The token ids are derived from
        the descriptions at construction and are not saved; the cache is (a reloaded run
        scores with the vectors it trained with).
        """
        if len(descriptions) != num_labels:
            raise ValueError(f"amess: {len(descriptions)} label descriptions for {num_labels} labels; "
                             "expected one per label (a string or a list of strings), in label order")
        for i, texts in enumerate(descriptions):
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                name = label_names[i] if label_names is not None else i
                raise ValueError(f"amess: the description of label {name!r} is empty or not a string")
        if self.encoder.tokenizer is None:
            raise ValueError("amess: label descriptions need the text encoder's tokenizer")
        flat = [t for texts in descriptions for t in texts]
        enc = self.encoder.tokenizer(flat, padding=True, truncation=True,
                                     max_length=self.cfg.desc_max_len, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        # (C, N) averaging matrix: row c averages the texts of label c (None: one text per label)
        if len(flat) > num_labels:
            owner = torch.tensor([c for c, texts in enumerate(descriptions) for _ in texts])
            avg = F.one_hot(owner, num_labels).t().float()
            self.register_buffer("desc_average", (avg / avg.sum(1, keepdim=True)).to(device), persistent=False)
        else:
            self.desc_average = None
        self.register_buffer("desc_input_ids", enc["input_ids"].to(device), persistent=False)  # (C, n_c)
        self.register_buffer("desc_attention_mask", enc["attention_mask"].to(device), persistent=False)
        if self.cfg.desc_encoder == "frozen":
            was_training = self.encoder.training
            self.encoder.eval()
            with torch.no_grad():
                cache = self._encode_descriptions()
            self.encoder.train(was_training)
            self.register_buffer("desc_cache", cache)  # (N, h)
        if self.cfg.desc_encoder == "momentum":
            # a submodule, so that it is saved, moved and reloaded with the model; never trained
            self.desc_momentum_encoder = TextEncoder(copy.deepcopy(self.encoder.model), None, self.encoder.name)
            self.desc_momentum_encoder.requires_grad_(False).eval()
        if self.cfg.desc_encoder == "momentum" or (self.cfg.desc_encoder == "shared" and self.cfg.desc_refresh > 1):
            # saved with the model, so that a resumed run reuses the same vectors at the same steps
            self.register_buffer("desc_stale", torch.zeros(len(flat), self.encoder.hidden_size, device=device))
            self.register_buffer("desc_step", torch.zeros((), dtype=torch.long, device=device))

    def _encode_descriptions(self, encoder: TextEncoder | None = None) -> torch.Tensor:
        """(N, h) pooled embeddings of the N description texts from `encoder` (default: the
        shared text encoder)."""
        encoder = self.encoder if encoder is None else encoder
        hidden = encoder(input_ids=self.desc_input_ids, attention_mask=self.desc_attention_mask)
        return encoder.pool(hidden, self.desc_attention_mask, self.pooling)

    @torch.no_grad()
    def _momentum_step(self) -> None:
        """theta_desc <- m * theta_desc + (1 - m) * theta_text (MoCo's key-encoder update)."""
        mine = [p for p in self.desc_momentum_encoder.parameters()]
        theirs = [p.detach() for p in self.encoder.parameters()]
        torch._foreach_lerp_(mine, theirs, 1.0 - self.cfg.desc_momentum)

    def describe(self) -> torch.Tensor:
        """(C, p) normalised description embeddings e_c (SS 2-3).

        At evaluation (no gradients) they are computed once and reused for every batch
        until the model goes back to training: the weights cannot change in between.
        """
        caching = not self.training and not torch.is_grad_enabled()
        if caching and self._eval_desc is not None:
            return self._eval_desc
        if self.cfg.desc_encoder == "frozen":
            pooled = self.desc_cache
        elif self.cfg.desc_encoder == "momentum":
            if self.training and torch.is_grad_enabled():
                self._momentum_step()
                if int(self.desc_step) % self.cfg.desc_refresh == 0:
                    with torch.no_grad():
                        self.desc_stale.copy_(self._encode_descriptions(self.desc_momentum_encoder))
                self.desc_step += 1
                pooled = self.desc_stale
            else:
                with torch.no_grad():
                    pooled = self._encode_descriptions(self.desc_momentum_encoder)
        elif self.cfg.desc_refresh > 1 and self.training and torch.is_grad_enabled():
            # re-encode every desc_refresh-th training step, reuse the last vectors in between
            if int(self.desc_step) % self.cfg.desc_refresh == 0:
                pooled = self._encode_descriptions()
                self.desc_stale.copy_(pooled.detach())
            else:
                pooled = self.desc_stale
            self.desc_step += 1
        else:
            pooled = self._encode_descriptions()
        e = self._label_embeddings(self.proj_desc(pooled) if self.proj_desc is not None else pooled)
        self._eval_desc = e if caching else None
        return e

    def _label_embeddings(self, e: torch.Tensor) -> torch.Tensor:
        """(N, p) embeddings of the description texts -> (C, p) normalised label embeddings:
        with several texts per label, the normalised mean of their normalised embeddings."""
        e = F.normalize(e, dim=-1)
        if self.desc_average is None:
            return e
        return F.normalize(self.desc_average.to(e.dtype) @ e, dim=-1)

    def train(self, mode: bool = True) -> "AMESS":
        if mode:
            self._eval_desc = None  # weights may change from here on
        super().train(mode)
        if getattr(self, "desc_momentum_encoder", None) is not None:
            self.desc_momentum_encoder.eval()  # no dropout: it only encodes, without gradients
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._eval_desc = None  # new weights: the evaluation cache is stale
        for counter in ("ss_step", "tau_step"):
            if hasattr(self, counter) and counter not in state_dict:
                state_dict = {**state_dict, counter: torch.zeros_like(getattr(self, counter))}
        if hasattr(self, "desc_step") and "desc_step" not in state_dict:
            # a checkpoint from before `desc_refresh` (or trained with 1): start the schedule afresh,
            # re-encoding at the next training step
            state_dict = {**state_dict, "desc_step": torch.zeros_like(self.desc_step),
                          "desc_stale": torch.zeros_like(self.desc_stale)}
        shared = self.proj_utt is not None and self.proj_desc is self.proj_utt
        if shared and any(f"proj_utt.{k}" in state_dict and f"proj_desc.{k}" in state_dict
                          and not torch.equal(state_dict[f"proj_utt.{k}"], state_dict[f"proj_desc.{k}"])
                          for k in ("weight", "bias")):
            # saved with two maps (`shared_projection` off, or from before the switch existed, whose
            # configs lack it): loading both into the one shared map would keep whichever came last,
            # so the model takes two maps, as trained
            self.proj_desc = copy.deepcopy(self.proj_utt)
            self.cfg.shared_projection = False
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """(b, h) -> (b, p) normalised utterance embedding (SS 3), for z_m and z_t alike."""
        z = self.proj_utt(pooled) if self.proj_utt is not None else pooled
        return F.normalize(z, dim=-1)

    def logit_scale(self) -> torch.Tensor:
        """1/tau of the SS similarities; a learned one is clamped to [1, MAX_LOGIT_SCALE]; a
        scheduled one (`tau_end`) is 1/tau at the current training step."""
        if isinstance(self.log_scale, nn.Parameter):
            return self.log_scale.exp().clamp(1.0, MAX_LOGIT_SCALE)
        if self.cfg.tau_end is not None:
            t = min(int(self.tau_step), self.cfg.tau_steps) / self.cfg.tau_steps
            tau = self.cfg.tau_end + (self.cfg.tau - self.cfg.tau_end) * 0.5 * (1.0 + math.cos(math.pi * t))
            return self.log_scale.new_tensor(1.0 / tau)
        return self.log_scale.exp()

    # ----- A-ME 1-5 ------------------------------------------------------------------

    def _streams(self, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Encoded streams in build order: [(h (b, m, d), mask (b, m) bool)].

        A stream the model was built with but the batch lacks (modality dropped at test
        time) counts as a stream with no frames: it contributes nothing.
        """
        out = []
        b = batch.input_ids.shape[0]
        for name in self.nonverbal:
            x, mask = getattr(batch, name), getattr(batch, f"{name}_mask")
            enc = self.nonverbal[name]
            if x is None:
                d = enc.norm.normalized_shape[0]
                out.append((batch.input_ids.new_zeros(b, 1, d, dtype=torch.float32),
                            torch.zeros(b, 1, dtype=torch.bool, device=batch.input_ids.device)))
                continue
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            mask = mask.bool()
            if self.cfg.max_frames is not None:
                x, mask = pool_frames(x, mask, self.cfg.max_frames)
            out.append((enc(x, mask), mask))
        return out

    def _candidates(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(b, n) bool: real word tokens, the only positions that may become anchors (A-ME 3)."""
        real = attention_mask.bool()
        cand = real & ~torch.isin(input_ids, self.special_ids)
        cand[:, 0] = False  # [CLS]
        last = real.long().cumsum(1).argmax(1)  # (b,) index of the last real token: [SEP]
        return cand.scatter(1, last[:, None], False)

    def _topk(self, e: torch.Tensor, cand: torch.Tensor,
              streams: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A-ME 3 `topk`: (b, k') indices and (b, k') validity, k' = min(k, n).

        Score = <E_i, summary> / sqrt(d), summary = the mean over streams with frames of
        each stream's masked mean. Invalid picks (fewer candidates than k) are marked False.
        """
        with torch.no_grad():  # only the ranking is used; it carries no gradient
            total = torch.zeros_like(e[:, 0])  # (b, d)
            count = torch.zeros_like(e[:, 0, :1])  # (b, 1)
            for h, mask in streams:
                w = mask.to(h.dtype)[..., None]  # (b, m, 1)
                total = total + (h * w).sum(1) / w.sum(1).clamp_min(1.0)
                count = count + _has_frames(mask).to(h.dtype)[:, None]
            summary = total / count.clamp_min(1.0)  # (b, d)
            scores = einsum(e, summary, "b n d, b d -> b n") / math.sqrt(e.shape[-1])
            scores = scores.masked_fill(~cand, float("-inf"))
            top, idx = scores.topk(min(self.cfg.num_anchors, e.shape[1]), dim=1)  # (b, k')
        return idx, torch.isfinite(top)

    def _fuse_in_place(self, e: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor,
                       streams: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A-ME 4-5: fuse the anchors at `idx` (b, k) and write them back into E (b, n, d).

        Written back as E + scatter_add(delta), out of place, so autograd sees every step;
        invalid anchors get a zero delta.
        """
        idx_d = repeat(idx, "b k -> b k d", d=e.shape[-1])
        a = e.gather(1, idx_d)  # (b, k, d)
        fused, gate = self.fusion(a, streams)
        delta = (fused - a) * valid[..., None].to(a.dtype)  # (b, k, d)
        return e.scatter_add(1, idx_d, delta), gate

    def forward(self, batch: Batch) -> IntentOutput:
        cfg = self.cfg
        input_ids, attention_mask, token_type_ids = batch.input_ids, batch.attention_mask, batch.token_type_ids
        b, n = input_ids.shape
        streams = self._streams(batch) if self.fusion is not None else []
        e = self.encoder.embed(input_ids)  # (b, n, d)  A-ME 2
        extras: dict[str, torch.Tensor] = {}
        shared: dict[str, torch.Tensor] = {}
        anchor_index = input_ids.new_full((b, n if cfg.anchor_mode == "all" else cfg.num_anchors), -1)

        if cfg.anchor_mode == "learned":
            # A-ME 3 `learned`: k vectors inserted after [CLS]; masks and segments lengthened.
            anchors = repeat(self.anchor_vectors, "k d -> b k d", b=b)
            if self.fusion is not None:
                anchors, extras["gate"] = self.fusion(anchors, streams)
            k = anchors.shape[1]
            e = torch.cat([e[:, :1], anchors, e[:, 1:]], dim=1)  # (b, n + k, d)
            attention_mask = torch.cat([attention_mask[:, :1], attention_mask.new_ones(b, k),
                                        attention_mask[:, 1:]], dim=1)
            if token_type_ids is not None:
                token_type_ids = torch.cat([token_type_ids[:, :1], token_type_ids.new_zeros(b, k),
                                            token_type_ids[:, 1:]], dim=1)
            anchor_index = repeat(torch.arange(1, k + 1, device=input_ids.device), "k -> b k", b=b)
        elif cfg.anchor_mode in ("topk", "all") and self.fusion is not None:
            cand = self._candidates(input_ids, attention_mask)  # (b, n)
            if cfg.anchor_mode == "topk":
                idx, valid = self._topk(e, cand, streams)
            else:
                idx, valid = repeat(torch.arange(n, device=e.device), "n -> b n", b=b), cand
            e, extras["gate"] = self._fuse_in_place(e, idx, valid, streams)
            anchor_index[:, : idx.shape[1]] = torch.where(valid, idx, torch.full_like(idx, -1))
        extras["anchor_index"] = anchor_index

        hidden = self.encoder(inputs_embeds=e, attention_mask=attention_mask,
                              token_type_ids=token_type_ids)  # (b, n, h)  A-ME 5
        pooled = self.encoder.pool(hidden, attention_mask, self.pooling)  # (b, h) = z_m
        logits = self.head(self.dropout(pooled))  # (b, C)

        if self.has_descriptions and (cfg.ss_loss != "none" or not self.training):
            desc = self.describe()  # (C, p)
            z_m = self.project(pooled)  # (b, p)
            extras.update(z_m=z_m, desc_sims=z_m @ desc.t())
            shared["desc_emb"] = desc
            if cfg.ss_loss == "triplet" and self.uses_text_view and self.training:
                # SS 3: the text-only view, the same encoder on the text alone (a training
                # signal only: skipped at evaluation, where no loss is computed).
                # On text alone (`text_only_view`): a second dropout draw of the same encoder,
                # or the momentum copy (eval mode, never trained).
                view_encoder = (self.desc_momentum_encoder
                                if not self.fused_view and cfg.text_only_view == "momentum" else self.encoder)
                with torch.set_grad_enabled(cfg.text_view_grad and view_encoder is self.encoder):
                    text_hidden = view_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                               token_type_ids=batch.token_type_ids)
                    text_pooled = view_encoder.pool(text_hidden, batch.attention_mask, self.pooling)
                extras["z_t"] = self.project(text_pooled)
        return IntentOutput(logits=logits, pooled=pooled, extras=extras, shared=shared)

    # ----- SS 4-6: loss and inference ----------------------------------------------

    def loss(self, out: IntentOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """SS 5: CE(head(z_m), y) + ss_lambda * L_SS, on in-scope rows only (label < C)."""
        keep = batch.labels < self.num_labels
        parts: dict[str, float] = {}
        if "gate" in out.extras:
            parts["gate"] = float(out.extras["gate"].detach().mean())
        if not bool(keep.any()):
            return out.logits.sum() * 0.0, {**parts, "ce": 0.0}
        y = batch.labels[keep]
        ce = F.cross_entropy(out.logits[keep], y)
        parts["ce"] = float(ce.detach())
        if self.cfg.ss_loss == "none":
            return ce, parts
        z_m, desc = out.extras["z_m"][keep], out.shared["desc_emb"]
        scale = self.logit_scale()
        if self.cfg.ss_loss == "triplet":
            z_t = out.extras["z_t"][keep] if "z_t" in out.extras else None  # absent at evaluation
            ss = triplet_contrastive(z_m, z_t, desc, y, 1.0 / scale, text_view=z_t is not None,
                                     positives=self.cfg.ss_positives, symmetric=self.cfg.ss_symmetric)
        else:
            ss = margin_triplet(z_m, desc, y, self.cfg.margin)
        weight = self.cfg.ss_lambda
        if self.cfg.ss_warmup > 0:
            weight *= min(1.0, (int(self.ss_step) + 1) / self.cfg.ss_warmup)
            if self.training and torch.is_grad_enabled():
                self.ss_step += 1
            parts["ss_weight"] = weight
        if self.cfg.tau_end is not None and self.training and torch.is_grad_enabled():
            self.tau_step += 1
        parts.update(ss=float(ss.detach()), scale=float(scale.detach()))
        return ce + weight * ss, parts

    def _scaled_sims(self, out: IntentOutput) -> torch.Tensor:
        """(b, C) cosine similarities to the descriptions times 1/tau: the similarity view's logits."""
        return out.extras["desc_sims"].float() * self.logit_scale()

    def decision_logits(self, out: IntentOutput) -> torch.Tensor:
        """SS 6: the logits whose softmax is the scores (`predict_scores`, the base class's) and
        what out-of-scope detectors read: the head's (`head`), the scaled similarities
        (`similarity`), or, for `both`, the log of the mixed probabilities (1 - w) * softmax(head)
        + w * softmax(similarities), w = `both_weight`, shifted per row by the two views'
        log-sum-exps, weighted alike.

        The shift leaves the softmax (the prediction) unchanged, but keeps the logits' scale: the
        plain log of a probability vector has a log-sum-exp of 0 for every row, so the energy
        detector would score every utterance alike. With the shift the energy of `both` is the
        weighted mean of the head's and the similarities' energies, and MaxLogit reads a logit-sized value.
        """
        mode = self.cfg.inference_mode
        if mode == "head":
            return out.logits
        sims = self._scaled_sims(out)
        if mode == "similarity":
            return sims
        head, w = out.logits.float(), self.cfg.both_weight
        if w in (0.0, 1.0):  # one view only: its own logits
            return sims if w == 1.0 else head
        # log((1 - w) * softmax(head) + w * softmax(sims)) in log space, then the shift: the
        # views' log-sum-exps weighted alike
        lse_h, lse_s = head.logsumexp(dim=-1, keepdim=True), sims.logsumexp(dim=-1, keepdim=True)
        mixed = torch.logaddexp(head - lse_h + math.log1p(-w), sims - lse_s + math.log(w))
        return mixed + (1.0 - w) * lse_h + w * lse_s

    def token_highlights(self, out: IntentOutput) -> torch.Tensor | None:
        """The anchor words (A-ME 3); learned anchors are not words of the input: None."""
        return None if self.cfg.anchor_mode == "learned" else out.extras.get("anchor_index")

    def diagnostics(self, d) -> None:
        """A 2-D projection of z_m with the label descriptions marked (`embeddings`), and the
        tokens chosen as anchors for a few samples (`anchors`); learned anchor slots sit after
        [CLS] and are drawn there as `[anchor]`."""
        from amess import plots

        res = d.result
        if "z_m" in res.extras:
            d.save(plots.embedding_projection(res.extras["z_m"], res.labels, res.shared.get("desc_emb"),
                                              d.label_names, seed=d.seed), "embeddings")
        if "anchor_index" in res.extras and (res.extras["anchor_index"] >= 0).any():
            inserted = self.cfg.num_anchors if self.cfg.anchor_mode == "learned" else 0
            tok = self.encoder.tokenizer
            names = list(d.label_names) + ["UNK"]
            picked = d.samples[:6]
            tokens = [tok.convert_ids_to_tokens(tok(s.text, s.context, truncation=True,
                                                    max_length=d.text_max_len)["input_ids"]) for s in picked]
            tokens = [t[:1] + ["[anchor]"] * inserted + t[1:] for t in tokens]
            anchors = [[int(a) for a in row if a >= 0] for row in res.extras["anchor_index"][: len(picked)]]
            titles = [f"{s.id} (gold {names[s.label]}, predicted {names[int(p)]})" for s, p in zip(picked, res.preds)]
            d.save(plots.anchor_tokens(tokens, anchors, titles), "anchors")
