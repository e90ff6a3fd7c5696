"""Methods: one file each, registered by name in `METHODS`.

Importing this package imports every method module, so that each registers itself.
"""

from __future__ import annotations

from amess.models import amess, text  # noqa: F401  (imported to register the methods)
from amess.models.base import METHODS, IntentModel, IntentOutput, register_method

__all__ = ["METHODS", "IntentModel", "IntentOutput", "register_method", "build_model", "method_class"]


def method_class(name: str) -> type[IntentModel]:
    """The registered class of method `name`; unknown names list the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]


def build_model(name: str, **kwargs) -> IntentModel:
    """Build the method registered as `name` with the loop's keyword arguments
    (`config, encoder, num_labels, video_dim, audio_dim, label_names, descriptions`)."""
    return method_class(name)(**kwargs)
