"""Data-parallel helpers: one process, or several under `torchrun` / `accelerate launch`.

The model is not wrapped in DistributedDataParallel: A-MESS runs the shared encoder
several times per step (fused text, text view, descriptions) and leaves parameters idle in
some configurations, which DDP's reducer does not allow (and its static-graph mode was
seen to let ranks drift apart). Every rank starts from rank 0's weights and gradients are
averaged with one flat all-reduce (`sync_gradients`).
"""

from __future__ import annotations

import torch

from amess.config import Config


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # one process may train several configurations (ablations, the demo, tests) whose
    # precision differs; the process group itself (PartialState) is kept
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision="no" if cfg.train.precision == "fp32" else cfg.train.precision,
                       cpu=not torch.cuda.is_available())


def prepare_model(model, accelerator):
    """Place the model on the process's device; with several processes, start every rank
    from rank 0's weights."""
    model = model.to(accelerator.device)
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
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
