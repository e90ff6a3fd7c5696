"""MISA: modality-invariant and -specific representations (Hazarika et al., ACM MM 2020).

Follows the MIntRec framework's implementation (github.com/thuiar/MIntRec), cited below by
file: `backbones/FusionNets/MISA.py` (the model), `methods/MISA/manager.py` (the loss and
its weights), `methods/MISA/utils.py` (CMD, DiffLoss, MSE) and `configs/misa_bert.py`
(the defaults of `MisaSettings`; `configs/misa_bert_bi.py` for the binary task, quoted in
the field docstrings). Read top to bottom: settings, the loss functions, the sequence
summariser, the model.

The model (MISA.py):
1. Utterance vectors. Text: the encoder's last hidden states, mean over the real tokens.
   Video, audio: two stacked bidirectional LSTMs over the real frames (packed), a LayerNorm
   between them; the final states of both layers in both directions are concatenated.
2. `project_m`: Linear -> ReLU -> LayerNorm to `hidden_size`, one per modality (u_m).
3. Subspaces: `private_m` (Linear -> Sigmoid, one per modality) and `shared` (one Linear ->
   Sigmoid for every modality); `recon_m` (Linear) maps private_m + shared_m back to u_m.
4. Fusion: the 2s codes [private_t, private_v, private_a, shared_t, shared_v, shared_a] as
   a sequence through one Transformer encoder layer (2 heads), concatenated, then
   Linear(2sh, sh) -> Dropout -> ReLU -> Linear(sh, C).

The loss (manager.py `_train`): CE + diff_weight * L_diff + sim_weight * L_sim +
recon_weight * L_recon, all computed in `MISA.loss` and reported by part:
- `diff`: DiffLoss (`diff_loss`) between private_m and shared_m for each modality, plus
  between each pair of private codes; summed, as in `_get_diff_loss`.
- `sim_domain` (`similarity=domain`, the MIntRec config's `use_cmd_sim: False`): the
  cross-entropy of a modality discriminator on the shared codes seen through a gradient
  reversal layer (weight `reverse_grad_weight`), `_get_domain_loss`; or `sim_cmd`
  (`similarity=cmd`): the central moment discrepancy of order `cmd_moments` between the
  shared codes of each pair of modalities, averaged over the pairs, `_get_cmd_loss`.
- `recon`: MSE(recon_m, u_m) averaged over the modalities, `_get_recon_loss`.

With two modalities (text + video or text + audio) every sum runs over what exists: diff
has the two private-shared terms and the one private-private pair, CMD its one pair,
recon averages over two, the discriminator has two classes, and the head reads 4 codes:
Linear(4h, 2h). Text alone is refused: MISA's losses need a second modality.

Deviations from the reference, each on purpose:
- Lengths. The reference packs the video and audio LSTMs with the *text* lengths
  (MISA.py `forward`: `lengths = mask_len`, the token count) and reads features padded to
  fixed lengths; we pack each stream with its own true length from its mask, so padded
  frames never enter the LSTM and appending padding changes no output.
- Frameless samples (all-False mask; MIntRec has utterances with no detected speaker):
  their LSTM summary is a zero vector (it is not run on padding), and they are left out of
  the loss terms of that modality (diff, similarity, reconstruction): there is nothing of
  the modality to align or reconstruct. The reference would run the LSTM over zeros.
- Sizes come from the data and the encoder: the text vector has the encoder's hidden size
  (384 with MiniLM, 768 with bert-base), the LSTM width is the feature size as in the
  reference (`rnn_hidden` can shrink it), nothing assumes 768.
- `sp_discriminator` (MISA.py) is left out: its outputs are computed but never enter the
  loss, so it would be a parameter without gradient (and trips DDP).
- `pooled` (what OOD detectors such as Mahalanobis read) is the input of the last Linear,
  the (b, sh) penultimate layer of the fusion head.
- The text vector is always the masked mean (the reference's choice), whatever
  `model.pooling` says.
- Training schedule: the one loop runs AdamW with warm-up and linear decay, gradient-norm
  clipping and the encoder's own LR. The reference uses Adam, lr 3e-5 for every parameter
  (2e-5 binary), no clipping (`grad_clip: -1`), ExponentialLR(gamma 0.5; 0.3 binary)
  stepped after each epoch without dev improvement, batch 16, patience 8, monitor macro
  F1. The closest our loop comes: `--lr 3e-5 --encoder-lr 3e-5 --batch-size 16 --patience 8
  --set train.grad_clip=0 --set train.weight_decay=0 --set train.warmup_ratio=0`.

einops legend:
    b  batch              n  text tokens        m  frames of one stream
    s  modalities the model was built with (2 or 3; text first)
    t  codes in the fusion sequence (2s: privates, then shared)
    h  `hidden_size`      d  a feature or encoder size       C  intent labels
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from amess.data.batch import Batch
from amess.models.base import IntentModel, IntentOutput, autocast_off, register_method
from amess.models.encoders import TextEncoder

RNN_CELLS = ("lstm", "gru")
SIMILARITIES = ("domain", "cmd")
FUSION_HEADS = 2
"""Heads of the fusion Transformer layer (MISA.py: `nn.TransformerEncoderLayer(d_model=hidden_size, nhead=2)`)."""
FUSION_FEEDFORWARD = 2048
FUSION_DROPOUT = 0.1
"""Feed-forward width and dropout of the fusion layer: PyTorch's defaults, which the reference keeps."""
DIFF_EPS = 1e-6
"""Added to the row norms in `diff_loss` (utils.py DiffLoss)."""


