"""Compatibility shim: lets the official MIntRec (thuiar/MIntRec@8d30e9b, written for transformers
4.17) and TCL-MAP (thuiar/TCL-MAP@37095a5, transformers 4.30) code run on the transformers 5.x
that amess uses. It only re-adds or adapts what 5.x removed or renamed; nothing in the official
files is edited beyond the two small patches next to this file.

Honest notes:
  * AdamW below was re-typed from memory of transformers 4.30.2 `transformers.optimization.AdamW`
    (not copied from its source file); it follows that code's logic (per-parameter Python loop,
    optional bias correction, decoupled weight decay), which is what the official managers use.
  * get_extended_attention_mask / get_head_mask follow transformers 4.30 ModuleUtilsMixin for the
    only cases the official code uses (encoder, head_mask=None).
  * The BertEncoder / BertEmbeddings wrappers only drop or rename keyword arguments.
Checked only on the transformers 5.x of the amess environment it was written against; another 5.x
release may need more.

Import this BEFORE importing any official module."""
import math
import torch
from torch.optim import Optimizer
import transformers
from transformers import PreTrainedModel
from transformers.models.bert import modeling_bert as mb


class AdamW(Optimizer):
    """`transformers.optimization.AdamW` of transformers 4.30.2 (removed in 5.x), re-typed from
    memory, not copied: per-parameter Python loop, optional bias correction, decoupled weight
    decay. The official managers build it with correct_bias=False (MIntRec
    methods/MAG_BERT/manager.py _set_optimizer; TCL-MAP methods/TCL_MAP/manager.py _set_optimizer)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 correct_bias=True, no_deprecation_warning=False):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=(1.0 - beta1))
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    bias_correction1 = 1.0 - beta1 ** state["step"]
                    bias_correction2 = 1.0 - beta2 ** state["step"]
                    step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=(-group["lr"] * group["weight_decay"]))
        return loss


# NB: importing transformers.models.bert replaces sys.modules['transformers'] by a new lazy module
# object, so attach to the current one (and to transformers.optimization).
import sys  # noqa: E402
sys.modules["transformers"].AdamW = AdamW
import transformers.optimization  # noqa: E402
sys.modules["transformers.optimization"].AdamW = AdamW
sys.modules["transformers"].AdamW = AdamW


def get_extended_attention_mask(self, attention_mask, input_shape, device=None, dtype=None):
    """transformers 4.30 ModuleUtilsMixin.get_extended_attention_mask (encoder case):
    [B, L] 0/1 mask -> additive [B, 1, 1, L] mask (0 keep, dtype-min masked)."""
    if dtype is None:
        dtype = self.dtype
    if attention_mask.dim() == 3:
        ext = attention_mask[:, None, :, :]
    elif attention_mask.dim() == 2:
        ext = attention_mask[:, None, None, :]
    else:
        raise ValueError(f"Wrong shape for attention_mask (shape {attention_mask.shape})")
    ext = ext.to(dtype=dtype)
    return (1.0 - ext) * torch.finfo(dtype).min


def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    """transformers 4.30 get_head_mask for head_mask=None (the only case the official code uses)."""
    if head_mask is not None:
        raise NotImplementedError("head_mask is not supported by transformers 5.x BertEncoder")
    return [None] * num_hidden_layers


PreTrainedModel.get_extended_attention_mask = get_extended_attention_mask
PreTrainedModel.get_head_mask = get_head_mask

# 5.x BertEncoder.forward(hidden_states, attention_mask, encoder_hidden_states,
# encoder_attention_mask, cache, use_cache, **kwargs) forwards **kwargs down to the attention
# kernel; the 4.x-only arguments the official code passes (all None/False/[None]*L here) are dropped.
_enc_forward = mb.BertEncoder.forward
_DROP = ("head_mask", "output_attentions", "output_hidden_states", "return_dict", "past_key_values")


def _encoder_forward(self, hidden_states, attention_mask=None, **kw):
    for k in _DROP:
        kw.pop(k, None)
    return _enc_forward(self, hidden_states, attention_mask, **kw)


mb.BertEncoder.forward = _encoder_forward

# 5.x BertEmbeddings.forward renamed past_key_values_length -> cache_length.
_emb_forward = mb.BertEmbeddings.forward


def _embeddings_forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                        past_key_values_length=0, cache_length=0):
    return _emb_forward(self, input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                        inputs_embeds=inputs_embeds, cache_length=cache_length or past_key_values_length)


mb.BertEmbeddings.forward = _embeddings_forward

# transformers 4.x: post_init() == init_weights() (+ legacy checkpointing hook); the official models call
# self.init_weights() in __init__. In 5.x post_init() additionally registers properties that
# from_pretrained needs (all_tied_weights_keys, ...), so a first call of init_weights() on a model goes
# through post_init() (which itself calls the original init_weights()).
_orig_init_weights = PreTrainedModel.init_weights


def _init_weights_4x(self):
    if "all_tied_weights_keys" not in self.__dict__:
        return self.post_init()
    return _orig_init_weights(self)


PreTrainedModel.init_weights = _init_weights_4x
