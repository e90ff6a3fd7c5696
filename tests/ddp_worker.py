"""Run under `torchrun --nproc_per_node=2`: train with the one loop on CPU (gloo), then
compare every rank's final weights. Rank 0 writes a JSON report to argv[3]."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from amess.config import Config
from amess.training.distributed import make_accelerator
from amess.training.loop import fit
from amess.training.runner import setup_seed

data_dir, enc, report, method = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
cfg = Config().override({"data.data_dir": data_dir, "model.text_encoder": enc, "model.method": method,
                         "train.epochs": 1, "train.max_steps": 3, "train.batch_size": 4, "train.progress": False})
acc = make_accelerator(cfg)
data, model, collator, _ = setup_seed(cfg, 0)
init = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
seed_dir = report.parent / f"seed_rank{acc.process_index}"
seed_dir.mkdir(exist_ok=True)
model, fr = fit(cfg, 0, model, data, collator, acc, seed_dir)
final = torch.cat([p.detach().flatten() for p in acc.unwrap_model(model).parameters()])
gathered = [torch.zeros_like(final) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, final)
if acc.is_main_process:
    report.write_text(json.dumps({
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "max_rank_diff": max(float((g - gathered[0]).abs().max()) for g in gathered),
        "moved": float((final - init).abs().max()),
        "steps": fr.steps,
    }))
dist.barrier()
dist.destroy_process_group()  # an orderly gloo shutdown (else a rank can abort at exit)
