"""Feature sources: where a reader gets a sample's video or audio frames from.

Every source maps a sample id to a float `(T, d)` array, already truncated to the
max length. `InMemoryFeatures` holds a pickle's contents (compact: float16 by default,
unpadded); the memory-mapped store in `amess.data.store` serves datasets larger than
memory through the same interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from amess.data.safe_pickle import load_compact, to_numpy


class FeatureSource(Protocol):
    """Read access to one modality's features."""

    dim: int
    path: str

    def __contains__(self, sample_id: str) -> bool: ...

    def get(self, sample_id: str) -> np.ndarray:
        """`(T, dim)` float32 frames of one sample (T may be 0)."""
        ...

    def length(self, sample_id: str) -> int:
        """True number of frames stored for the sample (before truncation)."""
        ...


class InMemoryFeatures:
    """A feature pickle loaded once through the restricted unpickler.

    Only the ids in `keep` are kept (a split reads only its own samples), each truncated
    to `max_len` and stored as `dtype` (float16 halves memory; batches are float32).
    """

    def __init__(self, path: str | Path, *, keep: Iterable[str] | None = None, max_len: int | None = None,
                 dtype: np.dtype = np.float16):
        self.path = str(path)
        raw = load_compact(path, dtype)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a dict sample_id -> features, got {type(raw).__name__}")
        wanted = set(keep) if keep is not None else None
        self._data: dict[str, np.ndarray] = {}
        self._lengths: dict[str, int] = {}
        dims: set[int] = set()
        for key in list(raw.keys()):
            sid = str(key)
            if wanted is not None and sid not in wanted:
                del raw[key]
                continue
            arr = to_numpy(raw.pop(key), path=path, sample_id=sid)
            self._lengths[sid] = arr.shape[0]
            if arr.shape[0] > 0:
                dims.add(arr.shape[1])
            if max_len is not None:
                arr = arr[:max_len]
            self._data[sid] = np.ascontiguousarray(arr, dtype=dtype)
        if len(dims) > 1:
            raise ValueError(f"{path}: feature widths differ between samples: {sorted(dims)}")
        self.dim = dims.pop() if dims else 0

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._data

    def __len__(self) -> int:
        return len(self._data)

    def ids(self) -> list[str]:
        return list(self._data)

    def get(self, sample_id: str) -> np.ndarray:
        a = self._data[sample_id]
        return a.astype(np.float32) if a.shape[0] else np.zeros((0, self.dim), np.float32)

    def length(self, sample_id: str) -> int:
        return self._lengths[sample_id]
