"""MulT: the Multimodal Transformer (Tsai et al., ACL 2019) over BERT's token states.

Follows thuiar/MIntRec `backbones/FusionNets/MULT.py` (the model),
`backbones/SubNets/transformers_encoder/{transformer,multihead_attention,position_embedding}.py`
(the crossmodal transformer), `configs/mult_bert.py` / `configs/mult_bert_bi.py` (defaults)
and `methods/MULT/manager.py` (loss). Read top to bottom: settings, masks and positions, the
attention layer, the transformer, the temporal projection, then the model.

For modalities l (text: the encoder's last hidden states), a (audio), v (video):
1. temporal projection: dropout (text only), then a 1-D convolution without padding or bias
   to `dst_feature_dims` (kernel 5 for text, 1 for video and audio);
2. crossmodal transformers: each target modality attends to each other one (l <- a, l <- v,
   a <- l, a <- v, v <- l, v <- a), `n_levels` pre-norm layers each;
3. per target, its crossmodal outputs concatenated and a self-attention "memory"
   transformer of max(n_levels, 3) layers over them;
4. the last state of each memory, concatenated (l, a, v order); a residual block
   proj2(dropout(relu(proj1(x)))) + x; `Linear` to the C logits; cross-entropy (manager.py).

Deviations from the reference, each deliberate:
- Masks from the true lengths, everywhere. The reference pads to fixed lengths (text 30,
  video 230, audio 480) and uses no padding masks. Here every crossmodal and self
  attention has a key padding mask; padded steps are zeroed before the convolutions (the
  reference convolves BERT's states at [PAD] tokens); a convolution of kernel k makes
  max(L - k + 1, 1) real steps from L real ones (a sequence shorter than the kernel is
  padded with zeros to it), so appending padding changes no output.
- `attn_mask` (on in the reference) is its "future" mask `buffered_future_mask`: query i
  may attend to key j only if j <= i + |n_k - n_q|. The reference computes it from the
  padded lengths; here from each sample's true lengths (so the memory transformers are
  causal over the real steps, as there).
- The "last state" (`h[-1]` in MULT.py, a padded step in the reference) is the state at the
  last REAL step of each sample (`last_state=last`; `mean` takes the masked mean instead).
  A sample with no frames of a modality has zeros as that modality's last state; an
  attention whose sample has no key at all adds nothing (the residual passes through), so
  such a sample gives finite outputs.
- Any subset of text and at least one other stream: with M modalities each target attends
  to the M - 1 others, the memories are (M - 1) * d wide and the last states
  M (M - 1) d (the reference: M = 3, 720 at d = 120). Text alone is an error.
- The text side is `encoder` (any Hugging Face encoder: 384-d MiniLM by default, 768-d BERT
  in the reference); video / audio sizes come from the data. As in MULT.py a modality
  whose size already equals `dst_feature_dims` is not projected.
- Attention is `F.scaled_dot_product_attention` with the reference's projections (one
  (3d, d) in-projection, Xavier-uniform, zero biases) and its dropout on the attention
  weights; positions are fairseq's sinusoids (sin half, cos half, from position 1); the
  new layers are plain modules initialised here as in the reference.
- The memory transformers recompute their layers' activations in the backward pass
  (`checkpoint=memory`, the default; `none` is the reference's behaviour, `all` also the
  crossmodal ones). Same losses and gradients (the dropout masks are replayed); it brings a
  demo-data training run under 2 GiB (BENCHMARKS.md).
- `pooled` (what out-of-scope detectors such as Mahalanobis read) is the residual block's
  output, the head's input; the reference's manager keeps the concatenated last states
  (before the residual block) as its features.
- Training runs in the one loop: AdamW with warm-up and linear decay and gradient-norm
  clipping (`train.grad_clip`), where manager.py uses Adam at lr 3e-5 for every parameter
  (binary: 1e-5) with ReduceLROnPlateau and clip_grad_value 0.5 (binary 0.4); `--lr 3e-5
  --set train.encoder_lr=3e-5` matches its learning rate. `model.pooling` and
  `model.dropout` are not read (the reference has no dropout before `out_layer`).

The defaults are MIntRec's 20-class values (configs/mult_bert.py) for every task. Other
reference values, for `--set mult.KEY=VALUE`: MIntRec binary (configs/mult_bert_bi.py):
nheads 10, n_levels 5, attn_dropout 0.1, attn_dropout_v 0.1, relu_dropout 0.1,
res_dropout 0.1, conv1d_kernel_size_a 2, the rest as here; MIntRec2.0 (thuiar/MIntRec2.0
`configs/single_turn/mult.py`): dst_feature_dims 80, nheads 2, n_levels 2, relu_dropout 0.3,
the rest as here.

einops legend:
    b  batch       n  steps of the target sequence    k  steps of the source (key) sequence
    h  heads       e  size of one head                d  `dst_feature_dims` (or (M - 1) d)
    C  intent labels
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

from amess.config import Config
from amess.data.batch import Batch
from amess.models.base import IntentModel, IntentOutput, register_method
from amess.models.encoders import TextEncoder

ORDER = ("text", "audio", "video")
"""Modality order of the concatenations (MULT.py: l, a, v)."""
MEMORY_MIN_LAYERS = 3
"""The memory transformers have max(n_levels, 3) layers (MULT.py `_get_network(layers=3)`)."""
LAST_STATES = ("last", "mean")
CHECKPOINTS = ("none", "memory", "all")


@dataclass
class MultSettings:
    """MulT settings: the `mult` section of a config (defaults: MIntRec's configs/mult_bert.py)."""

    dst_feature_dims: int = 120
    """d: the size of every modality after the temporal convolution (memories are (M-1) d wide)."""
    nheads: int = 8
    """Attention heads of every transformer; must divide dst_feature_dims."""
    n_levels: int = 8
    """Layers of each crossmodal transformer; the memory transformers have max(n_levels, 3)."""
    attn_dropout: float = 0.0
    """Attention-weight dropout when the keys are text, and in the memory transformers."""
    attn_dropout_v: float = 0.2
    """Attention-weight dropout when the keys are video."""
    attn_dropout_a: float = 0.2
    """Attention-weight dropout when the keys are audio."""
    relu_dropout: float = 0.0
    """Dropout after the ReLU of each feed-forward block."""
    res_dropout: float = 0.0
    """Dropout on each attention and feed-forward output before its residual sum."""
    embed_dropout: float = 0.1
    """Dropout on each transformer's scaled input plus positions (queries and keys)."""
    output_dropout: float = 0.2
    """Dropout inside the output residual block."""
    text_dropout: float = 0.4
    """Dropout on the encoder's hidden states before the text convolution."""
    attn_mask: bool = True
    """The reference's "future" mask: query i sees key j only if j <= i + |L_k - L_q| (true lengths)."""
    conv1d_kernel_size_l: int = 5
    """Kernel of the text temporal convolution (no padding: L - k + 1 steps)."""
    conv1d_kernel_size_v: int = 1
    """Kernel of the video temporal convolution."""
    conv1d_kernel_size_a: int = 1
    """Kernel of the audio temporal convolution."""
    last_state: str = "last"
    """What each memory gives the head: `last` (the state at the last real step, the reference's
    h[-1] on true lengths) or `mean` (the masked mean over real steps)."""

    checkpoint: str = "memory"
    """Recompute layer activations in the backward pass instead of keeping them (activation
    checkpointing, layer by layer; the dropout masks are replayed, so losses and gradients are
    the same as without it): `none`, `memory` (the three memory transformers, the widest
    layers: about a third of the activation memory for ~10% of the step time) or `all`
    (every transformer). Not in the reference; training memory only, no effect at evaluation."""

    def __post_init__(self) -> None:
        positive = {"dst_feature_dims": self.dst_feature_dims, "nheads": self.nheads, "n_levels": self.n_levels,
                    "conv1d_kernel_size_l": self.conv1d_kernel_size_l,
                    "conv1d_kernel_size_v": self.conv1d_kernel_size_v,
                    "conv1d_kernel_size_a": self.conv1d_kernel_size_a}
        for name, v in positive.items():
            if v < 1:
                raise ValueError(f"mult.{name} must be >= 1, got {v}")
        if self.dst_feature_dims % self.nheads:
            raise ValueError(f"mult.nheads={self.nheads} must divide mult.dst_feature_dims={self.dst_feature_dims}")
        for name in ("attn_dropout", "attn_dropout_v", "attn_dropout_a", "relu_dropout", "res_dropout",
                     "embed_dropout", "output_dropout", "text_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"mult.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"mult.checkpoint must be one of {list(CHECKPOINTS)}, got {self.checkpoint!r}")
        if self.last_state not in LAST_STATES:
            raise ValueError(f"mult.last_state must be one of {list(LAST_STATES)}, got {self.last_state!r}")


def attention_allowed(q_mask: torch.Tensor, k_mask: torch.Tensor, causal: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys each query may attend to, and whether the sample has any key.

    q_mask: (b, n) bool, k_mask: (b, k) bool (True = real step). Returns allowed (b, n, k)
    bool and has_keys (b,). With `causal`, the reference's future mask on true lengths:
    j <= i + |L_k - L_q|. A row left with no key (a sample with no frames) may see key 0,
    so that softmax stays finite; the caller discards what such a sample's attention gives.
    """
    n, k = q_mask.shape[1], k_mask.shape[1]
    allowed = k_mask[:, None, :].expand(-1, n, -1)  # (b, n, k)
    if causal:
        offset = (k_mask.sum(1) - q_mask.sum(1)).abs()  # (b,)
        i = torch.arange(n, device=q_mask.device)
        j = torch.arange(k, device=q_mask.device)
        allowed = allowed & (j[None, None, :] <= i[None, :, None] + offset[:, None, None])
    first = torch.zeros(k, dtype=torch.bool, device=k_mask.device)
    first[0] = True
    empty = ~allowed.any(-1, keepdim=True)  # (b, n, 1)
    return allowed | (empty & first), k_mask.any(1)


def sinusoidal_positions(n: int, d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, d) fairseq sinusoids for positions 1..n (position_embedding.py: [sin | cos], zero
    column when d is odd); the reference gives padding position 0, here it is masked instead."""
    half = d // 2
    scale = math.log(10000) / max(half - 1, 1)
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -scale)  # (half,)
    angles = torch.arange(1, n + 1, device=device, dtype=torch.float32)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (n, 2 half)
    if d % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(dtype)


class Attention(nn.Module):
    """Multi-head attention as multihead_attention.py: one (3d, d) in-projection (Xavier-uniform,
    zero bias), an output projection, dropout on the attention weights; with a boolean mask."""

    def __init__(self, d: int, *, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.in_proj = nn.Parameter(torch.empty(3 * d, d))
        self.in_bias = nn.Parameter(torch.zeros(3 * d))
        self.out = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                allowed: torch.Tensor) -> torch.Tensor:
        """q: (b, n, d); k, v: (b, k, d), or None for self-attention; allowed: (b, n, k) bool."""
        if k is None:
            q, k, v = F.linear(q, self.in_proj, self.in_bias).chunk(3, dim=-1)
        else:
            wq, wk, wv = self.in_proj.chunk(3)
            bq, bk, bv = self.in_bias.chunk(3)
            q, k, v = F.linear(q, wq, bq), F.linear(k, wk, bk), F.linear(v, wv, bv)
        q, k, v = (rearrange(t, "b n (h e) -> b h n e", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                             dropout_p=self.dropout if self.training else 0.0)  # (b, h, n, e)
        return self.out(rearrange(out, "b h n e -> b n (h e)"))


class TransformerLayer(nn.Module):
    """One pre-norm layer of transformer.py `TransformerEncoderLayer`: the first LayerNorm
    normalises queries and keys alike; a ReLU feed-forward block 4d wide."""

    def __init__(self, d: int, *, heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float):
        super().__init__()
        self.attn = Attention(d, heads=heads, dropout=attn_dropout)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        self.norms = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])
        self.relu_dropout = relu_dropout
        self.res_dropout = res_dropout

    def forward(self, x: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                allowed: torch.Tensor, has_keys: torch.Tensor) -> torch.Tensor:
        norm = self.norms[0]
        q = norm(x)
        a = self.attn(q, norm(k) if k is not None else None, norm(v) if v is not None else None, allowed)
        a = torch.where(has_keys[:, None, None], a, torch.zeros_like(a))  # no key: nothing to add
        x = x + F.dropout(a, self.res_dropout, self.training)
        h = F.dropout(F.relu(self.fc1(self.norms[1](x))), self.relu_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.res_dropout, self.training)


