"""A memory-mapped feature store: datasets larger than memory, read one sample at a time.

MIntRec2.0's features are about 8 GB as float32 pickles (15,040 utterances); the official
loaders hold all of it in memory. This module converts each feature pickle once into a
flat binary file that training reads through `np.memmap`, so a run touches only the
samples of the current batch.

Layout of a store (one folder, one or more modalities, e.g. ``video`` and ``audio``)::

    <store>/manifest.json        {"format", "version", "modalities": {name: entry}}
    <store>/<name>.bin           all samples' kept frames, concatenated, row-major,
                                 shape (total_rows, dim), float16 (default) or float32
    <store>/<name>.index.json    {"ids": [...], "offset": [...], "length": [...],
                                  "orig_length": [...], "crc32": [...]}
                                 (offsets and lengths in rows; crc32 of each sample's bytes)

A manifest entry records: ``version``, ``dtype``, ``dim``, ``num_samples``, ``num_rows``,
``max_len`` (truncation applied at conversion, or null), ``source`` (path, size,
mtime_ns, sha256 of the source pickle; null for a generator without one), ``bin_sha256``
(of the written .bin), ``index_sha256`` (of the index file), ``ids_sha256`` (of the id
filter, or null) and ``complete``. ``complete`` is true only once the .bin and index are
in place; a store whose entry is missing or incomplete is refused by `open_store`.

What is written is checked: every sample goes through `safe_pickle.to_numpy`, so NaN / inf,
complex values, strings and (for float16 stores) values float16 would turn into inf stop
the conversion with a `DataError` naming the source and the sample.

Integrity
---------
Opening a store (`open_store`) checks, cheaply: the manifest entry's fields, the .bin's
size, the index file's sha256 against the manifest (an edited index, e.g. swapped ids, is
refused), the index's consistency (contiguous offsets covering the .bin, lengths within
the original lengths and max_len, unique ids), and that the source pickle, where it still
exists at its recorded path, has the recorded size and mtime (else the store is stale and
refused). Each sample's bytes are checked against their crc32 the first time it is read,
so a changed byte in the .bin is refused naming the sample. `verify_store` re-hashes
everything. Every such refusal is a `StoreError` (a `DataError`) that says to run
`amess data convert`, which repairs: a store whose index or data no longer match their
recorded hashes, or whose source's content changed, is converted again instead of being
skipped. A source that was only touched (same size and sha256, new mtime) is not
reconverted; its new mtime is recorded.

Conversion and memory
---------------------
A pickle cannot be read partially: `convert_pickle` loads one source file whole through
the restricted unpickler (`amess.data.safe_pickle.load_compact`), which casts every float
array to the store's dtype as it is read, so its peak memory is about that one pickle's
contents at the store's precision (float16: half the float32 file, roughly 0.5 GB for
MIntRec2.0's video and 3.5 GB for its audio, never both at once). It then pops the samples
from the loaded dict one by one, writing each to the .bin through a buffered file and
dropping it, so memory falls during the pass. Nothing ever builds one big array. Training afterwards needs only
the index and the pages of the current batch.

Interruptions and resuming
--------------------------
Data is written to ``<name>.bin.partial`` with a progress journal
``<name>.journal.jsonl`` (a header with the conversion parameters, then one line per
written sample: id, rows kept, original rows, dim, end byte offset). The journal is
brought up to date after the .bin buffer is flushed, every `checkpoint_every` samples
and when the conversion is interrupted by an exception. What resumes:

* a rerun with the same parameters (dtype, max_len, id filter, source fingerprint)
  truncates ``.partial`` to the last journaled byte offset (bytes written after the last
  checkpoint, e.g. after a hard kill, are discarded), re-hashes that prefix, and skips
  every id already journaled; the iterator is still consumed from its start (a pickle
  must be loaded whole anyway), but those samples are not converted or written again.
  If the iterator yields the same samples in the same order, the finished store is
  byte-identical to one written without interruption. Generators that are expensive
  can call `partial_ids` and skip the journaled ids themselves.
* different parameters, or `resume=False`, discard the partial files and start afresh.
* a complete, intact store whose source (size, sha256) and parameters match is not
  rewritten at all (`convert_pickle` returns ``skipped=True`` without loading the pickle).

Only at the end are the files moved into place with `os.replace` (index and .bin first,
then the manifest entry is marked complete), so an interrupted run never leaves a store
that claims to be complete; a reconversion marks the entry incomplete before it starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import re
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from amess.data.errors import DataError
from amess.fileio import write_text
from amess.data.safe_pickle import load_compact, to_numpy

logger = logging.getLogger(__name__)

STORE_VERSION = 2  # 2: per-sample crc32 in the index, index_sha256 in the manifest
STORE_FORMAT = "amess-feature-store"
MANIFEST = "manifest.json"
_DTYPES = {"float16": np.float16, "float32": np.float32}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CHUNK = 1 << 22  # 4 MiB for hashing
_WRITE_BUFFER = 1 << 22
_RELEASE_EVERY = (32 << 20, 16)  # release the mapping's pages after this many bytes or reads



__all__ = [
    "StoreError", "IncompleteStoreError", "MemmapFeatures", "convert_pickle", "convert_arrays",
    "open_store", "verify_store", "read_manifest", "partial_ids", "store_fingerprint", "sha256_file",
    "STORE_VERSION",
]


class StoreError(DataError, RuntimeError):
    """A feature store is missing, malformed, inconsistent or stale (bad input data: the CLI
    reports it in one line; `amess data convert` repairs it)."""


class IncompleteStoreError(StoreError):
    """The store (or the requested modality in it) was never finished."""


# --------------------------------------------------------------------------- helpers

def _paths(store_dir: Path, name: str) -> dict[str, Path]:
    return {
        "bin": store_dir / f"{name}.bin",
        "partial": store_dir / f"{name}.bin.partial",
        "journal": store_dir / f"{name}.journal.jsonl",
        "index": store_dir / f"{name}.index.json",
        "manifest": store_dir / MANIFEST,
    }


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith((".partial", ".tmp")):
        raise ValueError(f"invalid modality name {name!r}: use letters, digits, '_', '-', '.'")


def _check_dtype(dtype: Any) -> str:
    key = np.dtype(dtype).name
    if key not in _DTYPES:
        raise ValueError(f"store dtype must be float16 or float32, got {dtype!r}")
    return key


def sha256_file(path: Path, limit: int | None = None) -> str:
    """sha256 of a file (or of its first `limit` bytes), read in 4 MiB chunks."""
    h = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            n = _CHUNK if remaining is None else min(_CHUNK, remaining)
            chunk = f.read(n)
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return h.hexdigest()


def _ids_sha256(ids: Iterable[str] | None) -> str | None:
    if ids is None:
        return None
    return hashlib.sha256("\n".join(sorted({str(i) for i in ids})).encode()).hexdigest()


def _source_key(source: Mapping[str, Any] | None) -> dict | None:
    """The part of a source description that identifies its content (size and sha256: the
    path may move, and a copy or a `touch` changes the mtime but not the content)."""
    if source is None:
        return None
    return {k: v for k, v in source.items() if k not in ("path", "mtime_ns")}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _manifest_lock(store_dir: Path) -> Iterator[None]:
    """Advisory lock so two conversions into one folder (e.g. video and audio in parallel)
    do not lose each other's manifest entries. No-op where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(store_dir / (MANIFEST + ".lock"), "a+") as lf:
        fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lf.fileno(), fcntl.LOCK_UN)


