"""MAG-BERT: BERT with a Multimodal Adaptation Gate (Rahman et al., ACL 2020).

Follows thuiar/MIntRec `backbones/FusionNets/MAG_BERT.py` (the MAG and the model around
it), `backbones/SubNets/AlignNets.py` (the CTC aligner), `configs/mag_bert.py` and
`configs/mag_bert_bi.py` (defaults) and `methods/MAG_BERT/manager.py` (loss). Read top
to bottom: settings, the aligners, the gate, then the model.

The gate, for every text position i with vector e_i and the non-verbal vectors v_i, a_i
aligned to that position (MAG_BERT.py `MAG.forward`):

    h_i = relu(W_hv [v_i; e_i]) * W_v v_i + relu(W_ha [a_i; e_i]) * W_a a_i
    alpha_i = min(beta_shift * |e_i| / |h_i|, 1)
    e'_i = dropout(LayerNorm(e_i + alpha_i h_i))

and then the rest of BERT, its pooler and `Linear(h, C)` after dropout, trained with
cross-entropy (manager.py). With one non-verbal stream the gate has that stream's term alone.

Deviations from the reference, each deliberate:
- Masks from the true lengths, everywhere. The reference pads every stream to a fixed
  length and passes no masks; its CTC aligner then maps zero-padded frames onto padded
  text positions. Here the alignment reads real frames only and writes real text
  positions only, so appending padding (text or frames) changes no output.
- Alignment (`align`): the reference aligns each stream to the fixed text length with
  `AlignSubNet(mode="ctc")` (a 2-layer LSTM over the frames predicting, per frame, a
  distribution over 30 text positions + blank; AlignNets.py `CTCModule`). The default
  here is `area`: each real text position takes the mean of the frames over its equal
  share of the clip (area interpolation, the masked per-sample counterpart of the
  reference's `avg_pool` aligner); parameter-free, it needs no fixed text length and
  assumes tokens spread evenly over the clip. `ctc` is the reference's aligner with masks:
  padded frames carry no mass, mass goes to the blank and to real text positions only,
  and its number of positions is a setting (`ctc_max_len`) instead of the dataset's text
  length; positions past it receive nothing.
- A sample with no frames of a stream gets no term from that stream (the reference,
  fed all-zero padding, would still add relu(W [0; e]) * bias); with no frames at all
  e' = dropout(LayerNorm(e)). The zero-norm guard (|h| = 0 -> 1) is the reference's; the
  norm is computed so that its gradient at zero is 0, not NaN.
- The encoder is any BERT-family encoder (`encoder.embeddings` / `run_layers`): the gate
  works at the encoder's hidden size (384 for the packaged MiniLM, 768 for bert-base), and
  the video / audio sizes come from the data.
- `injection_index` says where the gate sits (0 = on the embedding output, the reference;
  i = between layers i-1 and i), as in the paper's study of injection positions.
- The new layers are built and initialised here (normal with the encoder's
  `initializer_range`, zero biases, as the reference's `BertPreTrainedModel.init_weights`
  left them; the CTC LSTM keeps PyTorch's initialisation, as there), not through
  `from_pretrained` (the transformers 5 trap, ../shared/docs/offline.md).
- `beta_shift` defaults to the reference's value for the task: 0.005 for `intent`
  (configs/mag_bert.py), 0.04 for `binary` (configs/mag_bert_bi.py); MIntRec2.0's
  configs use 0.005 as well.
- Training runs in the one loop (`amess.training.loop`): AdamW with linear warm-up and
  decay as in manager.py (there `correct_bias=False`), but with this project's learning
  rates and weight decay; the reference's are lr 2e-5 for every parameter, weight decay
  0.03 (binary: 1e-5, 0.1), 100 epochs, patience 8, batch 16 (`--lr 2e-5 --set
  train.encoder_lr=2e-5 --set train.weight_decay=0.03` reproduces them). `model.pooling`
  is not read: the classifier reads BERT's pooler, as the reference's does;
  `model.dropout` is the classifier's dropout (the reference: `hidden_dropout_prob`, 0.1).
- `classify=cls` (not the default) reads the last [CLS] state instead of the pooler: the
  packaged MiniLM's pooler was never trained (see the setting).

einops legend:
    b  batch              n  text tokens       h  encoder hidden size
    m  frames of one non-verbal stream          d  that stream's feature size
    t  CTC text positions (`ctc_max_len`)       C  intent labels
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum
from torch import nn

from amess.config import Config
from amess.data.batch import Batch
from amess.models.base import IntentModel, IntentOutput, autocast_off, register_method
from amess.models.encoders import TextEncoder

ALIGN_MODES = ("area", "ctc")
CLASSIFY_FROM = ("pooler", "cls")
BETA_SHIFT = {"intent": 0.005, "binary": 0.04}
"""The reference's beta_shift per task (configs/mag_bert.py, configs/mag_bert_bi.py)."""
EPS = 1e-6
"""The reference's epsilon in alpha = beta |e| / (|h| + eps)."""
STREAMS = ("video", "audio")