class CrossmodalTransformer(nn.Module):
    """transformer.py `TransformerEncoder`, masked: inputs scaled by sqrt(d) plus positions and
    dropout (keys and values each with their own dropout, as there), the layers, a final
    LayerNorm. With a source sequence it is crossmodal, without one self-attention."""

    def __init__(self, d: int, *, heads: int, layers: int, attn_dropout: float, relu_dropout: float,
                 res_dropout: float, embed_dropout: float, causal: bool, checkpoint: bool = False):
        super().__init__()
        self.scale = math.sqrt(d)
        self.checkpoint = checkpoint
        self.embed_dropout = embed_dropout
        self.causal = causal
        self.layers = nn.ModuleList(
            TransformerLayer(d, heads=heads, attn_dropout=attn_dropout, relu_dropout=relu_dropout,
                             res_dropout=res_dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        pos = sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)  # (n, d)
        return F.dropout(self.scale * x + pos, self.embed_dropout, self.training)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, src: torch.Tensor | None = None,
                src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (b, n, d) target, x_mask (b, n) bool; src: (b, k, d) source, src_mask (b, k) bool,
        or None (self-attention). Returns (b, n, d)."""
        allowed, has_keys = attention_allowed(x_mask, x_mask if src is None else src_mask, self.causal)
        h = self._embed(x)
        k = v = None
        if src is not None:
            k, v = self._embed(src), self._embed(src)
        recompute = self.checkpoint and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:  # keeps only the layer's inputs; the RNG state is replayed in backward
                h = torch.utils.checkpoint.checkpoint(layer, h, k, v, allowed, has_keys, use_reentrant=False)
            else:
                h = layer(h, k, v, allowed, has_keys)
        return self.norm(h)


class TemporalConv(nn.Module):
    """MULT.py `proj_l/a/v`: Conv1d without padding or bias, `(b, L, d_in) -> (b, L - k + 1, d)`,
    masked: padded steps are zeroed first, and a sample with L >= 1 real steps keeps
    max(L - k + 1, 1) (a sequence shorter than the kernel is padded with zeros to it).
    Identity when d_in == d, as in the reference."""

    def __init__(self, in_dim: int, d: int, *, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(in_dim, d, kernel_size=kernel, bias=False) if in_dim != d else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x * mask[..., None].to(x.dtype)
        if self.conv is None:
            return x, mask
        if x.shape[1] < self.kernel:
            x = F.pad(x, (0, 0, 0, self.kernel - x.shape[1]))
        y = rearrange(self.conv(rearrange(x, "b n d -> b d n")), "b d n -> b n d")  # (b, n', d)
        lengths = mask.sum(1)
        kept = torch.where(lengths > 0, (lengths - self.kernel + 1).clamp_min(1), torch.zeros_like(lengths))
        return y, torch.arange(y.shape[1], device=y.device)[None, :] < kept[:, None]


@register_method("mult")
class MulT(IntentModel):
    """MulT (Tsai et al., 2019): crossmodal transformers over BERT's states, video and audio."""

    Settings = MultSettings
    reads = ("text", "video", "audio")
    needs_nonverbal = True

    def __init__(self, *, config: Config, settings: MultSettings, encoder: TextEncoder, num_labels: int,
                 video_dim: int | None = None, audio_dim: int | None = None, **_):
        super().__init__()
        in_dims = {"text": encoder.hidden_size, "audio": audio_dim, "video": video_dim}
        self.modalities = [m for m in ORDER if in_dims[m] is not None]
        if len(self.modalities) < 2:
            raise ValueError("method 'mult' needs text and at least one of video, audio (--modalities "
                             "text,video / text,audio / text,video,audio); it got text only")
        s = settings
        self.cfg = s
        self.encoder = encoder
        d = s.dst_feature_dims
        kernels = {"text": s.conv1d_kernel_size_l, "audio": s.conv1d_kernel_size_a, "video": s.conv1d_kernel_size_v}
        # attention dropout by the modality of the keys (MULT.py `_get_network`)
        key_dropout = {"text": s.attn_dropout, "audio": s.attn_dropout_a, "video": s.attn_dropout_v}
        common = dict(heads=s.nheads, relu_dropout=s.relu_dropout, res_dropout=s.res_dropout,
                      embed_dropout=s.embed_dropout, causal=s.attn_mask)
        self.text_dropout = nn.Dropout(s.text_dropout)
        self.proj = nn.ModuleDict({m: TemporalConv(in_dims[m], d, kernel=kernels[m]) for m in self.modalities})
        self.cross = nn.ModuleDict({
            f"{t}_{src}": CrossmodalTransformer(d, layers=s.n_levels, attn_dropout=key_dropout[src],
                                                checkpoint=s.checkpoint == "all", **common)
            for t in self.modalities for src in self.modalities if src != t})
        mem = (len(self.modalities) - 1) * d
        self.memory = nn.ModuleDict({
            t: CrossmodalTransformer(mem, layers=max(s.n_levels, MEMORY_MIN_LAYERS), attn_dropout=s.attn_dropout,
                                     checkpoint=s.checkpoint != "none", **common)
            for t in self.modalities})
        combined = len(self.modalities) * mem
        self.proj1 = nn.Linear(combined, combined)
        self.proj2 = nn.Linear(combined, combined)
        self.out_dropout = nn.Dropout(s.output_dropout)
        self.out_layer = nn.Linear(combined, num_labels)

    def _sequences(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every modality after its temporal projection: {name: ((b, n', d), (b, n') bool)}.
        A stream the batch lacks (dropped at test time) counts as one with no frames."""
        hidden = self.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              token_type_ids=batch.token_type_ids)  # (b, n, h)
        raw = {"text": (self.text_dropout(hidden), batch.attention_mask.bool())}
        b = batch.input_ids.shape[0]
        for m in self.modalities[1:]:
            x, mask = getattr(batch, m), getattr(batch, f"{m}_mask")
            if x is None:
                in_dim = self.proj[m].conv.in_channels if self.proj[m].conv is not None else self.cfg.dst_feature_dims
                x = hidden.new_zeros(b, 1, in_dim)
                mask = torch.zeros(b, 1, dtype=torch.bool, device=hidden.device)
            elif mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            raw[m] = (x, mask.bool())
        return {m: self.proj[m](*raw[m]) for m in self.modalities}

    def _summary(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(b, n, d) -> (b, d): the state at the last real step, or the masked mean; zeros for a
        sample with no real step."""
        has = mask.any(1)  # (b,)
        if self.cfg.last_state == "mean":
            w = mask[..., None].to(h.dtype)
            return (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        last = (mask.sum(1) - 1).clamp_min(0)  # (b,)
        state = h[torch.arange(h.shape[0], device=h.device), last]  # (b, d)
        return torch.where(has[:, None], state, torch.zeros_like(state))

    def forward(self, batch: Batch) -> IntentOutput:
        seqs = self._sequences(batch)
        lasts = []
        for t in self.modalities:
            x, mask = seqs[t]
            crossed = [self.cross[f"{t}_{src}"](x, mask, *seqs[src]) for src in self.modalities if src != t]
            h = self.memory[t](torch.cat(crossed, dim=-1), mask)  # (b, n_t, (M-1) d)
            lasts.append(self._summary(h, mask))
        last_hs = torch.cat(lasts, dim=-1)  # (b, M (M-1) d)
        pooled = self.proj2(self.out_dropout(F.relu(self.proj1(last_hs)))) + last_hs  # (b, M (M-1) d)
        return IntentOutput(logits=self.out_layer(pooled), pooled=pooled)
