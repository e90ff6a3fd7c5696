"""Feature sources: where a reader gets a sample's video or audio frames from.

Every source maps a sample id to a float `(T, d)` array, already truncated to the
max length. `InMemoryFeatures` holds a pickle's contents (compact: float16 by default,
unpadded); the memory-mapped store in `amess.data.store` serves datasets larger than
memory through the same interface.

Values are checked as they are loaded (`safe_pickle.to_numpy`): NaN / inf, complex values,
strings and values float16 cannot hold are refused with a `DataError` naming the file and
the sample. Float16 overflow is refused rather than silently kept at float32: features
that large (|v| >= 65520) are almost always broken, and the pickle path and the float16
store must give the same numbers. Features that really are that large can be trained on
from a float32 store (`amess data convert --dtype float32`, then `--feature-store`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from amess.data.errors import DataError
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
            raise DataError(f"{path}: expected a dict sample_id -> features, got {type(raw).__name__}")
        wanted = set(keep) if keep is not None else None
        self._data: dict[str, np.ndarray] = {}
        self._lengths: dict[str, int] = {}
        first: tuple[str, int] | None = None  # (sample, width) of the first sample with frames
        for key in list(raw.keys()):
            sid = str(key)
            if wanted is not None and sid not in wanted:
                del raw[key]
                continue
            if sid in self._lengths:
                raise DataError(f"{path}: sample id {sid!r} occurs twice (keys {key!r} and another one that "
                                "reads the same as text); expected one entry per sample")
            arr = to_numpy(raw.pop(key), path=path, sample_id=sid, store_dtype=dtype)
            self._lengths[sid] = arr.shape[0]
            if arr.shape[0] > 0:
                if first is None:
                    first = (sid, arr.shape[1])
                elif arr.shape[1] != first[1]:
                    raise DataError(f"{path}: sample {sid}: feature width {arr.shape[1]}, expected {first[1]} "
                                    f"(the width of sample {first[0]} and the samples before it)")
            if max_len is not None:
                arr = arr[:max_len]
            self._data[sid] = np.ascontiguousarray(arr, dtype=dtype)
        self.dim = first[1] if first else 0

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
