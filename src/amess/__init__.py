"""amess: multimodal intent recognition, with A-MESS as its reference method."""

__version__ = "0.1.0"


def load_run(run_dir, *, seed=None):
    """A `Predictor` for a trained run folder (see `amess.predictor`)."""
    from amess.predictor import load_run as _load_run

    return _load_run(run_dir, seed=seed)


__all__ = ["__version__", "load_run"]
