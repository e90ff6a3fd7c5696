"""Methods: one file per method, registered by name in `METHODS`."""

from amess.models import text  # noqa: F401  (registers `text`)
from amess.models.base import METHODS, IntentModel, IntentOutput, register_method


def build_model(name: str, **kwargs) -> IntentModel:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name](**kwargs)


__all__ = ["METHODS", "IntentModel", "IntentOutput", "build_model", "register_method"]
