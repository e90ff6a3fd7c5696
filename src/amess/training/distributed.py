"""Data-parallel helpers: one process, or several under `torchrun` / `accelerate launch`.

The model is not wrapped in DistributedDataParallel: A-MESS runs the shared encoder
several times per step (fused text, text view, descriptions) and leaves parameters idle in
some configurations, which DDP's reducer does not allow (and its static-graph mode was
seen to let ranks drift apart). Every rank starts from rank 0's weights and gradients are
averaged with one flat all-reduce (`sync_gradients`).
"""

from __future__ import annotations

import logging

import torch

from amess.config import Config

log = logging.getLogger(__name__)


def make_accelerator(cfg: Config, *, training: bool = True):
    """The accelerator for `cfg.train`: the GPU when there is one (else the CPU), mixed precision
    (`train.precision`), TF32 products on CUDA (`train.tf32`) and asynchronous host-to-GPU copies
    of the (pinned) batches. `train.precision=fp16` without a CUDA GPU is an error when
    `training` (accelerate would silently train in fp32); for evaluation it runs in fp32."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    precision = cfg.train.precision
    if precision == "fp16" and not cuda:
        if training:
            raise ValueError("train.precision=fp16 needs a CUDA GPU (fp16 autocast with a gradient scaler); on a "
                             "CPU use --precision bf16 (autocast works there) or fp32")
        log.warning("train.precision=fp16 needs a CUDA GPU: running in fp32 on the CPU")
        precision = "fp32"
    # one process may train several configurations (ablations, the demo, tests) whose
    # precision differs; the process group itself (PartialState) is kept
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision, cpu=not cuda,
                              dataloader_config=DataLoaderConfiguration(non_blocking=cuda))
    if accelerator.device.type == "cuda":
        set_tf32(cfg.train.tf32)
    return accelerator


def set_tf32(enabled: bool) -> None:
    """Let (or forbid) CUDA float32 matrix products and cuDNN convolutions use TensorFloat-32.

    The per-backend flags, not `torch.set_float32_matmul_precision`: that one also switches
    the CPU's oneDNN products, and torch >= 2.9 refuses to read the precision back once its
    legacy and new (`fp32_precision`) settings were mixed; these flags keep every reader working."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def prepare_model(model, accelerator, *, compile: bool = False):
    """Place the model on the process's device; with several processes, start every rank
    from rank 0's weights. `compile`: `torch.compile` its forward in place
    (`nn.Module.compile`), so that `accelerator.unwrap_model(model)` is still the method's
    `IntentModel` (`.loss`, `.predict_scores`) and its state_dict keys, hence the checkpoints,
    are the uncompiled ones (no `_orig_mod.` prefix)."""
    model = model.to(accelerator.device)
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    if compile:
        model.compile()
    return model


def sync_gradients(model, accelerator) -> None:
    """Average gradients over processes with one flat all-reduce (missing grads count as 0)."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        p.grad = g


def gather_ids(ids: list[str], accelerator) -> list[str]:
    """Sample ids of a batch from every process, in rank order."""
    if accelerator.num_processes == 1:
        return list(ids)
    from accelerate.utils import gather_object

    return gather_object(list(ids))


def broadcast_flag(flag: bool, accelerator) -> bool:
    """True on every rank when `flag` is True on any (e.g. a non-finite loss on one rank)."""
    if accelerator.num_processes == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)
