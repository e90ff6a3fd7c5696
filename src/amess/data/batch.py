"""Batches: per-batch padding and boolean masks from the true lengths.

Features are stored compactly (float32 or float16, unpadded); a batch pads each
stream only to the longest sample *in the batch*, never to the dataset maximum.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
import torch


@dataclass
class Sample:
    """One utterance as a reader yields it (unpadded)."""

    id: str
    text: str
    label: int  # index into the dataset's label list; out-of-scope rows use C (== len(labels))
    video: np.ndarray | None = None  # (T_v, d_v) float32, already truncated to max length
    audio: np.ndarray | None = None  # (T_a, d_a) float32
    context: str | None = None  # previous utterance text (multi-turn mode), else None
    line: int | None = None  # line of the split file it was read from (for error messages)


@dataclass
class Batch:
    """A padded batch. Masks are boolean, True on real positions.

    Shapes: b batch, n text tokens, m_v / m_a video / audio frames.
    """

    ids: list[str]
    input_ids: torch.Tensor  # (b, n) long
    attention_mask: torch.Tensor  # (b, n) long, 1 on real tokens
    labels: torch.Tensor  # (b,) long
    token_type_ids: torch.Tensor | None = None  # (b, n) long
    video: torch.Tensor | None = None  # (b, m_v, d_v) float32
    video_mask: torch.Tensor | None = None  # (b, m_v) bool
    audio: torch.Tensor | None = None  # (b, m_a, d_a) float32
    audio_mask: torch.Tensor | None = None  # (b, m_a) bool
    extras: dict = field(default_factory=dict)

    def _map(self, fn) -> "Batch":
        """A new batch with `fn` applied to every tensor (fields and extras)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out = {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        out["extras"] = {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in self.extras.items()}
        return Batch(**out)

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> "Batch":
        """The batch on `device`. `non_blocking` (default: True for a CUDA device, else False):
        asynchronous host-to-GPU copies, which overlap the next step when the batch is in pinned
        memory (`pin_memory`); never for copies to the CPU, whose values must be there on return."""
        if non_blocking is None:
            non_blocking = torch.device(device).type == "cuda"
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """The batch in page-locked memory (the DataLoader calls this with `pin_memory=True`,
        which `make_loader` sets for a CUDA device)."""
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return len(self.ids)


def pad_frames(arrays: Sequence[np.ndarray | None], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length `(T_i, dim)` arrays to `(b, max T_i, dim)` with a bool mask.

    A missing array (None) or a zero-length one gives an all-False mask row; the
    model must treat such a sample as having no frames of that modality.
    """
    lengths = [0 if a is None else int(a.shape[0]) for a in arrays]
    m = max(1, max(lengths))
    out = torch.zeros(len(arrays), m, dim, dtype=torch.float32)
    mask = torch.zeros(len(arrays), m, dtype=torch.bool)
    for i, a in enumerate(arrays):
        if a is not None and lengths[i] > 0:
            out[i, : lengths[i]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
            mask[i, : lengths[i]] = True
    return out, mask


class Collator:
    """Tokenise text and pad features per batch.

    `text_max_len` counts special tokens (MIntRec's official 30 includes [CLS]/[SEP]).
    With a context (multi-turn), the pair `(text, context)` is encoded with segment id 1
    on the context, as the MIntRec2.0 framework does. `hook(samples, batch)`, a method's
    collator hook (`IntentModel.collate_hook`), adds its own inputs to `batch.extras`.
    """

    def __init__(self, tokenizer, *, text_max_len: int, video_dim: int | None, audio_dim: int | None,
                 hook=None):
        self.tokenizer = tokenizer
        self.hook = hook
        self.text_max_len = text_max_len
        self.video_dim = video_dim
        self.audio_dim = audio_dim

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        texts = [s.text for s in samples]
        contexts = [s.context for s in samples]
        if any(c is not None for c in contexts):
            enc = self.tokenizer(texts, [c or "" for c in contexts], padding=True, truncation=True,
                                 max_length=self.text_max_len, return_tensors="pt")
        else:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.text_max_len,
                                 return_tensors="pt")
        batch = Batch(
            ids=[s.id for s in samples],
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            token_type_ids=enc.get("token_type_ids"),
            labels=torch.tensor([s.label for s in samples], dtype=torch.long),
        )
        if self.video_dim is not None:
            batch.video, batch.video_mask = pad_frames([s.video for s in samples], self.video_dim)
        if self.audio_dim is not None:
            batch.audio, batch.audio_mask = pad_frames([s.audio for s in samples], self.audio_dim)
        if self.hook is not None:
            self.hook(samples, batch)
        return batch
