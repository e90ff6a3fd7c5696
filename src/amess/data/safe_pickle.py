"""A restricted unpickler for feature files, which are untrusted downloads.

Plain `pickle.load` runs whatever code a file names. This loader admits only what
feature files hold: numpy arrays and dtypes, torch tensors (and their storages), and
plain containers and scalars. Anything else is refused with an error naming the file
and the global that was asked for.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

_ALLOWED: set[tuple[str, str]] = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                              "str", "bytes", "bytearray", "bool", "slice", "range")
} | {("collections", "OrderedDict"), ("collections", "defaultdict"), ("_codecs", "encode")} | {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
} | {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"), ("torch.storage", "_load_from_bytes"),
    ("torch", "FloatStorage"), ("torch", "HalfStorage"), ("torch", "DoubleStorage"),
    ("torch", "BFloat16Storage"), ("torch", "LongStorage"), ("torch", "IntStorage"),
    ("torch", "Size"), ("torch", "float32"), ("torch", "float16"), ("torch", "float64"),
    ("torch", "bfloat16"),
}
# numpy scalar/dtype classes are named like numpy.dtypes.Float32DType or numpy.float32
_ALLOWED_NUMPY_PREFIXES = ("numpy.dtypes",)
_ALLOWED_NUMPY_NAMES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool_"}


class UnsafePickleError(pickle.UnpicklingError):
    pass


def _check_global(path: str, module: str, name: str) -> None:
    """Refuse every global a feature file has no business naming."""
    if (module, name) in _ALLOWED or module.startswith(_ALLOWED_NUMPY_PREFIXES) or (
        module == "numpy" and name in _ALLOWED_NUMPY_NAMES
    ):
        return
    raise UnsafePickleError(
        f"{path}: refused to load global {module}.{name}; feature files may only hold "
        "numpy arrays, torch tensors and plain containers (this file may be corrupt or malicious)"
    )


class _Checks:
    """The restrictions, mixed into both unpicklers (pickle's C one and its Python one)."""

    _path: str

    def find_class(self, module: str, name: str) -> Any:
        _check_global(self._path, module, name)
        if module == "torch.storage" and name == "_load_from_bytes":
            return _torch_storage_from_bytes
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:  # torch.save's zip format is not a plain pickle
        raise UnsafePickleError(f"{self._path}: persistent ids are not allowed in a feature pickle")


class _Restricted(_Checks, pickle.Unpickler):
    def __init__(self, f, path: str):
        super().__init__(f)
        self._path = path


class _RestrictedCompact(_Checks, pickle._Unpickler):
    """The same restrictions, in pickle's Python unpickler, which lets each float array be
    stored compactly the moment it is rebuilt: peak memory is then about the compact data
    plus one array, not the whole file at float32 (MIntRec audio is ~2 GB as stored)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, f, path: str, dtype: np.dtype):
        super().__init__(f)
        self._path = path
        self._dtype = np.dtype(dtype)
        self._memo_key: dict[int, int] = {}

    def _load_memoize(self) -> None:
        # remember where each array sits in the memo, so that the full-precision copy can be
        # replaced there too (else the memo would keep every one of them alive)
        self._memo_key[id(self.stack[-1])] = len(self.memo)
        pickle._Unpickler.dispatch[pickle.MEMOIZE[0]](self)

    def _load_build_compact(self) -> None:
        state = self.stack[-1]
        pickle._Unpickler.dispatch[pickle.BUILD[0]](self)
        top = self.stack[-1]
        if isinstance(top, np.ndarray) and isinstance(state, tuple):
            key = self._memo_key.pop(id(state), None)  # the state tuple holds the bytes too
            if key is not None and self.memo.get(key) is state:
                self.memo[key] = None
            # the array's raw bytes were memoized too; an array's bytes are never referenced
            # again, so release them (the memo keeps its length: MEMOIZE keys are its size)
            for part in state:
                if isinstance(part, (bytes, bytearray)):
                    key = self._memo_key.pop(id(part), None)
                    if key is not None and self.memo.get(key) is part:
                        self.memo[key] = None
        if isinstance(top, np.ndarray) and top.dtype.kind == "f" and top.dtype != self._dtype:
            small = top.astype(self._dtype)
            self.stack[-1] = small
            key = self._memo_key.pop(id(top), None)
            if key is not None and self.memo.get(key) is top:
                self.memo[key] = small

    dispatch[pickle.MEMOIZE[0]] = _load_memoize
    dispatch[pickle.BUILD[0]] = _load_build_compact


def _torch_storage_from_bytes(b: bytes) -> Any:
    """Tensors pickled with plain `pickle.dump` carry a nested `torch.save` payload; load
    it with torch's own weights-only loader, which refuses code as well."""
    import torch

    return torch.load(io.BytesIO(b), weights_only=True)


def safe_load(path: str | Path, *, compact_dtype: np.dtype | None = None) -> Any:
    """Load a pickle of arrays/tensors/containers. Errors name the file.

    With `compact_dtype` (e.g. float16), every float numpy array is converted to it as soon
    as it is read, so a large feature file never sits in memory at full precision.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if compact_dtype is not None:
                return _RestrictedCompact(f, str(path), compact_dtype).load()
            return _Restricted(f, str(path)).load()
    except UnsafePickleError:
        raise
    except FileNotFoundError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            struct.error) as e:  # the Python unpickler meets garbage with KeyError (unknown opcode)
        raise UnsafePickleError(f"{path}: not a readable feature pickle ({type(e).__name__}: {e}); "
                                "the file may be empty or truncated") from e


def load_compact(path: str | Path, dtype: np.dtype) -> Any:
    """`safe_load` with float arrays cast to `dtype` as they are read; a file whose layout
    the compact reader cannot follow (but that is not refused) is loaded at full precision."""
    try:
        return safe_load(path, compact_dtype=dtype)
    except UnsafePickleError as e:
        if "refused" in str(e):
            raise
        return safe_load(path)


def to_numpy(value: Any, *, path: str | Path, sample_id: str) -> np.ndarray:
    """Normalise one stored feature to a float32 `(T, d)` array.

    Accepted: an array or tensor of shape `(T, d)`, `(T, 1, d)` or `(1, T, d)`, or a list of
    `(1, d)` / `(d,)` arrays (MIntRec's video release: one entry per keyframe).
    """
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        value = np.concatenate([np.asarray(_tensor_to_np(v), dtype=np.float32).reshape(1, -1) for v in value], 0)
    arr = np.asarray(_tensor_to_np(value), dtype=np.float32)
    if arr.ndim == 3 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: sample {sample_id}: expected a (frames, dim) feature, got shape {arr.shape}")
    return arr


def _tensor_to_np(v: Any) -> Any:
    if hasattr(v, "detach") and hasattr(v, "numpy"):
        return v.detach().cpu().float().numpy()
    return v