def read_manifest(store_dir: str | Path) -> dict:
    """The store's manifest (an empty one if the folder has none yet)."""
    path = Path(store_dir) / MANIFEST
    if not path.exists():
        return {"format": STORE_FORMAT, "version": STORE_VERSION, "modalities": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable store manifest ({e})") from e
    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT or not isinstance(
            data.get("modalities"), dict):
        raise StoreError(f"{path}: not an amess feature-store manifest")
    if data.get("version") != STORE_VERSION:
        raise StoreError(f"{path}: store version {data.get('version')} is not supported "
                         f"(expected {STORE_VERSION}); rebuild it with `amess data convert`")
    return data


def _update_entry(store_dir: Path, name: str, entry: dict | None) -> None:
    with _manifest_lock(store_dir):
        try:
            data = read_manifest(store_dir)
        except StoreError as e:  # conversion is the repair: an old or unreadable manifest is replaced
            path = store_dir / MANIFEST
            try:
                other = json.loads(path.read_text(encoding="utf-8"))
                foreign = not isinstance(other, dict) or other.get("format") != STORE_FORMAT
            except (OSError, ValueError):
                foreign = False  # unreadable: a damaged manifest of ours
            if foreign:
                raise StoreError(f"{path}: a manifest.json that is not an amess feature store's is in the "
                                 "way; convert into another folder") from e
            logger.warning("%s; starting a new manifest (every modality is converted again)", e)
            data = {"format": STORE_FORMAT, "version": STORE_VERSION, "modalities": {}}
        if entry is None:
            data["modalities"].pop(name, None)
        else:
            data["modalities"][name] = entry
        write_text(store_dir / MANIFEST, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _params(dtype: str, max_len: int | None, ids: Iterable[str] | None,
            source: Mapping[str, Any] | None) -> dict:
    return {"dtype": dtype, "max_len": max_len, "ids_sha256": _ids_sha256(ids),
            "source_key": json.loads(json.dumps(_source_key(source))), "version": STORE_VERSION}


def _up_to_date(store_dir: Path, name: str, params: dict, *, verify_data: bool = True) -> dict | None:
    """The manifest entry if a complete, intact store with these parameters is already there.

    Intact: the .bin has the recorded size, the index file its recorded sha256, and (with
    `verify_data`, which reads the whole .bin) the .bin its recorded sha256. A damaged store
    is logged and converted again (that is how `amess data convert` repairs one)."""
    try:
        entry = read_manifest(store_dir)["modalities"].get(name)
    except StoreError:
        return None
    if not entry or not entry.get("complete"):
        return None
    if (entry.get("dtype"), entry.get("max_len"), entry.get("ids_sha256"), _source_key(entry.get("source"))) != (
            params["dtype"], params["max_len"], params["ids_sha256"], params["source_key"]):
        return None
    p = _paths(store_dir, name)
    try:
        damage = _entry_problem(entry)
        if damage is None and (not p["index"].exists() or not p["bin"].exists()):
            damage = "its index or data file is missing"
        if damage is None and p["bin"].stat().st_size != entry["num_rows"] * entry["dim"] * np.dtype(
                entry["dtype"]).itemsize:
            damage = f"{p['bin'].name} has the wrong size"
        if damage is None and sha256_file(p["index"]) != entry.get("index_sha256"):
            damage = f"{p['index'].name} changed since conversion"
        if damage is None and verify_data and sha256_file(p["bin"]) != entry.get("bin_sha256"):
            damage = f"{p['bin'].name} changed since conversion (sha256 differs)"
    except OSError as e:
        damage = f"unreadable ({e})"
    if damage is not None:
        logger.warning("%s/%s: %s; converting it again", store_dir, name, damage)
        return None
    return entry


def _entry_problem(entry: Mapping[str, Any]) -> str | None:
    """What is malformed in a complete manifest entry, or None."""
    for key, kind in (("dim", int), ("num_rows", int), ("num_samples", int), ("dtype", str),
                      ("index_sha256", str), ("bin_sha256", str)):
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            return f"the manifest entry's {key!r} is missing or not a {kind.__name__}"
    if entry["dtype"] not in _DTYPES or min(entry["dim"], entry["num_rows"], entry["num_samples"]) < 0:
        return "the manifest entry's dtype, dim or sizes are invalid"
    max_len = entry.get("max_len")
    if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1):
        return "the manifest entry's max_len is invalid"
    return None


def _source_info(src: Path) -> dict:
    st = src.stat()
    return {"path": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": sha256_file(src)}


def _stale_source(entry: Mapping[str, Any]) -> str | None:
    """Why the entry's source pickle no longer matches the store (its size or mtime changed),
    or None (also when it was moved or deleted: then nothing can be compared)."""
    src = entry.get("source")
    if not isinstance(src, dict) or not isinstance(src.get("path"), str):
        return None
    try:
        st = Path(src["path"]).stat()
    except OSError:
        return None
    if st.st_size != src.get("size"):
        return f"its source {src['path']} changed since conversion (size {src.get('size')} -> {st.st_size} bytes)"
    if st.st_mtime_ns != src.get("mtime_ns"):
        return f"its source {src['path']} changed since conversion (modified again; same size)"
    return None


# --------------------------------------------------------------------------- journal

def _read_journal(paths: dict[str, Path], params: dict) -> list[dict] | None:
    """Entries of a usable progress journal, truncated to what the .partial file holds,
    or None if there is nothing to resume (missing, foreign parameters, unreadable)."""
    if not paths["journal"].exists() or not paths["partial"].exists():
        return None
    try:
        with open(paths["journal"], encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    if not lines:
        return None
    try:
        header = json.loads(lines[0])
    except ValueError:
        return None
    if header.get("params") != json.loads(json.dumps(params)):
        logger.info("%s: parameters changed since the interrupted conversion; starting afresh",
                    paths["partial"])
        return None
    size = paths["partial"].stat().st_size
    entries: list[dict] = []
    prev_end = 0
    for line in lines[1:]:
        try:
            e = json.loads(line)
            ok = isinstance(e, dict) and {"id", "rows", "orig", "dim", "end", "crc"} <= e.keys()
        except ValueError:
            ok = False
        if not ok:
            break  # a line cut short by a kill: everything after it is unreliable
        if e["end"] < prev_end or e["end"] > size:
            break  # journaled but not on disk (data not flushed before a crash)
        entries.append(e)
        prev_end = e["end"]
    return entries


# --------------------------------------------------------------------------- conversion

def partial_ids(store_dir: str | Path, name: str) -> list[str]:
    """Ids already written by an interrupted conversion (in journal order), for generators
    that want to skip producing them. Returns [] if there is no partial conversion."""
    paths = _paths(Path(store_dir), name)
    if not paths["journal"].exists():
        return []
    try:
        header = json.loads(paths["journal"].read_text(encoding="utf-8").splitlines()[0])
    except (OSError, ValueError, IndexError):
        return []
    entries = _read_journal(paths, header.get("params")) or []
    return [e["id"] for e in entries]


def convert_arrays(
    items: Iterable[tuple[str, Any]],
    store_dir: str | Path,
    name: str,
    *,
    dtype: str = "float16",
    max_len: int | None = None,
    ids: Iterable[str] | None = None,
    source: Mapping[str, Any] | None = None,
    progress: bool = True,
    total: int | None = None,
    resume: bool = True,
    checkpoint_every: int = 64,
    verify: bool = True,
    check_existing: bool = True,
) -> dict:
    """Write `(sample_id, features)` pairs to `<store_dir>/<name>.bin` one at a time.

    `features` is anything `safe_pickle.to_numpy` accepts: a `(T, d)` numpy array or
    torch tensor (also `(T, 1, d)` / `(1, T, d)`), or a list of `(1, d)` arrays (MIntRec's
    video). Each is truncated to `max_len` rows and stored as `dtype` ("float16" or
    "float32"); the original row count is kept in the index. `ids`, if given, keeps only
    those samples. `source` describes where the arrays come from (recorded in the
    manifest; with it, an already complete identical store is skipped, unless it is
    damaged; `verify=False` checks only sizes and the index hash then, not the whole .bin;
    `check_existing=False` skips that check, for callers that made it already).
    `total` is only for progress messages. Every sample goes through `to_numpy`: one that is
    not finite, not real, or (float16) beyond float16's range stops the conversion with a
    `DataError` naming the source and the sample.

    Resumes an interrupted conversion with the same parameters (see the module docstring);
    `resume=False` always starts afresh. Returns the manifest entry plus `name`,
    `store_dir`, `skipped`, `resumed_samples`, `missing_ids` (requested ids never seen)
    and `seconds`.
    """
    t0 = time.monotonic()
    store_dir = Path(store_dir)
    _check_name(name)
    dtype = _check_dtype(dtype)
    if max_len is not None and (int(max_len) != max_len or max_len < 1):
        raise ValueError(f"max_len must be a positive integer or None, got {max_len!r}")
    np_dtype = np.dtype(_DTYPES[dtype])
    wanted = {str(i) for i in ids} if ids is not None else None
    params = _params(dtype, max_len, wanted, source)
    store_dir.mkdir(parents=True, exist_ok=True)
    paths = _paths(store_dir, name)
    src_label = str(source.get("path", "<arrays>")) if source else "<arrays>"

    if source is not None and check_existing:
        done_entry = _up_to_date(store_dir, name, params, verify_data=verify)
        if done_entry is not None:
            logger.info("%s: store %s/%s is up to date; skipped", src_label, store_dir, name)
            return {**done_entry, "name": name, "store_dir": str(store_dir), "skipped": True,
                    "resumed_samples": 0, "missing_ids": 0, "seconds": time.monotonic() - t0}

    # The entry claims nothing while we write (an older complete .bin may still be there).
    _update_entry(store_dir, name, {"complete": False, "dtype": dtype, "max_len": max_len,
                                    "source": dict(source) if source else None,
                                    "ids_sha256": params["ids_sha256"], "version": STORE_VERSION})

    entries = _read_journal(paths, params) if resume else None
    hasher = hashlib.sha256()
    if entries is not None:
        end = entries[-1]["end"] if entries else 0
        os.truncate(paths["partial"], end)
        if end:
            with open(paths["partial"], "rb") as f:
                remaining = end
                while remaining:
                    chunk = f.read(min(_CHUNK, remaining))
                    hasher.update(chunk)
                    remaining -= len(chunk)
        # rewrite the journal without any lines past the truncation point
        header = json.dumps({"params": params}, sort_keys=True)
        write_text(paths["journal"], "\n".join([header] + [json.dumps(e, sort_keys=True) for e in entries])
                           + "\n")
        logger.info("%s: resuming %s/%s after %d samples already written", src_label, store_dir, name,
                    len(entries))
    else:
        entries = []
        for key in ("partial", "journal"):
            paths[key].unlink(missing_ok=True)
        write_text(paths["journal"], json.dumps({"params": params}, sort_keys=True) + "\n")

    resumed = len(entries)
    out_ids = [e["id"] for e in entries]
    rows_kept = [int(e["rows"]) for e in entries]
    rows_orig = [int(e["orig"]) for e in entries]
    crcs = [int(e["crc"]) for e in entries]
    seen = set(out_ids)
    done = set(out_ids)
    dim = next((int(e["dim"]) for e in reversed(entries) if e["dim"]), 0)
    byte_end = entries[-1]["end"] if entries else 0
    pending: list[str] = []
    last_log = time.monotonic()

    bin_f = open(paths["partial"], "ab", buffering=_WRITE_BUFFER)
    journal_f = open(paths["journal"], "a", encoding="utf-8")

    def checkpoint() -> None:
        bin_f.flush()  # data first, then the journal lines that vouch for it
        if pending:
            journal_f.write("".join(pending))
            pending.clear()
        journal_f.flush()

    try:
        count = resumed
        for key, value in items:
            sid = str(key)
            if wanted is not None and sid not in wanted:
                continue
            if sid in done:
                done.discard(sid)  # written before the interruption: not converted again
                continue
            if sid in seen:
                raise DataError(f"{src_label}: sample id {sid!r} occurs twice; expected one entry per sample")
            # refuses NaN / inf, complex, strings, and values the store's dtype would make inf
            arr = to_numpy(value, path=src_label, sample_id=sid, store_dtype=np_dtype)
            del value
            orig = int(arr.shape[0])
            if orig > 0:
                if dim == 0:
                    dim = int(arr.shape[1])
                elif arr.shape[1] != dim:
                    raise DataError(f"{src_label}: sample {sid!r} has width {arr.shape[1]}, "
                                    f"earlier samples have {dim}")
            kept = arr[:max_len] if max_len is not None else arr
            out = np.ascontiguousarray(kept, dtype=np_dtype)
            del arr, kept
            crc = zlib.crc32(out.data) if out.size else 0
            if out.size:
                bin_f.write(out.data)
                hasher.update(out.data)
                byte_end += out.nbytes
            n_kept = int(out.shape[0]) if out.size else 0
            del out
            seen.add(sid)
            out_ids.append(sid)
            rows_kept.append(n_kept)
            rows_orig.append(orig)
            crcs.append(crc)
            pending.append(json.dumps({"id": sid, "rows": n_kept, "orig": orig, "dim": dim, "end": byte_end,
                                       "crc": crc}, sort_keys=True) + "\n")
            count += 1
            if len(pending) >= checkpoint_every:
                checkpoint()
            if progress and time.monotonic() - last_log > 5.0:
                last_log = time.monotonic()
                logger.info("%s -> %s/%s: %d%s samples, %.1f MB written", src_label, store_dir, name, count,
                            f"/{total}" if total else "", byte_end / 1e6)
        checkpoint()
        os.fsync(bin_f.fileno())
    except BaseException:
        with contextlib.suppress(Exception):
            checkpoint()
        bin_f.close()
        journal_f.close()
        logger.warning("%s -> %s/%s: conversion stopped after %d samples; rerun to resume",
                       src_label, store_dir, name, len(out_ids))
        raise
    bin_f.close()
    journal_f.close()

    missing = len(wanted - seen) if wanted is not None else 0
    if missing:
        logger.warning("%s: %d requested id(s) are not in the source, e.g. %s", src_label, missing,
                       sorted(wanted - seen)[:5])

    offsets = np.concatenate([[0], np.cumsum(rows_kept, dtype=np.int64)])[:-1].tolist() if rows_kept else []
    num_rows = int(sum(rows_kept))
    if byte_end != num_rows * dim * np_dtype.itemsize:  # pragma: no cover - internal invariant
        raise StoreError(f"{store_dir}/{name}: wrote {byte_end} bytes for {num_rows} rows of width {dim}")
    index = {"ids": out_ids, "offset": offsets, "length": rows_kept, "orig_length": rows_orig, "crc32": crcs}
    index_text = json.dumps(index, separators=(",", ":")) + "\n"
    write_text(paths["index"], index_text)
    os.replace(paths["partial"], paths["bin"])
    _fsync_dir(store_dir)
    entry = {
        "complete": True, "version": STORE_VERSION, "dtype": dtype, "dim": dim, "num_samples": len(out_ids),
        "num_rows": num_rows, "max_len": max_len, "source": dict(source) if source else None,
        "ids_sha256": params["ids_sha256"], "bin_sha256": hasher.hexdigest(),
        "index_sha256": hashlib.sha256(index_text.encode("utf-8")).hexdigest(),
        "bin_file": paths["bin"].name, "index_file": paths["index"].name,
    }
    _update_entry(store_dir, name, entry)
    paths["journal"].unlink(missing_ok=True)
    secs = time.monotonic() - t0
    if progress:
        logger.info("%s -> %s/%s: %d samples, %d rows x %d, %.1f MB in %.1fs", src_label, store_dir, name,
                    len(out_ids), num_rows, dim, byte_end / 1e6, secs)
    return {**entry, "name": name, "store_dir": str(store_dir), "skipped": False, "resumed_samples": resumed,
            "missing_ids": missing, "seconds": secs}


def convert_pickle(
    src: str | Path,
    store_dir: str | Path,
    name: str,
    *,
    dtype: str = "float16",
    max_len: int | None = None,
    ids: Iterable[str] | None = None,
    progress: bool = True,
    resume: bool = True,
    verify: bool = True,
) -> dict:
    """Convert one feature pickle (dict sample_id -> `(T, d)` features) into the store.

    Memory: the pickle is loaded whole through `load_compact` (pickles cannot be read in
    parts), its float arrays cast to `dtype` as they are read, so peak memory is about this
    one file's contents at the store's precision (float16: half the float32 file); samples
    are then popped from the dict and written one by one, so memory falls during the pass. Convert one
    modality per call.

    The source's size and sha256 are checked first: if the store already holds a complete,
    intact conversion of the same content with the same `dtype`, `max_len` and `ids`, nothing
    is loaded and the result has `skipped=True` (a new mtime of the same content is recorded).
    A damaged store (index or data changed since conversion; with `verify=False` only the
    index and sizes are checked, not the whole .bin) is converted again. See
    `convert_arrays` for the return value and resuming.
    """
    src = Path(src)
    dtype = _check_dtype(dtype)
    wanted = {str(i) for i in ids} if ids is not None else None
    source = _source_info(src)
    params = _params(dtype, max_len, wanted, source)
    entry = _up_to_date(Path(store_dir), name, params, verify_data=verify)
    if entry is not None:
        if entry.get("source") != source:  # the same content, touched or moved: record where and when
            entry = {**entry, "source": source}
            _update_entry(Path(store_dir), name, entry)
        logger.info("%s: store %s/%s is up to date; skipped", src, store_dir, name)
        return {**entry, "name": name, "store_dir": str(store_dir), "skipped": True, "resumed_samples": 0,
                "missing_ids": 0, "seconds": 0.0}
    logger.info("%s: loading %.1f MB (a pickle is read whole)", src, source["size"] / 1e6)
    # arrays are cast to the store's dtype as they are unpickled (never the whole file at float32)
    raw = load_compact(src, np.dtype(dtype))
    if not isinstance(raw, dict):
        raise DataError(f"{src}: expected a dict sample_id -> features, got {type(raw).__name__}")
    st = src.stat()
    if (st.st_size, st.st_mtime_ns) != (source["size"], source["mtime_ns"]):
        raise StoreError(f"{src}: the file changed while it was being converted; run the conversion again")
    total = len(raw) if wanted is None else len(wanted)

    def pop_items() -> Iterator[tuple[str, Any]]:
        for key in list(raw.keys()):
            value = raw.pop(key)  # the dict lets go of each sample as it is handed on
            sid = str(key)
            if wanted is not None and sid not in wanted:
                continue
            yield sid, value

    try:
        return convert_arrays(pop_items(), store_dir, name, dtype=dtype, max_len=max_len, ids=wanted,
                              source=source, progress=progress, total=total, resume=resume, check_existing=False)
    finally:
        raw.clear()


# --------------------------------------------------------------------------- reading

class MemmapFeatures:
    """One modality of a feature store, read through `np.memmap` (FeatureSource protocol).

    `get(id)` returns a float32 `(T, dim)` copy of the sample's rows, `T = min(stored rows,
    max_len)`; `length(id)` the original number of frames before any truncation. The
    mapping is opened lazily and dropped when pickled, so DataLoader workers receive only
    the (small) index and reopen the file themselves.

    Opening checks what is cheap (see the module docstring, "Integrity"): the manifest
    entry, the .bin's size, the index's sha256 and consistency, and (`check_source`) that the
    source pickle has not changed since conversion. The first `get` of each sample checks its
    bytes against the crc32 recorded at conversion (one pass over data that is being read
    anyway); any mismatch raises a `StoreError` naming the sample.

    `release_pages`: pages of a file mapping count toward the process's RSS once touched
    and stay resident until the kernel needs the memory, so a full epoch would show an RSS
    as large as the store. With this on (default, where the platform has `madvise`), the
    mapping's pages are released (MADV_DONTNEED) after every 16 reads or 32 MiB; the data stays in
    the OS page cache, so rereading is still fast, and RSS stays near the working set.
    """

    def __init__(self, store_dir: str | Path, name: str, *, max_len: int | None = None,
                 release_pages: bool = True, check_source: bool = True):
        _check_name(name)
        self.store_dir = Path(store_dir)
        self.name = name
        paths = _paths(self.store_dir, name)
        self.path = str(paths["bin"])
        hint = f"run `amess data convert` to build (or finish, or repair) the store in {self.store_dir}"
        if not paths["manifest"].exists():
            raise IncompleteStoreError(f"{self.store_dir}: no feature store here (no {MANIFEST}); {hint}")
        entry = read_manifest(self.store_dir)["modalities"].get(name)
        if entry is None:
            raise IncompleteStoreError(f"{self.store_dir}: the store has no modality {name!r}; {hint}")
        if not isinstance(entry, dict) or not entry.get("complete"):
            raise IncompleteStoreError(f"{self.store_dir}: modality {name!r} is incomplete (its conversion "
                                       f"never finished or was interrupted); {hint}")
        bad = _entry_problem(entry)
        if bad:
            raise StoreError(f"{paths['manifest']}: modality {name!r}: {bad}; {hint}")
        stale = _stale_source(entry) if check_source else None
        if stale:
            raise StoreError(f"{self.store_dir}/{name}: {stale}, so the store may hold old features; {hint}")
        self.manifest = entry
        self.dim = int(entry["dim"])
        self.dtype = np.dtype(entry["dtype"])
        self.max_len = max_len
        self._rows = int(entry["num_rows"])
        expected = self._rows * self.dim * self.dtype.itemsize
        if not paths["bin"].exists() or paths["bin"].stat().st_size != expected:
            have = paths["bin"].stat().st_size if paths["bin"].exists() else "no file"
            raise StoreError(f"{self.path}: expected {expected} bytes, found {have}; the store is damaged, {hint}")
        try:
            raw = paths["index"].read_bytes()
        except OSError as e:
            raise StoreError(f"{paths['index']}: unreadable index ({e}); {hint}") from e
        if hashlib.sha256(raw).hexdigest() != entry["index_sha256"]:
            raise StoreError(f"{paths['index']}: the index changed since conversion (its sha256 differs from "
                             f"the manifest's); the store is damaged, {hint}")
        try:
            index = json.loads(raw.decode("utf-8"))
            self._ids: list[str] = [str(i) for i in index["ids"]]
            self._offset = np.asarray(index["offset"], dtype=np.int64)
            self._length = np.asarray(index["length"], dtype=np.int64)
            self._orig = np.asarray(index["orig_length"], dtype=np.int64)
            self._crc = np.asarray(index["crc32"], dtype=np.int64)
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            raise StoreError(f"{paths['index']}: unreadable index ({e}); {hint}") from e
        problem = _index_problem(self._ids, self._offset, self._length, self._orig, self._crc, entry)
        if problem:
            raise StoreError(f"{paths['index']}: {problem}; {hint}")
        self._pos = {sid: i for i, sid in enumerate(self._ids)}
        self._checked = np.zeros(len(self._ids), dtype=bool)  # samples whose crc32 was verified
        self._release = release_pages and hasattr(mmap, "MADV_DONTNEED")
        self._row_bytes = self.dim * self.dtype.itemsize
        self._touched = self._reads = 0
        self._mm: np.memmap | None = None

    # -- mapping ---------------------------------------------------------------------
    def _map(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self._rows, self.dim))
        return self._mm

    def close(self) -> None:
        """Drop the mapping (it is reopened on the next `get`)."""
        self._mm = None

    def __enter__(self) -> "MemmapFeatures":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"] = None
        state.pop("_pos", None)  # rebuilt from _ids: keeps the pickle small
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pos = {sid: i for i, sid in enumerate(self._ids)}

    # -- FeatureSource -------------------------------------------------------------------
    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._pos

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> list[str]:
        """Sample ids in store order."""
        return list(self._ids)

    def _where(self, sample_id: str) -> int:
        i = self._pos.get(sample_id)
        if i is None:
            raise KeyError(f"sample id {sample_id!r} is not in feature store {self.path}")
        return i

    def get(self, sample_id: str) -> np.ndarray:
        """`(T, dim)` float32 copy of the sample's frames, T = min(stored rows, max_len)."""
        i = self._where(sample_id)
        off, n = int(self._offset[i]), int(self._length[i])
        if self.max_len is not None:
            n = min(n, self.max_len)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        mm = self._map()
        if not self._checked[i]:
            self._verify(i, mm)
        out = mm[off:off + n].astype(np.float32)  # astype copies: nothing refers to the map afterwards
        if self._release:
            self._touched += n * self._row_bytes
            self._reads += 1
            if self._touched >= _RELEASE_EVERY[0] or self._reads >= _RELEASE_EVERY[1]:
                self._release_pages(mm)
        return out

    def _verify(self, i: int, mm: np.memmap) -> None:
        """Check sample i's stored bytes (all its rows, whatever this view's max_len) against the
        crc32 recorded at conversion."""
        off, n = int(self._offset[i]), int(self._length[i])
        if zlib.crc32(mm[off:off + n]) != int(self._crc[i]):
            raise StoreError(f"{self.path}: sample {self._ids[i]}: its stored bytes changed since conversion "
                             "(crc32 mismatch); the store is damaged, run `amess data convert` to repair it "
                             f"in {self.store_dir}")
        self._checked[i] = True

    def _release_pages(self, mm: np.memmap) -> None:
        """Unmap every resident page of the mapping (file-backed and read-only, so nothing is
        lost: the data stays in the page cache and later reads fault it back in cheaply).
        The whole range is released, not just the last sample's: the kernel maps neighbouring
        pages around each fault (fault-around, large folios), which would otherwise pile up."""
        self._touched = self._reads = 0
        raw = getattr(mm, "_mmap", None)
        try:
            raw.madvise(mmap.MADV_DONTNEED, 0, len(raw))
        except (OSError, ValueError, AttributeError, TypeError):
            self._release = False

    def length(self, sample_id: str) -> int:
        """Original number of frames in the source, before any truncation."""
        return int(self._orig[self._where(sample_id)])

    def stored_length(self, sample_id: str) -> int:
        """Rows `get` returns for the sample (after the conversion's and this view's max_len)."""
        n = int(self._length[self._where(sample_id)])
        return n if self.max_len is None else min(n, self.max_len)

    def __repr__(self) -> str:
        return (f"MemmapFeatures({str(self.store_dir)!r}, {self.name!r}, samples={len(self)}, dim={self.dim}, "
                f"dtype={self.dtype.name}, max_len={self.max_len})")


def open_store(store_dir: str | Path, name: str, max_len: int | None = None) -> MemmapFeatures:
    """Open one modality of a complete store; refuses incomplete, damaged or stale stores."""
    return MemmapFeatures(store_dir, name, max_len=max_len)


def _index_problem(ids: list[str], off: np.ndarray, ln: np.ndarray, orig: np.ndarray, crc: np.ndarray,
                   entry: Mapping[str, Any]) -> str | None:
    """What is inconsistent in an index (against itself and the manifest entry), or None."""
    n = len(ids)
    if not (n == len(off) == len(ln) == len(orig) == len(crc) == int(entry["num_samples"])):
        return f"the index lists {n} ids (with {len(off)} offsets), the manifest {entry['num_samples']} samples"
    if n and (off[0] != 0 or np.any(off[1:] != off[:-1] + ln[:-1]) or int(off[-1] + ln[-1]) != entry["num_rows"]):
        return f"the index offsets are not contiguous over the {entry['num_rows']} rows"
    max_len = entry.get("max_len")
    if n and (np.any(ln < 0) or np.any(ln > orig) or (max_len is not None and np.any(ln > max_len))):
        return "the index lengths exceed the original lengths or max_len"
    if len(set(ids)) != n:
        return "the index has duplicate ids"
    return None


def verify_store(store_dir: str | Path, *, check_source: bool = False) -> list[str]:
    """Check every modality of a store; returns a list of problems (empty when sound).

    Re-hashes each .bin against the manifest's sha256 (naming the damaged samples by their
    crc32 when it differs), checks file sizes, the index's sha256 and consistency. A source
    file that still exists at its recorded path but whose size or mtime changed is reported
    as stale; with `check_source=True` its sha256 is recomputed as well.
    """
    store_dir = Path(store_dir)
    problems: list[str] = []
    if not (store_dir / MANIFEST).exists():
        return [f"{store_dir}: no {MANIFEST}"]
    try:
        manifest = read_manifest(store_dir)
    except StoreError as e:
        return [str(e)]
    if not manifest["modalities"]:
        problems.append(f"{store_dir}: the manifest lists no modalities")
    for name, entry in sorted(manifest["modalities"].items()):
        where = f"{store_dir}/{name}"
        if not isinstance(entry, dict) or not entry.get("complete"):
            problems.append(f"{where}: incomplete (conversion unfinished or interrupted)")
            continue
        bad = _entry_problem(entry)
        if bad:
            problems.append(f"{where}: {bad}")
            continue
        paths = _paths(store_dir, name)
        index = None
        try:
            raw = paths["index"].read_bytes()
            if hashlib.sha256(raw).hexdigest() != entry["index_sha256"]:
                problems.append(f"{where}: {paths['index'].name} changed since conversion (sha256 differs)")
            index = json.loads(raw.decode("utf-8"))
            arrays = [np.asarray(index[k], dtype=np.int64) for k in ("offset", "length", "orig_length", "crc32")]
            ids = [str(i) for i in index["ids"]]
        except (OSError, ValueError, KeyError, TypeError, OverflowError) as e:
            problems.append(f"{where}: index unreadable ({e})")
            index = None
        else:
            problem = _index_problem(ids, *arrays, entry)
            if problem:
                problems.append(f"{where}: {problem}")
                index = None
        expected = entry["num_rows"] * entry["dim"] * np.dtype(entry["dtype"]).itemsize
        if not paths["bin"].exists():
            problems.append(f"{where}: {paths['bin'].name} is missing")
        elif paths["bin"].stat().st_size != expected:
            problems.append(f"{where}: {paths['bin'].name} has {paths['bin'].stat().st_size} bytes, "
                            f"expected {expected}")
        elif sha256_file(paths["bin"]) != entry["bin_sha256"]:
            damaged = ""
            if index is not None:
                off, ln, _, crc = arrays
                mm = np.memmap(paths["bin"], dtype=np.dtype(entry["dtype"]), mode="r",
                               shape=(entry["num_rows"], entry["dim"])) if entry["num_rows"] * entry["dim"] else None
                bad_ids = [ids[k] for k in range(len(ids)) if ln[k] and mm is not None
                           and zlib.crc32(mm[int(off[k]):int(off[k] + ln[k])]) != int(crc[k])]
                del mm
                damaged = f"; damaged samples: {bad_ids[:10]}" + (f" and {len(bad_ids) - 10} more"
                                                                     if len(bad_ids) > 10 else "")
            problems.append(f"{where}: {paths['bin'].name} sha256 differs from the manifest (corrupted){damaged}")
        stale = _stale_source(entry)
        if stale:
            problems.append(f"{where}: {stale} (stale store)")
        elif check_source and entry.get("source") and Path(entry["source"]["path"]).exists() and \
                sha256_file(Path(entry["source"]["path"])) != entry["source"].get("sha256"):
            problems.append(f"{where}: source {entry['source']['path']} sha256 differs from the manifest")
    return problems


def store_fingerprint(store_dir: str | Path, name: str) -> str:
    """What identifies one modality of a store's content: its recorded dtype, dim, rows,
    max_len and data sha256, plus the sha256 of its index file as it is now (cheap: the
    manifest and the index are read, not the data). `missing` or `incomplete` otherwise."""
    store_dir = Path(store_dir)
    try:
        entry = read_manifest(store_dir)["modalities"].get(name)
    except StoreError:
        return "unreadable"
    if not isinstance(entry, dict) or not entry.get("complete"):
        return "missing" if entry is None else "incomplete"
    index = _paths(store_dir, name)["index"]
    index_sha = sha256_file(index) if index.is_file() else "missing"
    return ":".join(str(entry.get(k)) for k in ("dtype", "dim", "num_rows", "max_len", "bin_sha256")) + f":{index_sha}"
