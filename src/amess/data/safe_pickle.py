"""A restricted unpickler for feature files, which are untrusted downloads.

Plain `pickle.load` runs whatever code a file names. This loader admits only what
feature files hold: numpy arrays and dtypes, torch tensors (and their storages), and
plain containers and scalars. Anything else is refused with an error naming the file
and the global that was asked for. Every failure to read a file is an `UnsafePickleError`
(a `pickle.UnpicklingError`) naming the file; a file that is not a pickle at all (gzip,
zip / `torch.save`, `.npy`, HDF5) is named for what it looks like.

`to_numpy` turns one stored feature into a float32 `(T, d)` array and refuses, with a
`DataError` naming the file and the sample, what would silently become wrong numbers:
NaN or inf, complex values (the imaginary part would be dropped), strings or other
non-numbers, values beyond float32's range, and (for float16 storage) values beyond
float16's range, which the cast would turn into inf.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from amess.data.errors import DataError

_ALLOWED: set[tuple[str, str]] = {
    # no `range` or `slice`: feature files never need them, and `list(range(10**15))` would hang
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                              "str", "bytes", "bytearray", "bool")
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


F16_MAX = float(np.finfo(np.float16).max)  # 65504, float16's largest finite value
_F16_INF_AT = 65520.0  # round-to-nearest casts |v| >= 65520 to inf (smaller values round to +-65504)
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first object of a pre-1.6 (non-zip) torch.save file

# what a file that is not a pickle looks like: (magic bytes, what it is, what to do)
_NOT_PICKLES = (
    (b"\x1f\x8b", "a gzip-compressed file", "decompress it first (gunzip)"),
    (b"PK\x03\x04", "a zip archive (the format torch.save writes)",
     "load it with torch.load(path, weights_only=True) and save the dict with pickle.dump"),
    (b"\x93NUMPY", "a numpy .npy file", "save the dict sample id -> array with pickle.dump"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file", "save the dict sample id -> array with pickle.dump"),
    (b"BZh", "a bzip2-compressed file", "decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file", "decompress it first (unxz)"),
)
_EXPECTED = "expected a feature pickle (a dict sample id -> (frames, dim) array, written with pickle.dump)"


class UnsafePickleError(pickle.UnpicklingError):
    """A feature file that was refused or could not be read; the message names the file."""


class _UnreadablePickle(UnsafePickleError):
    """The unpickler failed part-way (not a refusal, not another file format)."""


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
        # protocol 0-2 pickles name Python 2 modules (`__builtin__.bytes` for an empty array's
        # data): check the names pickle itself maps them to (a Python 3 pickle never uses these)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
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
            # again, so release them (the memo keeps its length: MEMOIZE keys are its size).
            # Not short ones: CPython shares b"" and 1-byte objects, so several empty arrays
            # reference one memoized b"" (and releasing short bytes saves nothing)
            for part in state:
                if isinstance(part, (bytes, bytearray)) and len(part) >= 64:
                    key = self._memo_key.pop(id(part), None)
                    if key is not None and self.memo.get(key) is part:
                        self.memo[key] = None
        if isinstance(top, np.ndarray) and top.dtype.kind == "f" and top.dtype != self._dtype:
            with np.errstate(over="ignore", invalid="ignore"):
                small = top.astype(self._dtype)
            if not np.isfinite(small).all() and np.isfinite(top[~np.isfinite(small)]).any():
                return  # finite values beyond the compact dtype's range: kept as they are, for
                # `to_numpy` to refuse with the sample's id (a cast would make them inf silently)
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
    as it is read, so a large feature file never sits in memory at full precision (an array
    with finite values beyond that dtype's range is kept as it is, for `to_numpy` to refuse).

    Raises `FileNotFoundError` for a missing file and `UnsafePickleError` for everything else
    that goes wrong: a refused global, a file that is not a pickle (named for what it looks
    like), or any failure while reading untrusted bytes.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        for magic, what, todo in _NOT_PICKLES:
            if head.startswith(magic):
                raise UnsafePickleError(f"{path}: looks like {what}, not a pickle; {_EXPECTED}: {todo}")
        f.seek(0)
        try:
            if compact_dtype is not None:
                obj = _RestrictedCompact(f, str(path), compact_dtype).load()
            else:
                obj = _Restricted(f, str(path)).load()
        except UnsafePickleError:
            raise
        except (Exception, MemoryError) as e:  # untrusted bytes can fail in any way: all of it is "unreadable"
            empty = " (the file is empty)" if not head else ""
            raise _UnreadablePickle(f"{path}: not a readable feature pickle{empty} ({type(e).__name__}: {e}); "
                                    f"the file may be truncated or corrupt; {_EXPECTED}") from e
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
        raise UnsafePickleError(f"{path}: looks like a file written by an old torch.save (legacy format), not a "
                                f"plain pickle; {_EXPECTED}: load it with torch.load(path, weights_only=True) "
                                "and save the dict with pickle.dump")
    return obj


def load_compact(path: str | Path, dtype: np.dtype) -> Any:
    """`safe_load` with float arrays cast to `dtype` as they are read; a file whose layout
    the compact reader cannot follow (but that is not refused) is loaded at full precision."""
    try:
        return safe_load(path, compact_dtype=dtype)
    except _UnreadablePickle:
        return safe_load(path)  # garbage fails here again, with the same message


def to_numpy(value: Any, *, path: str | Path, sample_id: str, check_values: bool = True,
             store_dtype: np.dtype | None = None) -> np.ndarray:
    """Normalise one stored feature to a float32 `(T, d)` array.

    Accepted: a real-valued (float, int or bool) array or tensor of shape `(T, d)`,
    `(T, 1, d)` or `(1, T, d)`, or a list of `(1, d)` / `(d,)` arrays (MIntRec's video
    release: one entry per keyframe). Refused with a `DataError` naming `path` and
    `sample_id`: complex values, strings or other non-numbers, ragged frames, other shapes,
    and values beyond float32's range. With `check_values` (default) also NaN / inf and,
    when `store_dtype` is float16, values float16 would turn into inf (`value_problem`).
    """
    where = f"{path}: sample {sample_id}"
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        frames = [_real_float32(v, f"{where} (frame {t})").reshape(1, -1) for t, v in enumerate(value)]
        widths = sorted({f.shape[1] for f in frames})
        if len(widths) > 1:
            raise DataError(f"{where}: its frames have different widths {widths}; expected one (1, dim) "
                            "array of the same dim per frame")
        arr = np.concatenate(frames, 0)
    else:
        arr = _real_float32(value, where)
    if arr.ndim == 3 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise DataError(f"{where}: expected a (frames, dim) feature, got shape {arr.shape}")
    if check_values:
        problem = value_problem(arr, path=path, sample_id=sample_id, store_dtype=store_dtype)
        if problem:
            raise DataError(problem)
    return arr


def value_problem(arr: np.ndarray, *, path: str | Path, sample_id: str,
                  store_dtype: np.dtype | None = None) -> str | None:
    """What is wrong with the values of a float32 `(T, d)` feature, or None: NaN / inf, or
    (with `store_dtype` float16) a magnitude float16 turns into inf (|v| >= 65520; its
    largest value is 65504)."""
    if arr.size == 0:
        return None
    finite = np.isfinite(arr)
    if not finite.all():
        t, j = (int(k) for k in np.argwhere(~finite)[0])
        return (f"{path}: sample {sample_id}: {int((~finite).sum())} NaN or inf value(s), the first at frame {t}, "
                f"column {j}; expected finite features")
    if store_dtype is not None and np.dtype(store_dtype) == np.float16:
        m = max(float(arr.max()), -float(arr.min()))
        if m >= _F16_INF_AT:
            return (f"{path}: sample {sample_id}: max |value| {m:.6g} exceeds float16's limit {F16_MAX:.0f} "
                    "(float16 storage would turn it into inf); expected features within +-65504, or use a "
                    "float32 store (`amess data convert --dtype float32`, then --feature-store)")
    return None


def _real_float32(v: Any, where: str) -> np.ndarray:
    """One array or tensor as float32, refusing what a cast would silently get wrong."""
    if hasattr(v, "detach") and hasattr(v, "numpy"):  # a torch tensor
        if v.is_complex():
            raise DataError(f"{where}: complex-valued tensor ({v.dtype}); expected real features (a cast "
                            "would drop the imaginary part)")
        v = v.detach().cpu()
        v = (v.float() if not v.dtype.is_floating_point or v.itemsize < 4 else v).numpy()
    try:
        a = np.asarray(v)
    except (ValueError, TypeError) as e:  # ragged nested lists and the like
        raise DataError(f"{where}: not a rectangular numeric array ({e}); expected a (frames, dim) array") from None
    kind = a.dtype.kind
    if kind == "c":
        raise DataError(f"{where}: complex-valued array ({a.dtype}); expected real features (a cast would "
                        "drop the imaginary part)")
    if kind in "USa":
        raise DataError(f"{where}: the array holds strings ({a.dtype}); expected numbers")
    if kind == "O":
        bad = [x for x in a.flat if isinstance(x, (complex, np.complexfloating))
               or not isinstance(x, (int, float, np.integer, np.floating))][:1]
        if bad:
            bad = bad[0]
            raise DataError(f"{where}: the array holds a {type(bad).__name__} ({str(bad)[:40]!r}); "
                            "expected numbers")
        a = a.astype(np.float64)
        kind = "f"
    elif kind not in "fiub":
        raise DataError(f"{where}: array of dtype {a.dtype} is not numeric; expected float features")
    with np.errstate(over="ignore", invalid="ignore"):
        out = a.astype(np.float32)
    if kind == "f" and a.dtype.itemsize > 4:
        inf = ~np.isfinite(out)
        if inf.any() and np.isfinite(a[inf]).any():
            m = float(np.abs(a[inf & np.isfinite(a)]).max())
            raise DataError(f"{where}: |value| {m:.6g} is beyond float32's range; expected features a float32 "
                            "can hold")
    return out
