"""Methods: one file each in this folder, registered by name in `METHODS`.

Every module of this package is imported here (found by listing the folder), so that each
registers itself with `@register_method`: adding a method is adding its file, with no
import list to edit. A method defined elsewhere (a user's module, a test) registers the
same way when its module is imported.
"""

from __future__ import annotations

import importlib
import pkgutil

from amess.models.base import METHODS, IntentModel, IntentOutput, register_method

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name not in ("base", "encoders", "layers"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["METHODS", "IntentModel", "IntentOutput", "register_method", "build_model", "method_class"]


def method_class(name: str) -> type[IntentModel]:
    """The registered class of method `name`; unknown names list the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]


def build_model(name: str, **kwargs) -> IntentModel:
    """Build the method registered as `name` with the loop's keyword arguments
    (`config, settings, encoder, num_labels, video_dim, audio_dim, label_names, descriptions`);
    `settings` defaults to the config's section for the method."""
    cls = method_class(name)
    if "settings" not in kwargs:
        kwargs["settings"] = kwargs["config"].settings_for(name) if cls.Settings is not None else None
    return cls(**kwargs)