@dataclass
class MagBertSettings:
    """MAG-BERT settings: the `mag_bert` section of a config."""

    injection_index: int = 0
    """Where the gate sits: on the input of encoder layer i (0 = on the embedding output, as in
    the reference); at most the number of layers (then on the last layer's output)."""
    beta_shift: float | None = None
    """beta in alpha = min(beta |e| / |h|, 1), the largest non-verbal shift relative to the
    text vector's norm. None = the reference's value for the task: 0.005 (intent), 0.04 (binary)."""
    dropout: float = 0.5
    """Dropout after the gate's LayerNorm (the reference's `dropout_prob`)."""
    align: str = "area"
    """How frames are aligned to text positions: `area` (each real token takes the mean of the
    frames over its equal share of the clip) or `ctc` (the reference's learned CTC aligner, masked)."""
    ctc_max_len: int = 64
    """Text positions the `ctc` aligner predicts (the reference: the fixed text length, 30); tokens
    past it receive no frames. Ignored by `area`."""

    classify: str = "pooler"
    """What the classifier reads: `pooler` (BERT's pooler, tanh(W h_[CLS]), the reference) or `cls`
    (the last [CLS] state itself; the pooler is then frozen and unused). With the packaged MiniLM,
    whose pooler sentence-transformers never trained (weights of std 0.009, zero bias), `cls`
    learns faster at short budgets (README, MAG-BERT findings); with bert-base the pooler is
    pre-trained and `pooler` is the reference."""

    def __post_init__(self) -> None:
        if self.classify not in CLASSIFY_FROM:
            raise ValueError(f"mag_bert.classify must be one of {list(CLASSIFY_FROM)}, got {self.classify!r}")
        if self.align not in ALIGN_MODES:
            raise ValueError(f"mag_bert.align must be one of {list(ALIGN_MODES)}, got {self.align!r}")
        if self.injection_index < 0:
            raise ValueError(f"mag_bert.injection_index must be >= 0, got {self.injection_index}")
        if self.beta_shift is not None and not self.beta_shift > 0:
            raise ValueError(f"mag_bert.beta_shift must be > 0 (or null for the task's default), got {self.beta_shift}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"mag_bert.dropout must be in [0, 1), got {self.dropout}")
        if self.ctc_max_len < 1:
            raise ValueError(f"mag_bert.ctc_max_len must be >= 1, got {self.ctc_max_len}")


def _ranks(mask: torch.Tensor) -> torch.Tensor:
    """(b, m) bool -> (b, m) float: the index of each real position among the real ones
    (0, 1, ...), whatever the padding; padded positions get their rank too but are masked."""
    return (mask.long().cumsum(1) - 1).clamp_min(0).float()


def area_align(x: torch.Tensor, frame_mask: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Area interpolation of frames onto text positions, per sample and masked.

    x: (b, m, d) frames; frame_mask: (b, m) bool; text_mask: (b, n) bool. Real text
    position k of L_t takes the mean of the frames over [k, k + 1) * L_f / L_t, each frame
    weighted by its overlap with that interval (frame f spans [f, f + 1)). Returns (b, n, d),
    zero at padded text positions and for a sample with no frames.
    """
    lf = frame_mask.sum(1).float()  # (b,)
    lt = text_mask.sum(1).clamp_min(1).float()  # (b,)
    k = _ranks(text_mask)  # (b, n)
    start = k * (lf / lt)[:, None]  # (b, n)
    end = (k + 1) * (lf / lt)[:, None]
    f = _ranks(frame_mask)  # (b, m)
    overlap = (torch.minimum(end[:, :, None], f[:, None, :] + 1)
               - torch.maximum(start[:, :, None], f[:, None, :])).clamp_min(0)  # (b, n, m)
    overlap = overlap * (text_mask[:, :, None] & frame_mask[:, None, :]).float()
    w = overlap / overlap.sum(-1, keepdim=True).clamp_min(1e-12)
    return einsum(w.to(x.dtype), x, "b n m, b m d -> b n d")


class CTCAligner(nn.Module):
    """The reference's CTC pseudo-alignment (AlignNets.py `CTCModule`, from Tsai et al.'s MulT
    code), masked: a 2-layer LSTM reads the frames and gives each frame a distribution over
    blank + `max_len` text positions; position k receives sum_f p_f(k) x_f.

    Padded frames carry no mass, and mass goes only to the blank and to the real text
    positions of each sample; positions past `max_len` receive nothing. The LSTM runs
    forwards only, so trailing padding cannot change what it says about real frames.
    """

    def __init__(self, in_dim: int, *, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.lstm = nn.LSTM(in_dim, max_len + 1, num_layers=2, batch_first=True)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        b, n = text_mask.shape
        t = self.max_len
        with autocast_off(x.device):  # a float32 LSTM under mixed precision (see `autocast_off`)
            logits, _ = self.lstm(x.float())  # (b, m, 1 + t), index 0 = blank
        real_pos = text_mask[:, :t]
        if real_pos.shape[1] < t:
            real_pos = F.pad(real_pos, (0, t - real_pos.shape[1]))
        allowed = torch.cat([real_pos.new_ones(b, 1), real_pos], dim=1)  # (b, 1 + t)
        p = logits.masked_fill(~allowed[:, None, :], float("-inf")).softmax(-1)[..., 1:]  # (b, m, t)
        p = p * frame_mask[..., None].to(p.dtype)
        out = einsum(p.to(x.dtype), x, "b m t, b m d -> b t d")  # (b, t, d)
        if n <= t:
            return out[:, :n]
        return F.pad(out, (0, 0, 0, n - t))  # (b, n, d)


class MAG(nn.Module):
    """The Multimodal Adaptation Gate (MAG_BERT.py `MAG`) over the streams it was built with.

    `forward(e, aligned)`: e (b, n, h) text vectors; aligned maps a stream name to
    ((b, n, d) frames aligned to the text positions, (b,) bool whether the sample has any
    frame of it). Returns e' (b, n, h) and alpha (b, n).
    """

    def __init__(self, hidden: int, dims: dict[str, int], *, beta_shift: float, dropout: float, init_std: float):
        super().__init__()
        self.beta_shift = beta_shift
        self.gate = nn.ModuleDict({s: nn.Linear(d + hidden, hidden) for s, d in dims.items()})  # W_hv, W_ha
        self.proj = nn.ModuleDict({s: nn.Linear(d, hidden) for s, d in dims.items()})  # W_v, W_a
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        for layer in [*self.gate.values(), *self.proj.values()]:
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, e: torch.Tensor, aligned: dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h_m = torch.zeros_like(e)  # (b, n, h)
        for name, (x, has) in aligned.items():
            weight = F.relu(self.gate[name](torch.cat([x, e], dim=-1)))  # (b, n, h)
            h_m = h_m + weight * self.proj[name](x) * has[:, None, None].to(e.dtype)
        sq = h_m.pow(2).sum(-1)  # (b, n)
        # |h| with the reference's guard (0 -> 1); clamp_min keeps the gradient at 0 finite
        hm_norm = torch.where(sq > 0, sq.clamp_min(1e-24).sqrt(), torch.ones_like(sq))
        alpha = (self.beta_shift * e.norm(dim=-1) / (hm_norm + EPS)).clamp(max=1.0)  # (b, n)
        alpha = torch.where(sq > 0, alpha, torch.zeros_like(alpha))  # no shift to scale: report 0
        return self.dropout(self.norm(e + alpha[..., None] * h_m)), alpha


@register_method("mag_bert")
class MagBert(IntentModel):
    """MAG-BERT (Rahman et al., 2020): a multimodal gate shifts BERT's token vectors."""

    Settings = MagBertSettings
    reads = ("text", "video", "audio")
    needs_nonverbal = True
    encoder_parts = ("pooler",)

    def __init__(self, *, config: Config, settings: MagBertSettings, encoder: TextEncoder, num_labels: int,
                 video_dim: int | None = None, audio_dim: int | None = None, **_):
        super().__init__()
        dims = {s: d for s, d in (("video", video_dim), ("audio", audio_dim)) if d is not None}
        if not dims:
            raise ValueError("method 'mag_bert' needs text and at least one of video, audio (--modalities "
                             "text,video / text,audio / text,video,audio); it got text only")
        if settings.injection_index > encoder.num_layers:
            raise ValueError(f"mag_bert.injection_index={settings.injection_index}: the encoder {encoder.name!r} "
                             f"has {encoder.num_layers} layers (0..{encoder.num_layers} allowed)")
        if encoder.pooler is None:
            raise ValueError(f"method 'mag_bert' classifies BERT's pooled output, but the text encoder "
                             f"{encoder.name!r} was loaded without a pooler")
        self.cfg = settings
        self.encoder = encoder
        if settings.classify == "cls":  # no gradient for a part nothing reads (and DDP needs none)
            encoder.pooler.requires_grad_(False)
        self.streams = list(dims)
        hidden = encoder.hidden_size
        init_std = float(getattr(encoder.model.config, "initializer_range", 0.02))
        beta = settings.beta_shift if settings.beta_shift is not None else BETA_SHIFT[config.data.task]
        self.aligners = nn.ModuleDict({s: CTCAligner(d, max_len=settings.ctc_max_len) for s, d in dims.items()}
                                      if settings.align == "ctc" else {})
        self.mag = MAG(hidden, dims, beta_shift=beta, dropout=settings.dropout, init_std=init_std)
        self.dropout = nn.Dropout(config.model.dropout)
        self.head = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.head.weight, std=init_std)
        nn.init.zeros_(self.head.bias)

    def _aligned(self, batch: Batch, text_mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each stream aligned to the text positions: {name: ((b, n, d), (b,) has frames)}.
        A stream the batch lacks (dropped at test time) is left out: it has no frames."""
        out = {}
        for name in self.streams:
            x, mask = getattr(batch, name), getattr(batch, f"{name}_mask")
            if x is None:
                continue
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()
            x = x * mask[..., None].to(x.dtype)  # padded frames are zero whatever the batch held there
            if name in self.aligners:
                aligned = self.aligners[name](x, mask, text_mask)
            else:
                aligned = area_align(x, mask, text_mask)
            out[name] = (aligned, mask.any(1))
        return out

    def forward(self, batch: Batch) -> IntentOutput:
        att = batch.attention_mask
        text_mask = att.bool()
        i = self.cfg.injection_index
        h = self.encoder.embeddings(batch.input_ids, batch.token_type_ids)  # (b, n, h)
        layer_mask = self.encoder.extended_mask(att, h)
        h = self.encoder.run_layers(h, att, 0, i, mask=layer_mask)
        h, alpha = self.mag(h, self._aligned(batch, text_mask))  # (b, n, h), (b, n)
        h = self.encoder.run_layers(h, att, i, None, mask=layer_mask)
        pooled = (self.encoder.pooled_output(h) if self.cfg.classify == "pooler"
                  else self.encoder.pool(h, att, "cls"))  # (b, h)
        logits = self.head(self.dropout(pooled))  # (b, C)
        real = text_mask.to(alpha.dtype)
        mean_alpha = (alpha * real).sum(1) / real.sum(1).clamp_min(1.0)  # (b,)
        return IntentOutput(logits=logits, pooled=pooled, extras={"alpha": mean_alpha})

    def loss(self, out: IntentOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy on in-scope rows (manager.py), with the mean gate shift alpha logged."""
        ce, parts = super().loss(out, batch)
        return ce, {**parts, "alpha": float(out.extras["alpha"].detach().mean())}
