"""TCL-MAP: token-level contrastive learning with modality-aware prompting (Zhou et al., AAAI 2024).

Our own implementation of the official code, thuiar/TCL-MAP (cited by file below:
`model.py`, `AlignNets.py`, `loss.py`, `manager.py` under `methods/TCL_MAP/`,
`transformer.py` under its `SubNets/transformers_encoder/`, `data/text_pre.py`,
`data/__init__.py`, `configs/TCL_MAP_MIntRec.py`). Read top to bottom: the template
(collator hook), the alignment modules, the cross-modal encoder, the MAP module, MAG, then
the model and its loss.

The method (model.py `TCL_MAP`, `MAP_Model`, `MAP`, `Cons_Model`; manager.py `_train`):
1. Template (text_pre.py `convert_examples_to_features`): `[CLS] text P_1..P_p M_1..M_l [SEP]`,
   p = `prompt_len` prompt slots, l = `label_len` [MASK] slots. The augmented view is the
   same sequence with the gold label's word pieces written into the l slots.
2. MAP, modality-aware prompting (model.py `MAP.forward`): learned vectors ctx (p, d); video
   and audio are aligned to the p prompt slots by similarity (AlignNets.py `SimModule`: a CTC
   soft alignment of the frames to `align_len` slots, cosine similarity of those slots to the
   (aligned) ctx, a small gating MLP); a cross-modal Transformer (MulT's encoder: 5 pre-norm
   layers, 8 heads, a causal mask) reads the projected ctx as queries, aligned video as keys
   and aligned audio as values; prompt = text_proj(ctx) + gamma * out_proj(result), gamma
   starting at 1e-4. The prompt replaces the embedding output at the p prompt positions.
3. MAG, MAG-BERT's multimodal adaptation gate (model.py `MAG`), on the whole embedding output
   with video and audio CTC-aligned to the token positions; then the encoder's layers, its
   pretrained pooler, dropout and a linear classifier.
4. The augmented view goes through a second copy of the encoder (model.py `Cons_Model`, loaded
   from the same checkpoint, so it starts equal and then trains apart), with the same
   generated prompt in its prompt slots (gradients reach MAP from both views) and no MAG.
5. Loss (manager.py): CE(logits, y) + tcl_weight * NT-Xent(m, t) with temperature 0.5, m the mean
   of the l [MASK] states of the main view, t the mean of the l label-slot states of the
   augmented view. loss.py `SupConLoss` is called without labels: SimCLR's NT-Xent, in which
   each m_i has t_i as its only positive and the other 2b - 2 vectors of the batch as negatives.

There is no label-token *prediction*: the reference's models are bare BERT encoders and never
call a masked-LM head; label tokens only enter as inputs of the augmented view, and their
hidden states are the contrastive targets. So the MLM head is not loaded, and an encoder
whose MLM head would start un-pretrained (the packaged MiniLM) loses nothing here. The
classifier reads the checkpoint's pooler, as `MAP_Model` does: the encoder part `pooler` is
required (MiniLM and BERT checkpoints have one; an encoder saved without one is refused at
loading with a message that says so).

Label words are our reader's label names in our label order (`Emotion` / `Goal` in MIntRec's
binary task, any names in `custom`), tokenised by the run's tokenizer when the model is built.
TCL-MAP's label ids are never used (its MIntRec list, data/__init__.py, orders Care before
Agree: a different id order). A label of k <= l word pieces fills the first k slots and the
others hold the mask token; the representation is the mean over all l slots in both views, as
in the reference. A label of more than l pieces is an error that names it and the
`--set tcl_map.label_len=N` that fits.

Deviations from the reference, each with the file it concerns:
- Mask token (text_pre.py): the reference writes the string 'MASK', which BERT's WordPiece maps
  to [UNK] (id 100), for the prompt placeholders and for the padding of short labels in the
  augmented view. We use the tokenizer's own `mask_token` (id 103 in BERT) everywhere. The
  prompt placeholders are overwritten by the prompt, so only the augmented view's padding
  slots see a different token: [MASK] instead of [UNK].
- Length budget (text_pre.py): the text keeps `text_max_len` tokens including its special
  tokens, as every method's collator gives them; the template adds p + l, so a sequence holds at
  most text_max_len + p + l tokens (the reference's `max_cons_seq_length`, 37 on MIntRec),
  computed explicitly and checked against the encoder's maximum positions. A text at exactly
  the maximum length is the edge case of this budget and is tested. Batches are padded to
  their longest template, not to the maximum.
- Labels longer than `label_len` (text_pre.py): there, `(label_len - len(condition))` goes
  negative and the padding assertion fails; here a ValueError names the label.
- Masks (AlignNets.py, mm_pre.py): the reference pads video to 230 and audio to 480 frames with
  zeros and passes no mask. We pad per batch and build masks from the true lengths. Frames
  enter TCL-MAP only through the CTC soft alignment, a sum over frames of each frame's
  assignment to the slots: padded frames are zeroed and weighted 0, and since the CTC LSTM
  runs forward in time over end-padded sequences, a real frame's assignment never depends on
  the padding after it. So padding frames change nothing (tested), and the modality-aware
  prompt never attends over frames: its cross-modal attention reads the p slots that the
  similarity alignment made from those sums. A sample without frames of a stream gets
  all-zero slots (what the reference computes from its all-zero padding; finite), and its
  MAG term for that stream is zeroed (the reference cannot tell such a sample apart and adds
  the layers' biases). A stream the model was built with but the batch lacks counts as a
  stream without frames.
- Slot count (AlignNets.py `AlignSubNet`, `dst_len` = `max_cons_seq_length`): `align_len`,
  None = text_max_len + p + l with text_max_len from `data.text_max_len` or the dataset
  reader's default (the model is not given the resolved length: a gap in the method seam;
  a reader whose defaults depend on its folder, like `custom`, is taken at
  `FALLBACK_TEXT_LEN`, its actual default). MAG uses the first n slots for a batch of n
  template positions (the reference always used all of them, its text padded to that many).
  The CTC alignment of the text (`ctc_t`), built but never used by the reference's MAG
  (its text is always of the slot length), is not built.
- One stream (model.py `MAP.forward` takes video as keys and audio as values): with text +
  video or text + audio, that stream is both keys and values, and MAG sums over the present
  streams. Text alone is refused.
- Positions (transformer.py `SinusoidalPositionalEmbedding`): fairseq's token-id logic makes a
  slot whose first feature is exactly 0.0 "padding" (position 0, zero vector); we always use
  positions 1..m, with the same sin/cos formula.
- Initialisation (model.py `from_pretrained` under transformers 4.30): the reference's new
  Linear layers got N(0, initializer_range = 0.02) and zero biases, LayerNorms (1, 0), LSTMs
  and attention in-projections their PyTorch defaults, ctx a truncated normal, gamma 1e-4 and
  the similarity scales log(1/0.07). We build the new parts as plain nn.Modules and do the
  same in the constructor, then check that every parameter is finite (offline.md: transformers
  5 leaves new parameters of a `PreTrainedModel` subclass uninitialised).
- Evaluation (manager.py `_get_outputs`): the reference also runs the augmented view at
  evaluation, where nothing reads it; we skip it (and skip it in training too when
  `tcl_weight` is 0).
- Out-of-scope rows (MIntRec2.0 with `--outlier-exposure`): they have no label words, so they
  get no augmented view and stay out of CE and NT-Xent; the loop's outlier-exposure term reads
  their logits. The reference has no out-of-scope rows.
- Multi-turn context (the reference has none): the slots follow the whole encoded pair
  (`[CLS] text [SEP] context` + slots + `[SEP]`), in the context's segment.
- The augmented view's encoder copy has no pooler (the reference computes and discards it);
  `shared_cons_encoder` (not in the reference) runs both views through one encoder.
- Training loop (manager.py, configs/TCL_MAP_MIntRec.py): ours is the one loop of every
  method. The reference trains every parameter at lr 2e-5, weight decay 0.1, warm-up 0.1, no
  gradient clipping, transformers' AdamW without bias correction, batch 16, up to 100 epochs,
  patience 8 on macro F1. Closest here: `--lr 2e-5 --encoder-lr 2e-5 --epochs 100 --set
  train.weight_decay=0.1 --set train.grad_clip=0`. Both encoder copies take the encoder LR.
- Sizes: feature sizes come from the data and d from the encoder (384 for MiniLM, 768 for
  BERT base): nothing assumes 768; `nheads` must divide d.

Cost: two encoder passes per training step (one at evaluation), plus four 2-layer LSTMs over
the frames (a similarity and a MAG alignment per stream).

einops legend:
    b  batch                n  template tokens (text + p prompt slots + l label slots)
    m  frames of a stream   e  a stream's feature size
    d  encoder hidden size  p  prompt slots (`prompt_len`)      l  label slots (`label_len`)
    s  alignment slots (`align_len`)     c  similarity space (`shared_dim`)     C  intent labels
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import einsum, repeat
from torch import nn

from amess.config import Config
from amess.data.batch import Batch, Sample
from amess.models.base import IntentModel, IntentOutput, autocast_off, register_method
from amess.models.encoders import TextEncoder, check_finite

log = logging.getLogger(__name__)

GAMMA_INIT = 1e-4
"""Initial scale of the generated part of the prompt (model.py `MAP.gamma`)."""
SIM_SCALE_INIT = 1 / 0.07
"""Initial logit scale of the similarity alignment (AlignNets.py `SimModule.logit_scale`, CLIP's)."""
MAG_EPS = 1e-6
"""Guard of MAG's norm ratio (model.py `MAG.forward`)."""
FALLBACK_TEXT_LEN = 50
"""Text length for `align_len` when neither `data.text_max_len` nor a reader-level default is
known (readers whose defaults depend on their folder: `custom`, whose default it is)."""
STREAMS = ("video", "audio")
"""The non-verbal streams, in the order the MAP encoder reads them (keys, values)."""
TEMPLATE_KEYS = ("tcl_input_ids", "tcl_attention_mask", "tcl_token_type_ids", "tcl_mask_pos")


@dataclass
class TclMapSettings:
    """TCL-MAP hyper-parameters; defaults are the reference's MIntRec config
    (configs/TCL_MAP_MIntRec.py, data/__init__.py `label_len`)."""

    prompt_len: int = 3
    """p, the number of modality-aware prompt slots in the template."""
    label_len: int = 4
    """l, the [MASK] slots that hold the label's word pieces in the augmented view; must be at
    least the longest label's piece count (4 for MIntRec: 'Apologise' is ap ##olo ##gis ##e)."""
    temperature: float = 0.5
    """Temperature of the token-level NT-Xent loss."""
    tcl_weight: float = 1.0
    """Weight of the token-level contrastive loss: L = CE + tcl_weight * NT-Xent (1 in the reference)."""
    nheads: int = 8
    """Attention heads of the cross-modal prompt encoder; must divide the encoder's hidden size."""
    n_levels: int = 5
    """Layers of the cross-modal prompt encoder."""
    attn_dropout: float = 0.1
    """Dropout on the cross-modal attention weights."""
    relu_dropout: float = 0.0
    """Dropout after the ReLU of the cross-modal encoder's feed-forward block."""
    res_dropout: float = 0.1
    """Dropout on each residual branch of the cross-modal encoder."""
    embed_dropout: float = 0.2
    """Dropout on the cross-modal encoder's scaled, position-encoded inputs."""
    attn_mask: bool = True
    """Causal mask in the cross-modal attention (prompt slot i reads aligned slots <= i), as in the reference."""
    shared_dim: int = 256
    """c, the space in which the similarity alignment compares prompt slots and aligned frames."""
    eps: float = 1e-9
    """Norm guard of the similarity alignment's cosine."""
    align_len: int | None = None
    """s, the CTC alignment slots (the reference's max_cons_seq_length); None = text max length
    + prompt_len + label_len, the longest template (37 on MIntRec, 57 on MIntRec2.0)."""
    beta_shift: float = 0.006
    """MAG's beta: the non-verbal shift is at most beta_shift times the embedding's norm."""
    mag_dropout: float = 0.5
    """Dropout after MAG's LayerNorm (the reference's dropout_prob)."""
    shared_cons_encoder: bool = False
    """Run the augmented view through the main encoder instead of a second copy (not in the
    reference: half the encoder memory, one set of encoder weights)."""

    def __post_init__(self) -> None:
        positive = {"prompt_len": self.prompt_len, "label_len": self.label_len, "nheads": self.nheads,
                    "n_levels": self.n_levels, "shared_dim": self.shared_dim}
        for name, v in positive.items():
            if v < 1:
                raise ValueError(f"tcl_map.{name} must be >= 1, got {v}")
        for name in ("attn_dropout", "relu_dropout", "res_dropout", "embed_dropout", "mag_dropout"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"tcl_map.{name} must lie in [0, 1), got {v}")
        if not self.temperature > 0:
            raise ValueError(f"tcl_map.temperature must be > 0, got {self.temperature}")
        if not self.tcl_weight >= 0:
            raise ValueError(f"tcl_map.tcl_weight must be >= 0, got {self.tcl_weight}")
        if not self.beta_shift >= 0:
            raise ValueError(f"tcl_map.beta_shift must be >= 0, got {self.beta_shift}")
        if not self.eps > 0:
            raise ValueError(f"tcl_map.eps must be > 0, got {self.eps}")
        if self.align_len is not None and self.align_len < 2:
            raise ValueError(f"tcl_map.align_len must be >= 2 (or null: derived), got {self.align_len}")


# ----- the template (text_pre.py) ------------------------------------------------------


class TemplateHook:
    """Collator hook: the TCL-MAP template from the collator's encoded text.

    The collator gives `[CLS] text [SEP]` (or `[CLS] text [SEP] context [SEP]`), truncated to
    `text_max_len`; the hook inserts p + l mask tokens before the closing special token and
    adds to `batch.extras`:
    - `tcl_input_ids`, `tcl_attention_mask`, `tcl_token_type_ids`: (b, n) long, n = the
      batch's longest input + p + l (the slots take the closing token's segment);
    - `tcl_mask_pos`: (b,) long, the position of the first label slot (the reference's
      `condition_idx`); the prompt slots are the p positions before it.
    A plain class (not a closure), so that loader workers can pickle it.
    """

    def __init__(self, *, prompt_len: int, label_len: int, mask_id: int, pad_id: int):
        self.prompt_len = prompt_len
        self.label_len = label_len
        self.mask_id = mask_id
        self.pad_id = pad_id

    def __call__(self, samples: Sequence[Sample], batch: Batch) -> None:
        ids, real = batch.input_ids, batch.attention_mask.long()
        types = batch.token_type_ids if batch.token_type_ids is not None else torch.zeros_like(ids)
        k = self.prompt_len + self.label_len
        last = real.sum(1, keepdim=True) - 1  # (b, 1) position of the closing special token
        if bool((last < 0).any()):
            i = int((last[:, 0] < 0).nonzero()[0])
            raise ValueError(f"tcl_map: sample {batch.ids[i]!r} was encoded to no token at all")
        pos = torch.arange(ids.shape[1] + k)[None]  # (1, n)
        closing, segment = ids.gather(1, last), types.gather(1, last)  # (b, 1)
        body, slots, close = pos < last, (pos >= last) & (pos < last + k), pos == last + k
        padded_ids = F.pad(ids, (0, k), value=self.pad_id)  # (b, n)
        padded_types = F.pad(types, (0, k), value=0)
        tail = torch.where(slots, self.mask_id, torch.where(close, closing, self.pad_id))  # (b, n)
        batch.extras["tcl_input_ids"] = torch.where(body, padded_ids, tail)
        batch.extras["tcl_attention_mask"] = (pos <= last + k).long()
        batch.extras["tcl_token_type_ids"] = torch.where(body, padded_types, torch.where(slots | close, segment, 0))
        batch.extras["tcl_mask_pos"] = (last[:, 0] + self.prompt_len).long()


# ----- small pure functions -------------------------------------------------------------


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent between two views (loss.py `SupConLoss` without labels, mode 'all').

    a, b: (k, d), row i of `a` and row i of `b` a positive pair; both are L2-normalised here.
    Each of the 2k vectors is scored against the 2k - 1 others; returns the mean over them.
    """
    z = F.normalize(torch.cat([a, b], dim=0), dim=-1)  # (2k, d)
    k = a.shape[0]
    sims = (z @ z.t()) / temperature  # (2k, 2k)
    sims = sims.masked_fill(torch.eye(2 * k, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(k, 2 * k), torch.arange(k)]).to(z.device)
    return F.cross_entropy(sims, target)


def _unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / max(|x|, eps) along the last dim (AlignNets.py `SimModule`)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def _positions(m: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """(m, d) sinusoidal positions 1..m in MulT/fairseq's layout: sines, then cosines."""
    half = d // 2
    step = math.log(10000.0) / max(half - 1, 1)
    freq = torch.exp(torch.arange(half, device=like.device, dtype=torch.float32) * -step)  # (d/2,)
    angles = torch.arange(1, m + 1, device=like.device, dtype=torch.float32)[:, None] * freq[None]  # (m, d/2)
    out = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(out, (0, d % 2)).to(like.dtype)  # odd d: a zero column, as fairseq


def _take(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """h (b, n, d), idx (b, k) -> (b, k, d): the states at the given positions."""
    return h.gather(1, repeat(idx, "b k -> b k d", d=h.shape[-1]))


def _put(h: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """h (b, n, d) with positions idx (b, k) replaced by values (b, k, d), out of place."""
    return h.scatter(1, repeat(idx, "b k -> b k d", d=h.shape[-1]), values)


def _init_new(module: nn.Module, std: float) -> None:
    """What `from_pretrained` of transformers 4.30 did to the reference's new parts: Linear
    weights N(0, std) with zero biases, LayerNorms (1, 0); LSTMs and attention in-projections
    keep their PyTorch initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----- alignment (AlignNets.py) ---------------------------------------------------------


class CTCAlign(nn.Module):
    """Soft alignment of a stream to s slots (AlignNets.py `CTCModule`).

    A 2-layer LSTM gives each frame scores over s slots plus a blank (index 0); their softmax
    assigns the frame to slots, and slot j is the assignment-weighted sum of the frames:
    `(b, m, e) -> (b, s, e)`. Padded frames are zeroed and weighted 0.
    """

    def __init__(self, in_dim: int, slots: int):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, slots + 1, num_layers=2, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        with autocast_off(x.device):  # a float32 LSTM under mixed precision (see `autocast_off`)
            scores, _ = self.lstm(x.float())  # (b, m, s + 1)
        assign = scores.softmax(dim=-1)[..., 1:]  # (b, m, s), blank dropped
        if mask is not None:
            assign = assign * mask[..., None].to(assign.dtype)
        return einsum(assign, x, "b m s, b m e -> b s e")


class SimAlign(nn.Module):
    """Similarity-based alignment of a stream to p reference slots (AlignNets.py `SimModule`).

    The stream is CTC-aligned to s slots; the slots' cosine similarities to the references,
    scaled by a learned logit scale and softmaxed over the slots, pass a gating MLP over the
    slot axis (s -> s/2 -> s, sigmoid) whose outputs weight the slots: `(b, m, e), (b, p, d)
    -> (b, p, e)`.
    """

    def __init__(self, in_dim: int, ref_dim: int, *, shared_dim: int, slots: int, eps: float):
        super().__init__()
        self.ctc = CTCAlign(in_dim, slots)
        self.eps = eps
        self.logit_scale = nn.Parameter(torch.tensor(math.log(SIM_SCALE_INIT)))
        self.proj_x = nn.Linear(in_dim, shared_dim)
        self.proj_ref = nn.Linear(ref_dim, shared_dim)
        self.fc1 = nn.Linear(slots, round(slots / 2))
        self.fc2 = nn.Linear(round(slots / 2), slots)

    def forward(self, x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        slots = self.ctc(x, mask)  # (b, s, e)
        xs = _unit(self.proj_x(slots), self.eps)  # (b, s, c)
        rs = _unit(self.proj_ref(ref), self.eps)  # (b, p, c)
        sims = self.logit_scale.exp() * einsum(rs, xs, "b p c, b s c -> b p s")
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(sims.softmax(dim=-1)))))  # (b, p, s)
        return einsum(weights, slots, "b p s, b s e -> b p e")


# ----- the cross-modal prompt encoder (transformer.py, MulT's) ---------------------------


class CrossModalLayer(nn.Module):
    """Pre-norm layer: queries attend to keys/values (one LayerNorm for all three, as there),
    then a ReLU feed-forward block of width 4d; dropout on each residual branch."""

    def __init__(self, d: int, *, heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=attn_dropout, batch_first=True)
        self.norm_attn = nn.LayerNorm(d)
        self.norm_ff = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.relu_dropout = relu_dropout
        self.res_dropout = res_dropout

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                causal: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.norm_attn(x), self.norm_attn(k), self.norm_attn(v)
        a, _ = self.attn(q, k, v, attn_mask=causal, need_weights=False)  # (b, p, d)
        x = x + F.dropout(a, self.res_dropout, self.training)
        h = F.dropout(F.relu(self.fc1(self.norm_ff(x))), self.relu_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.res_dropout, self.training)


class CrossModalEncoder(nn.Module):
    """MulT's TransformerEncoder with separate key and value streams: inputs scaled by sqrt(d)
    plus sinusoidal positions, dropout, `layers` CrossModalLayers, a final LayerNorm.
    `(b, p, d), (b, p', d), (b, p', d) -> (b, p, d)`."""

    def __init__(self, d: int, *, heads: int, layers: int, attn_dropout: float, relu_dropout: float,
                 res_dropout: float, embed_dropout: float, causal: bool):
        super().__init__()
        self.layers = nn.ModuleList(CrossModalLayer(d, heads=heads, attn_dropout=attn_dropout,
                                                    relu_dropout=relu_dropout, res_dropout=res_dropout)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.embed_dropout = embed_dropout
        self.causal = causal

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = math.sqrt(x.shape[-1]) * x + _positions(x.shape[1], x.shape[2], x)
        return F.dropout(x, self.embed_dropout, self.training)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x, k, v = self._embed(q), self._embed(k), self._embed(v)
        causal = None
        if self.causal:  # transformer.py `buffered_future_mask`: True = may not attend
            p, pk = x.shape[1], k.shape[1]
            causal = torch.ones(p, pk, dtype=torch.bool, device=x.device).triu(1 + abs(pk - p))
        for layer in self.layers:
            x = layer(x, k, v, causal)
        return self.norm(x)


# ----- MAP and MAG (model.py) ------------------------------------------------------------


class ModalityAwarePrompt(nn.Module):
    """MAP (model.py `MAP.forward`): the streams of a batch of b -> (b, p, d) prompt embeddings.

    ctx (p, d) is aligned to itself (`align_text`), each stream to the aligned ctx
    (`align[name]`), each aligned stream projected to d; the cross-modal encoder reads
    text_proj(ctx) as queries, video as keys and audio as values (one stream: both);
    prompt = text_proj(ctx) + gamma * out_proj(encoded).
    """

    def __init__(self, d: int, dims: dict[str, int], cfg: TclMapSettings, slots: int):
        super().__init__()
        self.ctx = nn.Parameter(nn.init.trunc_normal_(torch.empty(cfg.prompt_len, d)))
        self.align_text = SimAlign(d, d, shared_dim=cfg.shared_dim, slots=slots, eps=cfg.eps)
        self.align = nn.ModuleDict({name: SimAlign(e, d, shared_dim=cfg.shared_dim, slots=slots, eps=cfg.eps)
                                    for name, e in dims.items()})
        self.proj = nn.ModuleDict({name: nn.Sequential(nn.LayerNorm(e), nn.Linear(e, d), nn.LayerNorm(d))
                                   for name, e in dims.items()})
        self.text_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        self.out_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        self.encoder = CrossModalEncoder(d, heads=cfg.nheads, layers=cfg.n_levels, attn_dropout=cfg.attn_dropout,
                                         relu_dropout=cfg.relu_dropout, res_dropout=cfg.res_dropout,
                                         embed_dropout=cfg.embed_dropout, causal=cfg.attn_mask)
        self.gamma = nn.Parameter(torch.full((d,), GAMMA_INIT))

    def forward(self, streams: dict[str, tuple[torch.Tensor, torch.Tensor]], b: int) -> torch.Tensor:
        ctx = self.ctx[None]  # (1, p, d): the same for every sample, aligned once
        ref = self.align_text(ctx, ctx)  # (1, p, d)
        aligned = [self.proj[name](self.align[name](x, repeat(ref, "1 p d -> b p d", b=b), mask))
                   for name, (x, mask) in streams.items()]  # [(b, p, d)] in STREAMS order
        keys, values = aligned[0], aligned[-1]
        query = repeat(self.text_proj(ctx), "1 p d -> b p d", b=b)
        return query + self.out_proj(self.encoder(query, keys, values)) * self.gamma  # (b, p, d)


class MAG(nn.Module):
    """MAG-BERT's multimodal adaptation gate over the embedding output (model.py `MAG`):
    streams CTC-aligned to the token positions, h_m = sum over streams of
    ReLU(W_h [x; e]) * W x, e' = dropout(LN(e + min(beta * |e| / |h_m|, 1) * h_m)).
    `(b, n, d) -> (b, n, d)`; a stream's term is zero for a sample without frames of it."""

    def __init__(self, d: int, dims: dict[str, int], *, slots: int, beta_shift: float, dropout: float):
        super().__init__()
        self.align = nn.ModuleDict({name: CTCAlign(e, slots) for name, e in dims.items()})
        self.gate = nn.ModuleDict({name: nn.Linear(e + d, d) for name, e in dims.items()})
        self.shift = nn.ModuleDict({name: nn.Linear(e, d) for name, e in dims.items()})
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.beta_shift = beta_shift

    def forward(self, e: torch.Tensor, streams: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        n = e.shape[1]
        h_m = torch.zeros_like(e)
        for name, (x, mask) in streams.items():
            x = self.align[name](x, mask)[:, :n]  # (b, n, e_name): slot j for token position j
            term = F.relu(self.gate[name](torch.cat([x, e], dim=-1))) * self.shift[name](x)  # (b, n, d)
            h_m = h_m + term * mask.any(dim=1)[:, None, None].to(term.dtype)
        e_norm, h_norm = e.norm(dim=-1), h_m.norm(dim=-1)  # (b, n)
        h_norm = torch.where(h_norm == 0, torch.ones_like(h_norm), h_norm)
        alpha = (e_norm / (h_norm + MAG_EPS) * self.beta_shift).clamp(max=1.0)[..., None]
        return self.dropout(self.norm(alpha * h_m + e))


# ----- the model --------------------------------------------------------------------------


def _default_text_len(config: Config) -> int:
    """The text max length the collator will use: `data.text_max_len`, else the default of the
    dataset's reader when it is a class attribute, else `FALLBACK_TEXT_LEN`."""
    if config.data.text_max_len:
        return config.data.text_max_len
    from amess.data import DATASETS

    spec = getattr(DATASETS.get(config.data.dataset), "spec", None)
    return int(getattr(spec, "text_max_len", FALLBACK_TEXT_LEN))


@register_method("tcl_map")
class TCLMAP(IntentModel):
    """TCL-MAP (Zhou et al., AAAI 2024): modality-aware prompt + MAG, token-level contrastive loss.

    Built with `config`, its `settings` (`TclMapSettings`), the `encoder` (with its pretrained
    pooler), `num_labels` C, the feature sizes of the used streams (at least one) and the
    `label_names` (tokenised into label words). Batches must come from a collator with this
    method's hook (`TemplateHook`).

    `forward` returns `IntentOutput(logits (b, C), pooled (b, d) = the pooler's output, extras)`:
    - `mask_repr` (b, d): the mean of the l [MASK] states of the main view;
    - `label_repr` (b, d), training only (and `tcl_weight` > 0): the mean of the l label-slot
      states of the augmented view; zero rows for out-of-scope rows, which have no label words.
    """

    Settings = TclMapSettings
    reads = ("text", "video", "audio")
    requires = ("text",)
    needs_nonverbal = True
    encoder_parts = ("pooler",)

    @classmethod
    def collate_hook(cls, settings: TclMapSettings, tokenizer, text_max_len: int) -> TemplateHook:
        if tokenizer is None or getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError("tcl_map: the text encoder's tokenizer has no mask token; TCL-MAP's template needs "
                             "one (use a BERT-family encoder)")
        return TemplateHook(prompt_len=settings.prompt_len, label_len=settings.label_len,
                            mask_id=int(tokenizer.mask_token_id), pad_id=int(tokenizer.pad_token_id or 0))

    def __init__(self, *, config: Config, settings: TclMapSettings, encoder: TextEncoder, num_labels: int,
                 video_dim: int | None = None, audio_dim: int | None = None,
                 label_names: Sequence[str] | None = None, **_):
        super().__init__()
        cfg = settings
        self.cfg = cfg
        self.num_labels = num_labels
        dims = {name: dim for name, dim in zip(STREAMS, (video_dim, audio_dim)) if dim is not None}
        if not dims:
            raise ValueError("tcl_map needs video or audio features (its prompt is generated from them); use "
                             "--modalities text,video,audio, text,video or text,audio, or the `text` method for "
                             "text alone")
        d = encoder.hidden_size
        if d % cfg.nheads:
            raise ValueError(f"tcl_map.nheads={cfg.nheads} must divide the encoder's hidden size {d} ({encoder.name})")
        if encoder.pooler is None:
            raise ValueError(f"tcl_map: text encoder {encoder.name!r} was loaded without its pooler, which the "
                             "classifier reads (the method lists 'pooler' in its encoder_parts)")
        self.encoder = encoder
        self.stream_dims = dims
        self.max_positions = getattr(encoder.model.config, "max_position_embeddings", None)
        slots = cfg.align_len or _default_text_len(config) + cfg.prompt_len + cfg.label_len
        self.slots = slots

        # new parts: plain nn.Modules, initialised here as the reference's were (deviations: init)
        std = float(getattr(encoder.model.config, "initializer_range", 0.02))
        self.prompt = ModalityAwarePrompt(d, dims, cfg, slots)
        self.mag = MAG(d, dims, slots=slots, beta_shift=cfg.beta_shift, dropout=cfg.mag_dropout)
        self.dropout = nn.Dropout(config.model.dropout)
        self.classifier = nn.Linear(d, num_labels)
        for part in (self.prompt, self.mag, self.classifier):
            _init_new(part, std)
        check_finite(self, "tcl_map (new layers)")

        # the augmented view's encoder: a copy of the pretrained one (model.py `Cons_Model`)
        if cfg.shared_cons_encoder:
            self.cons_encoder = None
        else:
            model = copy.deepcopy(encoder.model)
            if getattr(model, "pooler", None) is not None:
                model.pooler = None  # unused by the augmented view
            self.cons_encoder = TextEncoder(model, encoder.tokenizer, encoder.name)

        self.register_buffer("label_tokens", self._label_tokens(label_names, num_labels), persistent=False)

    def _label_tokens(self, label_names: Sequence[str] | None, num_labels: int) -> torch.Tensor:
        """(C, l) word-piece ids of each label name, padded with the mask token."""
        tok = self.encoder.tokenizer
        if label_names is None or len(label_names) != num_labels:
            raise ValueError(f"tcl_map needs the {num_labels} label names (its augmented view writes them into "
                             "the template)")
        if tok is None or tok.mask_token_id is None:
            raise ValueError("tcl_map: the text encoder's tokenizer has no mask token")
        pieces = [tok.tokenize(name) for name in label_names]
        for name, p in zip(label_names, pieces):
            if not p:
                raise ValueError(f"tcl_map: label {name!r} tokenises to no word piece")
        longest = max(len(p) for p in pieces)
        if longest > self.cfg.label_len:
            long = [f"{n!r} ({' '.join(p)})" for n, p in zip(label_names, pieces) if len(p) > self.cfg.label_len]
            raise ValueError(f"tcl_map: label(s) {', '.join(long)} have more word pieces than tcl_map.label_len="
                             f"{self.cfg.label_len} with this tokenizer; use --set tcl_map.label_len={longest}")
        seen: dict[tuple[str, ...], str] = {}
        for name, p in zip(label_names, pieces):
            if tuple(p) in seen:
                log.warning("tcl_map: labels %r and %r give the same label words %s", seen[tuple(p)], name, p)
            seen.setdefault(tuple(p), name)
        table = torch.full((num_labels, self.cfg.label_len), int(tok.mask_token_id), dtype=torch.long)
        for c, p in enumerate(pieces):
            table[c, : len(p)] = torch.tensor(tok.convert_tokens_to_ids(p), dtype=torch.long)
        return table

    def param_groups(self, lr: float, weight_decay: float, encoder_lr: float | None = None) -> list[dict]:
        """As the base class, with the augmented view's encoder copy in the encoder groups."""
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_enc = name.startswith(("encoder.", "cons_encoder."))
            no_decay = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
            groups.setdefault((is_enc, no_decay), []).append(p)
        return [{"params": params, "lr": (encoder_lr or lr) if is_enc else lr,
                 "weight_decay": 0.0 if no_decay else weight_decay}
                for (is_enc, no_decay), params in groups.items()]

    def _streams(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (frames (b, m, e), mask (b, m) bool)} for the streams the model was built with;
        one the batch lacks is a stream without frames."""
        b, device = batch.input_ids.shape[0], batch.input_ids.device
        out = {}
        for name, dim in self.stream_dims.items():
            x, mask = getattr(batch, name), getattr(batch, f"{name}_mask")
            if x is None:
                x, mask = torch.zeros(b, 1, dim, device=device), torch.zeros(b, 1, dtype=torch.bool, device=device)
            elif mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            out[name] = (x.float(), mask.bool())
        return out

    def _template(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        missing = [k for k in TEMPLATE_KEYS if k not in batch.extras]
        if missing:
            raise ValueError(f"tcl_map: the batch lacks {missing}; build batches with the method's collate_hook "
                             "(TemplateHook)")
        ids, am, tt, mask_pos = (batch.extras[k] for k in TEMPLATE_KEYS)
        if self.max_positions is not None and ids.shape[1] > self.max_positions:
            raise ValueError(f"tcl_map: a template of {ids.shape[1]} tokens (text + {self.cfg.prompt_len} prompt + "
                             f"{self.cfg.label_len} label slots) exceeds the encoder's {self.max_positions} "
                             "positions; lower data.text_max_len")
        if ids.shape[1] > self.slots:
            raise ValueError(f"tcl_map: a template of {ids.shape[1]} tokens is longer than the {self.slots} "
                             f"alignment slots; set --set tcl_map.align_len={ids.shape[1]} or more")
        return ids, am, tt, mask_pos

    def forward(self, batch: Batch) -> IntentOutput:
        cfg = self.cfg
        ids, am, tt, mask_pos = self._template(batch)
        b = ids.shape[0]
        streams = self._streams(batch)
        prompt_idx = mask_pos[:, None] - cfg.prompt_len + torch.arange(cfg.prompt_len, device=ids.device)  # (b, p)
        label_idx = mask_pos[:, None] + torch.arange(cfg.label_len, device=ids.device)  # (b, l)

        prompt = self.prompt(streams, b)  # (b, p, d)  MAP
        e = _put(self.encoder.embeddings(ids, tt), prompt_idx, prompt)  # (b, n, d)
        hidden = self.encoder.run_layers(self.mag(e, streams), am)  # (b, n, d)
        pooled = self.encoder.pooled_output(hidden)  # (b, d)
        logits = self.classifier(self.dropout(pooled))  # (b, C)
        extras = {"mask_repr": _take(hidden, label_idx).mean(dim=1)}  # (b, d)

        keep = batch.labels < self.num_labels
        if self.training and cfg.tcl_weight > 0 and bool(keep.any()):
            # the augmented view (model.py `Cons_Model`): label words in the slots, the same prompt
            enc = self.cons_encoder or self.encoder
            words = self.label_tokens[batch.labels[keep]]  # (b', l)
            cons_ids = ids[keep].scatter(1, label_idx[keep], words)
            e2 = _put(enc.embeddings(cons_ids, tt[keep]), prompt_idx[keep], prompt[keep])
            h2 = enc.run_layers(e2, am[keep])  # (b', n, d)
            label_repr = torch.zeros_like(extras["mask_repr"])
            label_repr[keep] = _take(h2, label_idx[keep]).mean(dim=1)
            extras["label_repr"] = label_repr
        return IntentOutput(logits=logits, pooled=pooled, extras=extras)

    def loss(self, out: IntentOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """manager.py: CE + tcl_weight * NT-Xent(mask_repr, label_repr), on in-scope rows
        (label < C); the contrastive term only where the augmented view ran (training)."""
        keep = batch.labels < self.num_labels
        if not bool(keep.any()):
            return out.logits.sum() * 0.0, {"ce": 0.0}
        ce = F.cross_entropy(out.logits[keep], batch.labels[keep])
        parts = {"ce": float(ce.detach())}
        if "label_repr" not in out.extras:
            return ce, parts
        tcl = nt_xent(out.extras["mask_repr"][keep], out.extras["label_repr"][keep], self.cfg.temperature)
        parts["tcl"] = float(tcl.detach())
        return ce + self.cfg.tcl_weight * tcl, parts
