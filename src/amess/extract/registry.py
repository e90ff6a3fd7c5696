"""The extractor registry: one class per extractor, registered per modality.

    @register_extractor("audio", "whisper")
    class WhisperEncoder(Extractor): ...

An extractor turns a decoded `Clip` into features (`audio`, `video`: a `(frames, dim)`
float32 array; `text`: a transcript) and `describe()`s itself for provenance: its name,
settings, package versions and the identity of its weights. `extraction.json` keeps these
records, `amess train` copies them into `model_spec.json`, and `amess predict --clip`
rebuilds the same extractors from them (`from_record`) and refuses to mix extractors
(`check_same_extractor`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from amess.data.base import DataError
from amess.extract.media import Clip

log = logging.getLogger(__name__)

MODALITIES = ("audio", "video", "text")
EXTRACTORS: dict[str, dict[str, type["Extractor"]]] = {m: {} for m in MODALITIES}


class ExtractorError(DataError):
    """An extractor that cannot be built or that differs from the one a run was trained on."""


def register_extractor(modality: str, name: str) -> Callable[[type["Extractor"]], type["Extractor"]]:
    def deco(cls: type[Extractor]) -> type[Extractor]:
        cls.modality, cls.name = modality, name
        EXTRACTORS[modality][name] = cls
        return cls

    return deco


class Extractor:
    """Base class. Subclasses set `Settings` (a dataclass: every field changes the output and
    is recorded), implement `extract`, `dim` and `weights`, and name their `packages`."""

    modality: ClassVar[str]
    name: ClassVar[str]
    Settings: ClassVar[type]
    packages: ClassVar[tuple[str, ...]] = ()
    frame_rate: ClassVar[float | None] = None
    """frames per second of media, where fixed by the model (None: set by the settings)."""
    main_setting: ClassVar[str | None] = None
    """the setting that `NAME:VALUE` on the command line sets (e.g. the model)."""

    def __init__(self, settings: Any = None, *, threads: int | None = None):
        self.settings = settings if settings is not None else self.Settings()
        self.threads = threads

    def extract(self, clip: Clip) -> np.ndarray | str:
        raise NotImplementedError

    @property
    def dim(self) -> int | None:
        return None

    def weights(self) -> dict[str, Any]:
        """What identifies the weights: a file's sha256, or a hub name and revision."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The provenance record written to extraction.json (and checked at predict)."""
        return {"modality": self.modality, "name": self.name, "settings": dataclasses.asdict(self.settings),
                "dim": self.dim, "frame_rate": self.frame_rate or getattr(self.settings, "fps", None),
                "weights": self.weights(), "versions": package_versions(self.packages)}

    @classmethod
    def from_record(cls, record: dict[str, Any], *, threads: int | None = None) -> "Extractor":
        known = {f.name for f in dataclasses.fields(cls.Settings)}
        given = dict(record.get("settings") or {})
        unknown = sorted(set(given) - known)
        if unknown:
            raise ExtractorError(f"{cls.modality} extractor {cls.name}: settings {unknown} unknown to this "
                                 f"version of amess (known: {sorted(known)})")
        return cls(cls.Settings(**given), threads=threads)


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def get_extractor(modality: str, spec: str, *, threads: int | None = None, **settings: Any) -> Extractor:
    """An extractor from a command-line spec: `NAME` or `NAME:VALUE` (the extractor's main
    setting, e.g. `hf:microsoft/wavlm-base-plus` or `whisper:/path/to/ct2-model`)."""
    _load_builtin()
    name, _, value = spec.partition(":")
    table = EXTRACTORS[modality]
    if name not in table:
        raise ExtractorError(f"unknown {modality} extractor {name!r}; known: {sorted(table)}")
    cls = table[name]
    if value:
        if cls.main_setting is None:
            raise ExtractorError(f"{modality} extractor {name} takes no value (got {spec!r})")
        settings[cls.main_setting] = value
    known = {f.name for f in dataclasses.fields(cls.Settings)}
    settings = {k: v for k, v in settings.items() if k in known and v is not None}
    return cls(cls.Settings(**settings), threads=threads)


def from_record(record: dict[str, Any], *, threads: int | None = None) -> Extractor:
    """Rebuild an extractor from its `describe()` record, checking that the weights found now
    are the ones recorded."""
    _load_builtin()
    modality, name = record.get("modality"), record.get("name")
    if modality not in EXTRACTORS or name not in EXTRACTORS[modality]:
        raise ExtractorError(f"extractor record {name!r} ({modality}) unknown to this version of amess; "
                             f"known: {({m: sorted(t) for m, t in EXTRACTORS.items()})}")
    ext = EXTRACTORS[modality][name].from_record(record, threads=threads)
    check_same_extractor(record, ext.describe(), what=f"the {modality} extractor available here")
    return ext


def identity(record: dict[str, Any]) -> dict[str, Any]:
    """The parts of a record that change the features (not package versions)."""
    return {k: record.get(k) for k in ("modality", "name", "settings", "dim", "weights")}


def summary(record: dict[str, Any] | None) -> str:
    """One line naming an extractor: `whisper (model=..., weights sha256 1a2b3c4d...)`."""
    if not record:
        return "an unknown extractor (no extraction.json beside the features)"
    s = ", ".join(f"{k}={v}" for k, v in (record.get("settings") or {}).items())
    w = record.get("weights") or {}
    wid = w.get("sha256", "")[:12] or w.get("revision") or w.get("name") or ""
    return f"{record.get('name')} ({s}{'; weights ' + wid if wid else ''})"


def check_same_extractor(expected: dict[str, Any] | None, got: dict[str, Any] | None, *,
                         what: str = "the given features") -> None:
    """Refuse features made by another extractor than the run's, naming both."""
    if identity(expected or {}) != identity(got or {}):
        modality = (expected or got or {}).get("modality", "")
        raise ExtractorError(f"this run's {modality} features were made by {summary(expected)}, but {what} "
                             f"come from {summary(got)}; extract with the run's extractor (amess predict --clip "
                             "does) or train a run on these features")
    if expected and got and expected.get("versions") != got.get("versions"):
        log.warning("%s extractor %s: package versions %s differ from training's %s", expected.get("modality"),
                    expected.get("name"), got.get("versions"), expected.get("versions"))


@lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime)


def folder_weights(folder: Path, patterns: tuple[str, ...]) -> dict[str, Any]:
    """sha256 of the weight files in a model folder (their names sorted, hashes combined)."""
    files = sorted({f for p in patterns for f in folder.glob(p) if f.is_file()})
    if not files:
        return {"path": str(folder)}
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return {"files": [f.name for f in files], "sha256": h.hexdigest()}


def _load_builtin() -> None:
    from amess.extract import faces, hf, whisper  # noqa: F401  (registration)
