"""Training, laid out by job:

    data.py         data assembly: splits, descriptions, loaders, the collator
    loop.py         the one training loop (fit, train_step, optimiser, resume state)
    evaluation.py   outputs over a split, metrics, out-of-scope detectors
    artifacts.py    files (atomic), figures, tables, summaries
    spec.py         model_spec.json: a run that reloads without its dataset
    distributed.py  data-parallel helpers (torchrun / accelerate)
    memory.py       the allocator setting
    runner.py       a run: seeds into one folder, resumable
"""

from amess.training.artifacts import format_ood_table, format_table, summarise
from amess.training.loop import TrainingError
from amess.training.runner import RunFolderError, run, train_seed

__all__ = ["run", "train_seed", "format_table", "format_ood_table", "summarise", "TrainingError", "RunFolderError"]
