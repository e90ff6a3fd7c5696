"""Label descriptions for semantic synchronisation (SS), shipped as package data.

Each shipped set is a YAML file in this package::

    provenance:            # who wrote the descriptions, and how
      model: ...
      prompt: ...
      date: ...
      notes: ...
    descriptions:          # label -> 1 to 3 sentences, in the dataset's official order
      Complain: ...
      Praise: [..., ...]   # or several descriptions of one label (SS averages them)

Shipped sets: ``mintrec`` (20 intents), ``mintrec_binary`` (MIntRec's Emotion / Goal
coarse task) and ``mintrec2`` (the 30 in-scope intents of MIntRec2.0; the out-of-scope
label ``UNK`` has no description), plus ``mintrec_alt`` and ``mintrec2_alt``: two more,
text-oriented descriptions of each label, to join with ``+``. A user file may use the same
format, or be a plain mapping label -> description, in YAML or JSON. New sets can be written with
``amess labels generate`` (see :mod:`amess.labels.generate`).

Labels are matched exactly (case and spaces included); a file may describe more labels
than asked for, never fewer. Several sets joined by ``+`` (``mintrec+mintrec_alt``) give
each label the descriptions of every set, in that order: several descriptions per label.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

__all__ = ["load_descriptions", "load_provenance", "shipped_sets"]

_SUFFIX = ".yaml"


def shipped_sets() -> list[str]:
    """Names of the description sets shipped with the package, sorted."""
    root = resources.files(__name__)
    return sorted(
        entry.name[: -len(_SUFFIX)]
        for entry in root.iterdir()
        if entry.is_file() and entry.name.endswith(_SUFFIX)
    )


def _read_source(name_or_path: str | Path) -> tuple[str, str, str]:
    """Return (source description for messages, text, format) for a set name or a path."""
    key = str(name_or_path)
    if key in shipped_sets():
        res = resources.files(__name__).joinpath(key + _SUFFIX)
        return f"shipped set {key!r} ({res})", res.read_text(encoding="utf-8"), "yaml"
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"label descriptions {key!r}: neither a shipped set ({', '.join(shipped_sets())}) "
            "nor an existing file"
        )
    fmt = "json" if path.suffix.lower() == ".json" else "yaml"
    return str(path), path.read_text(encoding="utf-8"), fmt


def _load_document(name_or_path: str | Path) -> tuple[str, dict[str, Any], dict[str, str]]:
    """Parse a set: (source, provenance, descriptions in file order). Validates types."""
    source, text, fmt = _read_source(name_or_path)
    try:
        data: Any = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{source}: cannot parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(
            f"{source}: expected a mapping (descriptions: ... or label: description), "
            f"got {type(data).__name__}"
        )
    if isinstance(data.get("descriptions"), dict):
        provenance = data.get("provenance") or {}
        if not isinstance(provenance, dict):
            raise ValueError(f"{source}: provenance must be a mapping")
        descriptions = data["descriptions"]
    else:
        provenance = {}
        descriptions = data
    def text(desc: Any) -> bool:
        return isinstance(desc, str) and bool(desc.strip())

    bad = [
        str(label)
        for label, desc in descriptions.items()
        if not isinstance(label, str)
        or not (text(desc) or (isinstance(desc, list) and desc and all(map(text, desc))))
    ]
    if bad:
        raise ValueError(
            f"{source}: these entries are not a label name with a non-empty text description "
            f"(or a non-empty list of them): {bad}"
        )
    return source, dict(provenance), {
        label: desc.strip() if isinstance(desc, str) else [d.strip() for d in desc]
        for label, desc in descriptions.items()
    }


def load_descriptions(name_or_path: str, labels: list[str]) -> list[str | list[str]]:
    """Descriptions for ``labels``, in that order: a string per label, or a list of strings
    for a label with several descriptions.

    Args:
        name_or_path: a shipped set name (see :func:`shipped_sets`; a name wins over a file
            of the same name in the working directory) or a path to a YAML or JSON file, either
            ``{provenance: ..., descriptions: {label: text}}`` or a plain mapping
            ``{label: text}`` (a text may be a list of texts); or several of these joined by
            ``+``, whose descriptions are concatenated per label.
        labels: label names, matched exactly.

    Raises:
        FileNotFoundError: not a shipped set and no such file.
        ValueError: unparsable file, or labels without a description (all are named).
    """
    key = str(name_or_path)
    parts = key.split("+")
    if len(parts) > 1 and key not in shipped_sets() and not Path(key).expanduser().is_file():
        merged: list[list[str]] = [[] for _ in labels]
        for part in parts:
            for i, desc in enumerate(load_descriptions(part, labels)):
                merged[i] += [desc] if isinstance(desc, str) else desc
        return merged
    source, _, descriptions = _load_document(name_or_path)
    missing = [label for label in labels if label not in descriptions]
    if missing:
        lower = {k.casefold(): k for k in descriptions}
        hints = [f"{m!r} (file has {lower[m.casefold()]!r})" for m in missing if m.casefold() in lower]
        hint = f"; case differs for: {', '.join(hints)}" if hints else ""
        raise ValueError(
            f"{source}: no description for {len(missing)} label(s): {missing}{hint}"
        )
    extra = [k for k in descriptions if k not in set(labels)]
    if extra:
        logger.debug("%s: descriptions not used for labels %s", source, extra)
    return [descriptions[label] for label in labels]


def load_provenance(name_or_path: str) -> dict:
    """The ``provenance`` block of a set (empty for a plain label -> description mapping)."""
    _, provenance, _ = _load_document(name_or_path)
    return provenance
