"""SDIF-DA: shallow-to-deep interaction with data augmentation (Huang et al., ICASSP 2024).

Follows the authors' code (github.com/JoeYing1019/SDIF-DA), cited below by file:
`backbones/FusionNets/SDIF.py` (the model), `backbones/SubNets/FeatureNets.py` (the
cross-attention encoder), `methods/SDIF/manager.py` (the loss and training) and
`configs/sdif.py` (the defaults of `SdifDaSettings`; `configs/sdif_bi.py` for the binary
task, quoted in the field docstrings). The augmentation itself is an offline step,
`amess data augment` (`amess.data.augment`). Read top to bottom: settings, the
cross-attention encoder, the augmentation hook, the model.

The model (SDIF.py `forward`):
1. First layer, one representation per modality: text = the encoder's pooler output over
   its last hidden states T (b, n, d); video = masked mean of V = Linear(d_v, d)(video);
   audio = masked mean of A, the audio frames (projected only when d_a != d, below).
2. Second layer, shallow interaction: V->T and A->T, cross-attention encoders (text
   queries, stream keys and values; BERT-style layers: attention, residual + LayerNorm,
   GELU feed-forward, residual + LayerNorm), each averaged over the real text tokens; and
   the three sequences [A->T; T; V->T] concatenated in time through an MLP (Linear ->
   Dropout -> GELU), averaged over their real tokens (the shallow representation).
3. Third layer, deep interaction: the 6 representations [text, video, audio, V->T, A->T,
   shallow] as a sequence through a Transformer encoder, concatenated, then
   Linear(6d, 3d) -> Dropout -> ReLU -> Linear(3d, C). The loss is cross-entropy.

With one stream (text + video or text + audio) the same holds with what exists: 4
representations [text, stream, stream->T, shallow], the shallow MLP over [stream->T; T]
(audio) or [T; stream->T] (video), and a Linear(4d, 2d) head. Text alone is refused.

Data augmentation, as in this toolkit: `sdif_da.augmented_tsv` names a file written by
`amess data augment` (paraphrases of training utterances, each with its source id). The
collator hook (`ParaphraseRows`) attaches up to `augmented_per_sample` paraphrases of each
batch row that has some (chosen at random per batch) as batch extras; in training mode only,
`forward` appends them to the batch as extra rows with their source row's video, audio and
label, and `loss` is the cross-entropy over the original and the augmented rows together,
so each augmented row weighs as a training row. Evaluation and prediction never see them
(dev and test rows have no paraphrases, and `forward` in eval mode ignores the extras). The
seam's collator hook cannot add rows to the split itself, hence rows travel with their
source: an epoch holds each source row once with its paraphrase(s), not the paraphrases
shuffled independently, and `train_samples_per_second` counts source rows only.

Deviations from the reference, each on purpose:
- Masks. The reference derives a frame mask from non-zero features (a real frame of zeros
  counts as padding) and passes fixed-length padded streams; we use the masks from the true
  lengths. A sample without frames gets a zero stream representation (the reference divides
  by a zero length for audio: NaN) and its cross-attention output is zero before the
  residual (attention over padding only would depend on how much padding there is).
- Sizes from the data and the encoder: the interaction width is the encoder's hidden size d
  (the reference's `dst_feature_dims: 768` is bert-base's), so it is not a setting. The
  reference feeds the 768-d audio frames unprojected, which works only because they are as
  wide as bert-base; here audio goes through Linear(d_a, d) whenever d_a != d (e.g. MiniLM's
  384), and stays unprojected when the widths agree, as in the reference.
- Unused reference parts are left out: `shallow_att_project`, `deep_att_project` (never
  called) and the pretraining head `out_layer` (below).
- Augmentation. The reference generates 25,000 new utterances per intent with ChatGPT
  (`chatGPT_gen_data.py`) and uses them only in a text-only pretraining stage before the
  multimodal training (manager.py: `pre_train`, the pooler output through dropout `aug_dp`
  and a Linear head, AdamW lr `aug_lr` 1e-6, `aug_epoch` 1, batch 16, weight decay 0.1).
  Here paraphrases of training utterances join multimodal training as rows with their
  source's features: the one loop has no pretraining stage (see the module docstring of
  `amess.data.augment`).
- `pooled` (what OOD detectors such as Mahalanobis read) is the input of the last Linear,
  the (b, 3d) penultimate layer of the head.
- Training schedule: the one loop runs AdamW with warm-up and linear decay and
  gradient-norm clipping. The reference runs AdamW lr 9e-6 (8e-6 binary), weight decay
  0.01 (0.03), value clipping at 7 (1), ReduceLROnPlateau on dev loss (factor 0.5 / 0.2,
  patience 8 / 4), batch 8, early stopping patience 10 on dev accuracy. The closest our
  loop comes: `--lr 9e-6 --encoder-lr 9e-6 --batch-size 8 --patience 10 --monitor acc`.

einops legend:
    b  batch              n  text tokens        m  frames of one stream
    h  attention heads    e  head width (d / h)  d  encoder hidden size
    r  representations in the deep layer (6 with video and audio, 4 with one stream)
    k  paraphrases per sample (`augmented_per_sample`)      C  intent labels
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from amess.data.batch import Batch, Sample
from amess.models.base import IntentModel, IntentOutput, register_method
from amess.models.encoders import TextEncoder

log = logging.getLogger(__name__)

DEEP_FEEDFORWARD = 2048
DEEP_DROPOUT = 0.1
"""Feed-forward width and dropout of the deep-interaction Transformer layers: PyTorch's
defaults, which the reference keeps (SDIF.py `nn.TransformerEncoderLayer(d_model, nhead)`)."""
LAYER_NORM_EPS = 1e-12
"""LayerNorm epsilon of the cross-attention layers (FeatureNets.py `BertLayerNorm`)."""
FEEDFORWARD_MULT = 4
"""Feed-forward width of a cross-attention layer, times d (FeatureNets.py `BertIntermediate`)."""


@dataclass
class SdifDaSettings:
    """SDIF-DA settings (the `sdif_da` section of a config); defaults from the reference's
    `configs/sdif.py` (MIntRec, 20 intents)."""

    self_layers: int = 1
    """Transformer layers of the deep interaction over the modality representations (reference
    `n_levels_self`: 1; 2 binary)."""
    cross_layers: int = 1
    """Layers of each V->T and A->T cross-attention encoder (reference `n_levels_cross`: 1; 3 binary)."""
    self_heads: int = 8
    """Attention heads of the deep interaction; must divide the encoder's hidden size (reference
    `self_num_heads`: 8; 1 binary)."""
    cross_heads: int = 12
    """Attention heads of the cross-attention encoders; must divide the encoder's hidden size
    (reference `cross_num_heads`: 12; 2 binary)."""
    dropout: float = 0.2
    """Dropout of the shallow MLP and of the head (reference `dropout_rate`: 0.2; 0.1 binary)."""
    cross_dropout: float = 0.3
    """Dropout of the cross-attention layers, on the attention weights and on each sublayer's
    output (reference `cross_dp_rate`: 0.3, both tasks)."""
    augmented_tsv: str | None = None
    """Paraphrases from `amess data augment` (a TSV with `id source_id label text`) to add to the
    TRAINING rows, with their source row's label, video and audio; None = no augmentation. A
    relative path is taken from the working directory."""
    augmented_per_sample: int = 1
    """Paraphrases of a training row added to each batch that holds the row (chosen at random
    among its paraphrases per batch); ignored without `augmented_tsv`."""

    def __post_init__(self) -> None:
        for name in ("self_layers", "cross_layers", "self_heads", "cross_heads", "augmented_per_sample"):
            if getattr(self, name) < 1:
                raise ValueError(f"sdif_da.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dropout", "cross_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"sdif_da.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.augmented_tsv is not None and not str(self.augmented_tsv).strip():
            raise ValueError("sdif_da.augmented_tsv must name a file or be null")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(b, m, d), (b, m) bool -> (b, d): the mean over real positions; 0 for a row without any."""
    w = mask.to(x.dtype)[..., None]  # (b, m, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


