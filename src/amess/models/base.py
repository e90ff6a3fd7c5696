"""What every method shares: its output type, its base class and the method registry.

Adding a method is one file in `amess/models/` and one `@register_method("name")` line.
The one training loop (`amess.train`) only ever calls `model(batch)` and
`model.loss(output, batch)`, so a method's own loss terms live with the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from amess.data.batch import Batch


@dataclass
class IntentOutput:
    """What a method returns for a batch.

    logits: (b, C) scores over the in-scope intents, used for prediction.
    pooled: (b, h) the representation the head reads (used by OOD detectors, plots).
    extras: method-specific per-sample tensors, first dim b (e.g. A-MESS anchor positions,
        SS embeddings); the loop gathers them into the saved outputs.
    shared: batch-independent tensors (e.g. the label-description embeddings, (C, p)).
    """

    logits: torch.Tensor
    pooled: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)


class IntentModel(nn.Module):
    """Base class of every method.

    Subclasses are built with keyword arguments only:
    `cls(*, config, encoder, num_labels, video_dim, audio_dim, label_names, descriptions)`
    where `config` is the run's `amess.config.Config`, `encoder` a `TextEncoder`, the
    dims are None for modalities that are not used, and `descriptions` is None or one
    description string per label, in the order of `label_names` (SS, docs/amess-method.md).
    A method that does not use descriptions accepts and ignores them.

    `reads` names the modalities the method's forward uses: training loads feature files
    only for modalities that are both configured and read (a text model never pays the
    memory of video and audio features).
    """

    reads: tuple[str, ...] = ("text", "video", "audio")

    def loss(self, out: IntentOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss and its named parts (for logging). Default: cross-entropy.

        Rows whose label is out of range (out-of-scope rows, id == C) are left out of
        the cross-entropy; a method that uses them (outlier exposure) overrides this.
        """
        c = out.logits.shape[-1]
        keep = batch.labels < c
        if not bool(keep.any()):
            zero = out.logits.sum() * 0.0
            return zero, {"ce": 0.0}
        ce = F.cross_entropy(out.logits[keep], batch.labels[keep])
        return ce, {"ce": float(ce.detach())}

    def predict_scores(self, out: IntentOutput) -> torch.Tensor:
        """`(b, C)` class probabilities whose argmax is the prediction. Default: softmax of the logits."""
        return out.logits.float().softmax(-1)

    def param_groups(self, lr: float, weight_decay: float, encoder_lr: float | None = None) -> list[dict]:
        """AdamW groups: no decay on biases and norms; the encoder may use its own LR."""
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_enc = name.startswith("encoder.")
            no_decay = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
            groups.setdefault((is_enc, no_decay), []).append(p)
        out = []
        for (is_enc, no_decay), params in groups.items():
            out.append({
                "params": params,
                "lr": (encoder_lr or lr) if is_enc else lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
            })
        return out


METHODS: dict[str, type[IntentModel]] = {}


def register_method(name: str) -> Callable[[type[IntentModel]], type[IntentModel]]:
    def deco(cls: type[IntentModel]) -> type[IntentModel]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = cls
        return cls

    return deco