@dataclass
class MisaSettings:
    """MISA settings (the `misa` section of a config); defaults from the reference's
    `configs/misa_bert.py` (MIntRec, 20 intents)."""

    hidden_size: int = 256
    """h, the size of the shared and private subspaces (reference `hidden_size`: 256, both tasks)."""
    rnn_cell: str = "lstm"
    """Recurrent cell of the video and audio summarisers: `lstm` or `gru` (reference `rnncell`: lstm)."""
    rnn_hidden: int | None = None
    """Width of each LSTM direction; None = the stream's feature size, as in the reference (768 for
    wav2vec 2.0 audio makes a 24M-parameter audio LSTM stack; a smaller width is cheaper)."""
    dropout: float = 0.1
    """Dropout of the fusion head and of the domain discriminator (reference `dropout_rate`: 0.1;
    0.0 binary)."""
    similarity: str = "domain"
    """Similarity loss: `domain` (adversarial modality discriminator through gradient reversal;
    the MIntRec config's `use_cmd_sim: False`) or `cmd` (central moment discrepancy, the MISA
    paper's main choice)."""
    cmd_moments: int = 5
    """Highest moment matched by CMD (manager.py `_get_cmd_loss`: 5)."""
    reverse_grad_weight: float = 0.8
    """Gradient reversal factor in front of the domain discriminator (reference: 0.8, both tasks)."""
    diff_weight: float = 0.7
    """Weight of the difference (orthogonality) loss (reference: 0.7; 0.6 binary)."""
    sim_weight: float = 0.7
    """Weight of the similarity loss (reference: 0.7; 0.6 binary)."""
    recon_weight: float = 0.6
    """Weight of the reconstruction loss (reference: 0.6; 0.7 binary)."""

    def __post_init__(self) -> None:
        if self.rnn_cell not in RNN_CELLS:
            raise ValueError(f"misa.rnn_cell must be one of {list(RNN_CELLS)}, got {self.rnn_cell!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"misa.similarity must be one of {list(SIMILARITIES)}, got {self.similarity!r}")
        if self.hidden_size < FUSION_HEADS or self.hidden_size % FUSION_HEADS:
            raise ValueError(f"misa.hidden_size must be a positive multiple of the fusion layer's "
                             f"{FUSION_HEADS} heads, got {self.hidden_size}")
        if self.rnn_hidden is not None and self.rnn_hidden < 1:
            raise ValueError(f"misa.rnn_hidden must be >= 1 or null, got {self.rnn_hidden}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"misa.dropout must be in [0, 1), got {self.dropout}")
        if self.cmd_moments < 1:
            raise ValueError(f"misa.cmd_moments must be >= 1, got {self.cmd_moments}")
        for name in ("reverse_grad_weight", "diff_weight", "sim_weight", "recon_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"misa.{name} must be >= 0, got {getattr(self, name)}")


# ----- the losses of methods/MISA/utils.py, as pure functions -------------------------------

def cmd(x1: torch.Tensor, x2: torch.Tensor, moments: int) -> torch.Tensor:
    """Central moment discrepancy (Zellinger et al. 2017; utils.py `CMD`) between two sets of
    codes `(b1, h)` and `(b2, h)`: ||E x1 - E x2|| + sum_{k=2..moments} ||c_k(x1) - c_k(x2)||,
    c_k the k-th central moment per dimension. 0 for identical sets. Returns a scalar."""
    m1, m2 = x1.mean(0), x2.mean(0)  # (h,)
    c1, c2 = x1 - m1, x2 - m2
    total = torch.linalg.vector_norm(m1 - m2)  # its gradient at 0 is 0, not NaN
    for k in range(2, moments + 1):
        total = total + torch.linalg.vector_norm(c1.pow(k).mean(0) - c2.pow(k).mean(0))
    return total


def diff_loss(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Soft orthogonality of two codes of the same rows (utils.py `DiffLoss`): centre each
    over the batch, L2-normalise each row (norms detached, as in the reference), then the
    mean squared entry of the (h1, h2) cross-correlation. 0 when the centred codes span
    orthogonal subspaces. x1: (b, h1), x2: (b, h2); returns a scalar."""
    x1 = x1 - x1.mean(0, keepdim=True)
    x2 = x2 - x2.mean(0, keepdim=True)
    x1 = x1 / (torch.linalg.vector_norm(x1, dim=1, keepdim=True).detach() + DIFF_EPS)
    x2 = x2 / (torch.linalg.vector_norm(x2, dim=1, keepdim=True).detach() + DIFF_EPS)
    return (x1.t() @ x2).pow(2).mean()


class _ReverseGrad(torch.autograd.Function):
    """Identity forward, gradient times -weight backward (MISA.py `ReverseLayerF`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.neg() * ctx.weight, None


def reverse_grad(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Gradient reversal layer: `x` forward, `-weight * grad` backward."""
    return _ReverseGrad.apply(x, weight)


# ----- the model -------------------------------------------------------------------------

class SequenceSummary(nn.Module):
    """MISA.py `_extract_features`: `(b, m, d) + mask -> (b, 4r)`.

    Two stacked bidirectional RNNs (`lstm` or `gru`, width r per direction) packed over each
    sample's true length (the count of True in its mask; frames are padded at the end), a
    LayerNorm over the first layer's outputs in between. Returns the final hidden states of
    layer 1 and layer 2, for both directions, in the reference's order. A sample with no
    frame gets a zero vector.
    """

    def __init__(self, in_dim: int, width: int, *, cell: str):
        super().__init__()
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn1 = rnn(in_dim, width, bidirectional=True, batch_first=True)
        self.norm = nn.LayerNorm(2 * width)
        self.rnn2 = rnn(2 * width, width, bidirectional=True, batch_first=True)
        self.out_dim = 4 * width

    @staticmethod
    def _final(state) -> torch.Tensor:
        return state[0] if isinstance(state, tuple) else state  # LSTM: (h, c); GRU: h

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        lengths = mask.sum(1)  # (b,)
        with autocast_off(x.device):  # float32 RNNs under mixed precision (see `autocast_off`)
            x = x.float()
            out = x.new_zeros(b, self.out_dim)
            rows = torch.nonzero(lengths > 0).squeeze(1)  # samples with frames
            if rows.numel() == 0:
                return out
            lens = lengths[rows].cpu()
            packed = pack_padded_sequence(x[rows], lens, batch_first=True, enforce_sorted=False)
            h1, final1 = self.rnn1(packed)
            h1, _ = pad_packed_sequence(h1, batch_first=True)  # (b', m', 2r)
            packed2 = pack_padded_sequence(self.norm(h1), lens, batch_first=True, enforce_sorted=False)
            _, final2 = self.rnn2(packed2)
            # (2 directions, b', r) each -> cat -> (2, b', 2r) -> the reference's permute + view
            finals = torch.cat([self._final(final1), self._final(final2)], dim=2)
            return out.index_copy(0, rows, rearrange(finals, "dir b r -> b (dir r)"))


@dataclass
class MisaSubspaces:
    """The codes MISA's auxiliary losses read, stacked over the modalities in build order
    (text first): each `(b, s, h)`; `present (b, s)` bool (text always True; a stream is
    present when the sample has at least one frame); `domain_logits (b, s, s)` the
    discriminator's scores of each shared code through gradient reversal (None with CMD)."""

    utterance: torch.Tensor
    shared: torch.Tensor
    private: torch.Tensor
    recon: torch.Tensor
    present: torch.Tensor
    domain_logits: torch.Tensor | None = None


@dataclass
class MisaOutput(IntentOutput):
    """`IntentOutput` plus the subspace codes for `MISA.loss`; kept out of `extras`, which the
    loop saves per sample, since they are a training signal only."""

    subspaces: MisaSubspaces | None = None


@register_method("misa")
class MISA(IntentModel):
    """MISA (Hazarika et al. 2020): shared and private subspaces per modality, reconstruction,
    a fusion Transformer, and the CMD/adversarial, difference and reconstruction losses."""

    Settings = MisaSettings
    reads = ("text", "video", "audio")
    needs_nonverbal = True
    requires = ("text",)

    def __init__(self, *, settings: MisaSettings, encoder: TextEncoder, num_labels: int,
                 video_dim: int | None = None, audio_dim: int | None = None, **_):
        super().__init__()
        cfg = self.cfg = settings
        self.streams = [name for name, dim in (("video", video_dim), ("audio", audio_dim)) if dim is not None]
        if not self.streams:
            raise ValueError("method 'misa' needs text and at least one of video and audio (its subspace "
                             "losses align modalities); got text only: use --modalities text,video,audio, "
                             "text,video or text,audio")
        self.num_labels = num_labels
        self.encoder = encoder
        self.modalities = ["text", *self.streams]
        s, h = len(self.modalities), cfg.hidden_size
        dims = {"video": video_dim, "audio": audio_dim}
        self.summary = nn.ModuleDict({m: SequenceSummary(dims[m], cfg.rnn_hidden or dims[m], cell=cfg.rnn_cell)
                                      for m in self.streams})
        in_dims = {"text": encoder.hidden_size, **{m: self.summary[m].out_dim for m in self.streams}}
        self.project = nn.ModuleDict({m: nn.Sequential(nn.Linear(in_dims[m], h), nn.ReLU(), nn.LayerNorm(h))
                                      for m in self.modalities})
        self.private = nn.ModuleDict({m: nn.Sequential(nn.Linear(h, h), nn.Sigmoid()) for m in self.modalities})
        self.shared = nn.Sequential(nn.Linear(h, h), nn.Sigmoid())
        self.recon = nn.ModuleDict({m: nn.Linear(h, h) for m in self.modalities})
        self.discriminator = (nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(h, s))
                              if cfg.similarity == "domain" else None)
        self.fusion = nn.TransformerEncoderLayer(h, FUSION_HEADS, dim_feedforward=FUSION_FEEDFORWARD,
                                                 dropout=FUSION_DROPOUT, batch_first=True)
        self.head_hidden = nn.Sequential(nn.Linear(2 * s * h, s * h), nn.Dropout(cfg.dropout), nn.ReLU())
        self.head = nn.Linear(s * h, num_labels)

    def _stream(self, batch: Batch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x (b, m, d), mask (b, m) bool)`; a stream the batch lacks counts as no frames."""
        x, mask = getattr(batch, name), getattr(batch, f"{name}_mask")
        b = batch.input_ids.shape[0]
        if x is None:
            dim = self.summary[name].rnn1.input_size
            return (torch.zeros(b, 1, dim, device=batch.input_ids.device),
                    torch.zeros(b, 1, dtype=torch.bool, device=batch.input_ids.device))
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return x, mask.bool()

    def forward(self, batch: Batch) -> MisaOutput:
        hidden = self.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              token_type_ids=batch.token_type_ids)  # (b, n, d)
        b = hidden.shape[0]
        vectors = {"text": self.encoder.pool(hidden, batch.attention_mask, "mean")}  # (b, d)
        present = {"text": torch.ones(b, dtype=torch.bool, device=hidden.device)}
        for m in self.streams:
            x, mask = self._stream(batch, m)
            vectors[m] = self.summary[m](x, mask)  # (b, 4r)
            present[m] = mask.any(1)
        u = {m: self.project[m](vectors[m]) for m in self.modalities}  # (b, h) each
        private = {m: self.private[m](u[m]) for m in self.modalities}
        shared = {m: self.shared(u[m]) for m in self.modalities}
        stack = lambda d: torch.stack([d[m] for m in self.modalities], dim=1)  # noqa: E731  (b, s, h)
        sub = MisaSubspaces(
            utterance=stack(u), shared=stack(shared), private=stack(private),
            recon=stack({m: self.recon[m](private[m] + shared[m]) for m in self.modalities}),
            present=stack(present))
        if self.discriminator is not None:
            sub.domain_logits = self.discriminator(reverse_grad(sub.shared, self.cfg.reverse_grad_weight))  # (b, s, s)
        codes = torch.cat([sub.private, sub.shared], dim=1)  # (b, t, h), t = 2s
        fused = rearrange(self.fusion(codes), "b t h -> b (t h)")  # (b, 2sh)
        z = self.head_hidden(fused)  # (b, sh)
        return MisaOutput(logits=self.head(z), pooled=z, subspaces=sub)

    # ----- manager.py: the loss ------------------------------------------------------------

    def subspace_losses(self, sub: MisaSubspaces) -> dict[str, torch.Tensor]:
        """The three auxiliary losses over the rows that have each modality: `diff`,
        `sim_domain` or `sim_cmd`, and `recon` (scalars)."""
        zero = sub.shared.sum() * 0.0
        idx = range(len(self.modalities))
        diff = zero
        for i in idx:  # private vs shared of each modality
            rows = sub.present[:, i]
            if rows.any():
                diff = diff + diff_loss(sub.private[rows, i], sub.shared[rows, i])
        for i, j in itertools.combinations(idx, 2):  # across the private codes
            rows = sub.present[:, i] & sub.present[:, j]
            if rows.any():
                diff = diff + diff_loss(sub.private[rows, i], sub.private[rows, j])
        recon = zero
        for i in idx:
            rows = sub.present[:, i]
            if rows.any():
                recon = recon + F.mse_loss(sub.recon[rows, i], sub.utterance[rows, i])
        out = {"diff": diff, "recon": recon / len(self.modalities)}
        if self.cfg.similarity == "cmd":
            pairs = list(itertools.combinations(idx, 2))
            sim = zero
            for i, j in pairs:
                rows = sub.present[:, i] & sub.present[:, j]
                if rows.any():
                    sim = sim + cmd(sub.shared[rows, i], sub.shared[rows, j], self.cfg.cmd_moments)
            out["sim_cmd"] = sim / len(pairs)
        else:
            logits = sub.domain_logits[sub.present]  # (rows with the modality, s)
            domain = torch.arange(len(self.modalities), device=logits.device).expand_as(sub.present)[sub.present]
            out["sim_domain"] = F.cross_entropy(logits, domain)
        return out

    def loss(self, out: MisaOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """manager.py: CE (in-scope rows) + diff_weight * diff + sim_weight * sim +
        recon_weight * recon. The auxiliary losses use every row, out-of-scope ones included
        (they need no label)."""
        ce, parts = super().loss(out, batch)
        aux = self.subspace_losses(out.subspaces)
        sim = aux.get("sim_cmd", aux.get("sim_domain"))
        total = (ce + self.cfg.diff_weight * aux["diff"] + self.cfg.sim_weight * sim
                 + self.cfg.recon_weight * aux["recon"])
        parts.update({k: float(v.detach()) for k, v in aux.items()})
        return total, parts