# ----- FeatureNets.py: the cross-attention encoder -------------------------------------------

class CrossAttentionLayer(nn.Module):
    """FeatureNets.py `BertCrossAttentionLayer`: text queries attend to a stream.

    a = LN(q + Drop(W_o Attn(q, s, s)));  out = LN(a + Drop(W_2 GELU(W_1 a)))
    Attention is multi-head scaled dot product with key padding from the stream's mask; a
    row without frames attends to nothing (zero context), so its output depends on the text
    alone, never on the amount of padding.
    """

    def __init__(self, d: int, *, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(dropout)
        self.attn_out = nn.Linear(d, d)
        self.attn_out_dropout = nn.Dropout(dropout)
        self.attn_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.ff_in = nn.Linear(d, FEEDFORWARD_MULT * d)
        self.ff_out = nn.Linear(FEEDFORWARD_MULT * d, d)
        self.ff_dropout = nn.Dropout(dropout)
        self.ff_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)

    def forward(self, q: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q: (b, n, d) text; s: (b, m, d) stream; mask: (b, m) bool -> (b, n, d)."""
        split = lambda t: rearrange(t, "b l (h e) -> b h l e", h=self.heads)  # noqa: E731
        qh, kh, vh = split(self.query(q)), split(self.key(s)), split(self.value(s))
        scores = einsum(qh, kh, "b h n e, b h m e -> b h n m") / math.sqrt(qh.shape[-1])
        has = mask.any(1)  # (b,)
        # never mask a whole row (softmax would be NaN): frameless rows keep position 0, then get zero weights
        keep = mask.clone()
        keep[:, 0] |= ~has
        probs = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
        probs = self.attn_dropout(probs * has[:, None, None, None].to(probs.dtype))
        ctx = rearrange(einsum(probs, vh, "b h n m, b h m e -> b h n e"), "b h n e -> b n (h e)")
        a = self.attn_norm(q + self.attn_out_dropout(self.attn_out(ctx)))
        return self.ff_norm(a + self.ff_dropout(self.ff_out(F.gelu(self.ff_in(a)))))


class CrossEncoder(nn.Module):
    """FeatureNets.py `BertCrossEncoder`: `layers` cross-attention layers, the text updated
    layer by layer against the same stream."""

    def __init__(self, d: int, *, heads: int, dropout: float, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(d, heads=heads, dropout=dropout) for _ in range(layers))

    def forward(self, q: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            q = layer(q, s, mask)
        return q


# ----- augmentation: paraphrases travel with their source row --------------------------------

class ParaphraseRows:
    """Collator hook (`IntentModel.collate_hook`): for each sample with paraphrases, up to
    `per_sample` of them chosen at random, tokenised like the sample (paired with its
    context in multi-turn mode), into `batch.extras`:
    `aug_input_ids`, `aug_attention_mask`, `aug_token_type_ids` (b, k, n') long and
    `aug_valid` (b, k) bool. Samples without paraphrases (dev, test) get all-False rows.

    The choice uses Python's `random`: in the main process the loop saves and restores its
    state (resume), and torch seeds it in loader workers.
    """

    def __init__(self, table: dict[str, list[str]], tokenizer, *, text_max_len: int, per_sample: int):
        self.table = table
        self.tokenizer = tokenizer
        self.text_max_len = text_max_len
        self.per_sample = per_sample

    def __call__(self, samples: Sequence[Sample], batch: Batch) -> None:
        b, k = len(samples), self.per_sample
        texts, contexts, slots = [], [], []
        for i, s in enumerate(samples):
            options = self.table.get(s.id)
            if options:
                for j, text in enumerate(random.sample(options, min(k, len(options)))):
                    texts.append(text)
                    contexts.append(s.context)
                    slots.append((i, j))
        n = 1
        if texts:
            pair = [c or "" for c in contexts] if any(c is not None for c in contexts) else None
            enc = self.tokenizer(texts, pair, padding=True, truncation=True, max_length=self.text_max_len,
                                 return_tensors="pt")
            n = enc["input_ids"].shape[1]
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((b, k, n), pad, dtype=torch.long)
        att = torch.zeros(b, k, n, dtype=torch.long)
        types = torch.zeros(b, k, n, dtype=torch.long)
        valid = torch.zeros(b, k, dtype=torch.bool)
        if texts:
            i, j = torch.tensor(slots).unbind(1)
            ids[i, j], att[i, j], valid[i, j] = enc["input_ids"], enc["attention_mask"], True
            if "token_type_ids" in enc:
                types[i, j] = enc["token_type_ids"]
        batch.extras.update(aug_input_ids=ids, aug_attention_mask=att, aug_token_type_ids=types, aug_valid=valid)


@dataclass
class AugmentedRows:
    """The augmented rows' outputs in a training forward: `logits (a, C)` and the labels of
    their source rows `labels (a,)`, a = paraphrases in the batch."""

    logits: torch.Tensor
    labels: torch.Tensor


@dataclass
class SdifOutput(IntentOutput):
    """`IntentOutput` plus the augmented rows (training only), kept apart so that `logits`,
    `pooled` and `extras` keep one row per batch row."""

    augmented: AugmentedRows | None = None


# ----- SDIF.py: the model ---------------------------------------------------------------------

@register_method("sdif_da")
class SDIFDA(IntentModel):
    """SDIF-DA (Huang et al. 2024): shallow (cross-attention) to deep (Transformer over the
    modality representations) interaction, with LLM-paraphrased training rows."""

    Settings = SdifDaSettings
    reads = ("text", "video", "audio")
    needs_nonverbal = True
    requires = ("text",)
    encoder_parts = ("pooler",)

    @classmethod
    def collate_hook(cls, settings: SdifDaSettings | None, tokenizer, text_max_len: int):
        """`ParaphraseRows` over `augmented_tsv`, or None without one. A file that does not
        exist gives no hook (a trained run predicts without it); `forward` then refuses to
        train, naming the file."""
        if settings is None or not settings.augmented_tsv:
            return None
        from amess.data.augment import read_augmented

        path = Path(settings.augmented_tsv)
        if not path.is_file():
            log.info("sdif_da.augmented_tsv %s not found: no augmented rows", path)
            return None
        table = read_augmented(path)
        log.info("sdif_da: %d paraphrases of %d utterances from %s", sum(map(len, table.values())), len(table), path)
        return ParaphraseRows(table, tokenizer, text_max_len=text_max_len, per_sample=settings.augmented_per_sample)

    def __init__(self, *, settings: SdifDaSettings, encoder: TextEncoder, num_labels: int,
                 video_dim: int | None = None, audio_dim: int | None = None, **_):
        super().__init__()
        cfg = self.cfg = settings
        self.streams = [name for name, dim in (("video", video_dim), ("audio", audio_dim)) if dim is not None]
        if not self.streams:
            raise ValueError("method 'sdif_da' needs text and at least one of video and audio (its interaction "
                             "layers fuse them); got text only: use --modalities text,video,audio, text,video "
                             "or text,audio")
        d = encoder.hidden_size
        for name in ("cross_heads", "self_heads"):
            if d % getattr(cfg, name):
                raise ValueError(f"sdif_da.{name}={getattr(cfg, name)} must divide the hidden size {d} of the "
                                 f"text encoder {encoder.name!r}")
        self.num_labels = num_labels
        self.encoder = encoder
        dims = {"video": video_dim, "audio": audio_dim}
        # SDIF.py: `v2t_project` for video; audio unprojected (as wide as bert-base), projected otherwise
        self.to_text = nn.ModuleDict({m: nn.Identity() if m == "audio" and dims[m] == d else nn.Linear(dims[m], d)
                                      for m in self.streams})
        self.cross = nn.ModuleDict({m: CrossEncoder(d, heads=cfg.cross_heads, dropout=cfg.cross_dropout,
                                                    layers=cfg.cross_layers) for m in self.streams})
        self.shallow = nn.Sequential(nn.Linear(d, d), nn.Dropout(cfg.dropout), nn.GELU())
        layer = nn.TransformerEncoderLayer(d, cfg.self_heads, dim_feedforward=DEEP_FEEDFORWARD, dropout=DEEP_DROPOUT,
                                           batch_first=True)
        self.deep = nn.TransformerEncoder(layer, cfg.self_layers, enable_nested_tensor=False)
        r = 2 + 2 * len(self.streams)
        self.head_hidden = nn.Sequential(nn.Linear(r * d, r * d // 2), nn.Dropout(cfg.dropout), nn.ReLU())
        self.head = nn.Linear(r * d // 2, num_labels)

    def _stream(self, batch: Batch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x (b, m, d_in), mask (b, m) bool)`; a stream the batch lacks counts as no frames."""
        x, mask = getattr(batch, name), getattr(batch, f"{name}_mask")
        b, dev = batch.input_ids.shape[0], batch.input_ids.device
        if x is None:
            proj = self.to_text[name]
            dim = proj.in_features if isinstance(proj, nn.Linear) else self.encoder.hidden_size
            return torch.zeros(b, 1, dim, device=dev), torch.zeros(b, 1, dtype=torch.bool, device=dev)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return x, mask.bool()

    def interact(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                 streams: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDIF.py `forward` over given rows: `(logits (b, C), penultimate (b, r d / 2))`."""
        text = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids)  # (b, n, d)
        tmask = attention_mask.bool()
        stream_reps, cross_reps, cross_seqs = [], [], {}
        for m in self.streams:  # first and second layers
            x, mask = streams[m]
            seq = self.to_text[m](x.to(text.dtype))  # (b, m, d)
            stream_reps.append(masked_mean(seq, mask))  # (b, d)
            cross_seqs[m] = self.cross[m](text, seq, mask)  # (b, n, d)
            cross_reps.append(masked_mean(cross_seqs[m], tmask))
        seqs = [cross_seqs.get("audio"), text, cross_seqs.get("video")]  # SDIF.py order: A->T, T, V->T
        seqs = [s for s in seqs if s is not None]
        shallow = self.shallow(torch.cat(seqs, dim=1))  # (b, len(seqs) n, d)
        shallow_rep = masked_mean(shallow, tmask.repeat(1, len(seqs)))
        reps = [self.encoder.pooled_output(text), *stream_reps, *cross_reps, shallow_rep]
        reps = torch.stack(reps, dim=1)  # (b, r, d)
        z = self.head_hidden(rearrange(self.deep(reps), "b r d -> b (r d)"))  # third layer, (b, r d / 2)
        return self.head(z), z

    def _with_augmented(self, batch: Batch):
        """The batch's inputs with its paraphrase rows appended (source features reused), and
        the source index of each appended row `(a,)`."""
        if "aug_valid" not in batch.extras:
            raise ValueError(f"sdif_da.augmented_tsv={self.cfg.augmented_tsv!r} is set, but the training batch "
                             "holds no augmented rows: the file does not exist (write it with `amess data "
                             "augment`), or the batch was not made by the method's collator")
        valid = batch.extras["aug_valid"]  # (b, k)
        src = torch.nonzero(valid)[:, 0]  # (a,) source row of each paraphrase, in slot order
        a_ids, a_att = batch.extras["aug_input_ids"][valid], batch.extras["aug_attention_mask"][valid]  # (a, n')
        n = max(batch.input_ids.shape[1], a_ids.shape[1])
        tok = self.encoder.tokenizer
        pad = (tok.pad_token_id or 0) if tok is not None else 0
        widen = lambda t, v: F.pad(t, (0, n - t.shape[1]), value=v)  # noqa: E731
        ids = torch.cat([widen(batch.input_ids, pad), widen(a_ids, pad)])
        att = torch.cat([widen(batch.attention_mask, 0), widen(a_att, 0)])
        types = None
        if batch.token_type_ids is not None:
            types = torch.cat([widen(batch.token_type_ids, 0), widen(batch.extras["aug_token_type_ids"][valid], 0)])
        streams = {}
        for m in self.streams:
            x, mask = self._stream(batch, m)
            streams[m] = (torch.cat([x, x[src]]), torch.cat([mask, mask[src]]))
        return ids, att, types, streams, src

    def forward(self, batch: Batch) -> SdifOutput:
        b = batch.input_ids.shape[0]
        if self.training and self.cfg.augmented_tsv:
            ids, att, types, streams, src = self._with_augmented(batch)
            logits, z = self.interact(ids, att, types, streams)
            return SdifOutput(logits=logits[:b], pooled=z[:b],
                              augmented=AugmentedRows(logits=logits[b:], labels=batch.labels[src]))
        streams = {m: self._stream(batch, m) for m in self.streams}
        logits, z = self.interact(batch.input_ids, batch.attention_mask, batch.token_type_ids, streams)
        return SdifOutput(logits=logits, pooled=z)

    def loss(self, out: SdifOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """manager.py: cross-entropy, here over the in-scope rows and the augmented rows
        together (each augmented row counts as one training row). Parts: `ce` (the batch's
        own rows), `ce_aug` and `aug_rows` (with augmentation)."""
        C = self.num_labels
        keep = batch.labels < C
        logits, labels = [out.logits[keep]], [batch.labels[keep]]
        parts: dict[str, float] = {}
        if out.augmented is not None:
            ok = out.augmented.labels < C
            logits.append(out.augmented.logits[ok])
            labels.append(out.augmented.labels[ok])
            parts["aug_rows"] = float(ok.sum())
            if ok.any():
                parts["ce_aug"] = float(F.cross_entropy(logits[-1].detach(), labels[-1]))
        parts["ce"] = float(F.cross_entropy(logits[0].detach(), labels[0])) if keep.any() else 0.0
        all_logits, all_labels = torch.cat(logits), torch.cat(labels)
        if all_labels.numel() == 0:
            return out.logits.sum() * 0.0, parts
        return F.cross_entropy(all_logits, all_labels), parts
