"""What every method shares: its output type, its base class and the method registry.

Adding a method is one file in `amess/models/` with one `@register_method("name")` line.
The method declares everything the rest of the toolkit needs to know about it on its
class: its settings dataclass (`Settings`, a `--set <name>.<key>=value` section), the
modalities it reads (`reads`), the parts of the text encoder it needs (`encoder_parts`),
and, only if it needs them, a collator hook (`collate_hook`: extra batch inputs such as
prompt or template tokens) and a diagnostics hook (`diagnostics`: method plots). The one
training loop (`amess.training.loop`) only ever calls `model(batch)`,
`model.loss(output, batch)`, `model.param_groups(...)`, `model.predict_scores(output)`
and `model.decision_logits(output)`: it has no method-specific branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from amess.data.batch import Batch, Sample

if TYPE_CHECKING:
    from amess.training.artifacts import Diagnostics

ENCODER_PARTS = ("pooler", "mlm_head")
"""Optional parts of the text encoder a method can ask for (`IntentModel.encoder_parts`)."""


def autocast_off(device: torch.device):
    """A context in which autocast (`train.precision=bf16/fp16`) is off: for ops that have no
    low-precision kernel on every device, run in float32 on float32 inputs. Recurrent layers
    are such ops: oneDNN has no bf16 LSTM on CPUs without native bf16 ("could not create a
    primitive descriptor for the LSTM forward propagation primitive")."""
    return torch.autocast(device_type=device.type, enabled=False)


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
    `cls(*, config, settings, encoder, num_labels, video_dim, audio_dim, label_names, descriptions)`
    where `config` is the run's `amess.config.Config`, `settings` the method's own
    `Settings` instance (None for a method without settings), `encoder` a `TextEncoder`,
    the dims are None for modalities that are not used, and `descriptions` is None or one
    description string per label, in the order of `label_names` (SS, docs/amess-method.md).
    A method takes the arguments it needs and ignores the rest (`**_`).

    Class attributes a method may set:
    - `Settings`: a dataclass of its settings, one docstring per field, validated in
      `__post_init__`; listed by `amess methods show NAME`.
    - `reads`: the modalities its forward uses. Training loads feature files only for
      modalities that are both configured and read (a text model never pays the memory
      of video and audio features); `requires` those it cannot run without, and
      `needs_nonverbal` (True) asks for at least one of the non-verbal ones it reads.
    - `encoder_parts`: optional parts of the text encoder to load (`ENCODER_PARTS`).
    - `uses_descriptions`: whether it reads the label descriptions.
    - `inference_settings`: the names of its settings that only change how a trained model
      scores (never its parameters); `amess evaluate --set` may switch them on a finished run.
    """

    Settings: type | None = None
    reads: tuple[str, ...] = ("text", "video", "audio")
    requires: tuple[str, ...] = ("text",)
    needs_nonverbal: bool = False
    encoder_parts: tuple[str, ...] = ()
    uses_descriptions: bool = False
    inference_settings: tuple[str, ...] = ()
    name: str = ""

    @classmethod
    def modality_problem(cls, modalities: Sequence[str]) -> str | None:
        """Why the method cannot run on these modalities (one line), or None when it can."""
        missing = [m for m in cls.requires if m not in modalities]
        if missing:
            return f"needs {', '.join(missing)}"
        nonverbal = [m for m in cls.reads if m != "text"]
        if cls.needs_nonverbal and not any(m in modalities for m in nonverbal):
            return f"needs text and at least one of {', '.join(nonverbal)}"
        return None

    @classmethod
    def collate_hook(cls, settings: Any, tokenizer, text_max_len: int
                     ) -> Callable[[Sequence[Sample], Batch], None] | None:
        """Extra batch inputs: a function `(samples, batch) -> None` that adds tensors to
        `batch.extras` (first dim b), or None (default). Runs in the loader's workers."""
        return None

    def diagnostics(self, d: "Diagnostics") -> None:
        """Method-specific plots of one split's outputs, written with `d.save(fig, name)`.
        Default: none."""

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
        """`(b, C)` class probabilities whose argmax is the prediction: the softmax of
        `decision_logits` (by default the head's logits), so the two never disagree."""
        return self.decision_logits(out).float().softmax(-1)

    def decision_logits(self, out: IntentOutput) -> torch.Tensor:
        """`(b, C)` logits whose softmax is `predict_scores`: what out-of-scope detectors
        and C+1 predictions read (default: the head's logits)."""
        return out.logits

    def token_highlights(self, out: IntentOutput) -> torch.Tensor | None:
        """`(b, k)` positions in the batch's `input_ids` a method singles out (A-MESS: its
        anchor words), -1 for none; shown by `amess predict`. Default: None."""
        return None

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
    """Class decorator: register an `IntentModel` subclass as method `name`."""
    import dataclasses

    def deco(cls: type[IntentModel]) -> type[IntentModel]:
        if name in METHODS and METHODS[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"method {name!r} registered twice ({METHODS[name].__qualname__}, {cls.__qualname__})")
        if cls.Settings is not None and not dataclasses.is_dataclass(cls.Settings):
            raise TypeError(f"method {name!r}: Settings must be a dataclass")
        unknown = [p for p in cls.encoder_parts if p not in ENCODER_PARTS]
        if unknown:
            raise ValueError(f"method {name!r}: unknown encoder parts {unknown}; known: {list(ENCODER_PARTS)}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco
