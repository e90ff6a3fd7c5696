"""The memory-mapped feature store: conversion, reading, resuming, verification."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from amess.data import safe_pickle
from amess.data.store import (
    IncompleteStoreError,
    MemmapFeatures,
    convert_arrays,
    convert_pickle,
    open_store,
    partial_ids,
    read_manifest,
    verify_store,
)

def f16(a) -> np.ndarray:
    """What a float16 store must give back: the float32 values rounded to float16, exactly."""
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


def _features(n: int = 12, dim: int = 8, seed: int = 0, max_t: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        t = int(rng.integers(0, max_t + 1)) if i else 0  # the first sample has no frames
        out[f"S01_E01_{i}"] = rng.standard_normal((t, dim)).astype(np.float32)
    return out


def _dump(obj, path: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def _store_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.endswith(".lock")}


def test_round_trip_numpy(tmp_path):
    feats = _features()
    src = _dump(feats, tmp_path / "audio.pkl")
    info = convert_pickle(src, tmp_path / "store", "audio", progress=False)
    assert info["complete"] and not info["skipped"] and info["num_samples"] == len(feats)
    store = open_store(tmp_path / "store", "audio")
    assert store.dim == 8 and len(store) == len(feats) and store.ids() == list(feats)
    assert store.path.endswith("audio.bin")
    for sid, arr in feats.items():
        assert sid in store
        got = store.get(sid)
        assert got.dtype == np.float32 and got.shape == arr.shape
        np.testing.assert_array_equal(got, f16(arr))
        assert store.length(sid) == arr.shape[0]
    assert store.get("S01_E01_0").shape == (0, 8)
    manifest = read_manifest(tmp_path / "store")["modalities"]["audio"]
    assert manifest["source"]["size"] == src.stat().st_size and len(manifest["source"]["sha256"]) == 64
    assert manifest["dtype"] == "float16" and manifest["complete"] is True
    assert verify_store(tmp_path / "store") == []


def test_float32_is_exact(tmp_path):
    feats = _features(n=5)
    convert_arrays(feats.items(), tmp_path, "v", dtype="float32", progress=False)
    store = open_store(tmp_path, "v")
    for sid, arr in feats.items():
        np.testing.assert_array_equal(store.get(sid), arr)
    assert (tmp_path / "v.bin").stat().st_size == sum(a.size for a in feats.values()) * 4


def test_round_trip_torch_tensors(tmp_path):
    feats = _features(n=6, dim=12, seed=1)
    src = _dump({k: torch.from_numpy(v) for k, v in feats.items()}, tmp_path / "wavlm.pkl")
    convert_pickle(src, tmp_path / "s", "audio", progress=False)
    store = open_store(tmp_path / "s", "audio")
    for sid, arr in feats.items():
        np.testing.assert_array_equal(store.get(sid), f16(arr))


def test_round_trip_mintrec_video_lists(tmp_path):
    rng = np.random.default_rng(2)
    frames = {f"S0{i}_E02_{i}": [rng.standard_normal((1, 256)).astype(np.float32) for _ in range(i + 1)]
              for i in range(4)}
    frames["S09_E09_9"] = []  # no detected speaker at all
    src = _dump(frames, tmp_path / "video_feats.pkl")
    convert_pickle(src, tmp_path / "s", "video", progress=False)
    store = open_store(tmp_path / "s", "video")
    assert store.dim == 256
    for sid, lst in frames.items():
        want = np.concatenate(lst, 0) if lst else np.zeros((0, 256), np.float32)
        np.testing.assert_array_equal(store.get(sid), f16(want))
        assert store.length(sid) == len(lst)


def test_truncation_at_conversion_and_at_open(tmp_path):
    feats = {"a": np.ones((10, 4), np.float32), "b": np.arange(12, dtype=np.float32).reshape(3, 4)}
    convert_arrays(feats.items(), tmp_path, "x", max_len=6, progress=False)
    store = open_store(tmp_path, "x")
    assert store.get("a").shape == (6, 4) and store.length("a") == 10
    np.testing.assert_array_equal(store.get("b"), feats["b"])
    short = open_store(tmp_path, "x", max_len=2)
    assert short.get("a").shape == (2, 4) and short.length("a") == 10
    np.testing.assert_array_equal(short.get("b"), feats["b"][:2])
    assert (tmp_path / "x.bin").stat().st_size == (6 + 3) * 4 * 2


def test_missing_id_raises_keyerror_naming_it(tmp_path):
    convert_arrays(_features(n=3).items(), tmp_path, "a", progress=False)
    store = open_store(tmp_path, "a")
    assert "nope_42" not in store
    with pytest.raises(KeyError, match="nope_42"):
        store.get("nope_42")
    with pytest.raises(KeyError, match="nope_42"):
        store.length("nope_42")


def test_ids_filter(tmp_path):
    feats = _features(n=6)
    keep = ["S01_E01_1", "S01_E01_4", "not_there"]
    info = convert_pickle(_dump(feats, tmp_path / "f.pkl"), tmp_path / "s", "a", ids=keep, progress=False)
    assert info["num_samples"] == 2 and info["missing_ids"] == 1
    assert sorted(open_store(tmp_path / "s", "a").ids()) == ["S01_E01_1", "S01_E01_4"]


def test_width_mismatch_is_refused(tmp_path):
    items = [("a", np.zeros((2, 4), np.float32)), ("b", np.zeros((2, 5), np.float32))]
    with pytest.raises(ValueError, match="'b'"):
        convert_arrays(items, tmp_path, "a", progress=False)
    with pytest.raises(IncompleteStoreError):
        open_store(tmp_path, "a")


def test_incomplete_store_is_refused(tmp_path):
    with pytest.raises(IncompleteStoreError, match="amess data convert"):
        open_store(tmp_path, "audio")  # nothing there at all

    def broken():
        yield "a", np.zeros((3, 4), np.float32)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_arrays(broken(), tmp_path, "audio", progress=False)
    with pytest.raises(IncompleteStoreError) as e:
        open_store(tmp_path, "audio")
    assert str(tmp_path) in str(e.value) and "amess data convert" in str(e.value)
    assert not (tmp_path / "audio.bin").exists()
    assert any("incomplete" in p for p in verify_store(tmp_path))


class _Interrupt(Exception):
    pass


def _interrupted(items, k):
    for i, item in enumerate(items):
        if i == k:
            raise _Interrupt
        yield item


def test_interrupted_then_resumed_is_byte_identical(tmp_path):
    feats = _features(n=40, dim=6, seed=3)
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    convert_arrays(feats.items(), whole, "audio", max_len=15, progress=False, checkpoint_every=4)
    with pytest.raises(_Interrupt):
        convert_arrays(_interrupted(feats.items(), 17), parted, "audio", max_len=15, progress=False,
                       checkpoint_every=4)
    assert partial_ids(parted, "audio") == list(feats)[:17]
    info = convert_arrays(feats.items(), parted, "audio", max_len=15, progress=False, checkpoint_every=4)
    assert info["resumed_samples"] == 17
    assert _store_files(whole) == _store_files(parted)
    assert not (parted / "audio.bin.partial").exists() and not (parted / "audio.journal.jsonl").exists()


def test_resume_after_hard_kill_discards_unjournaled_bytes(tmp_path):
    """A kill -9 leaves bytes past the last checkpoint and a journal line cut short."""
    feats = _features(n=30, dim=5, seed=4)
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    convert_arrays(feats.items(), whole, "v", progress=False)
    with pytest.raises(_Interrupt):
        convert_arrays(_interrupted(feats.items(), 20), parted, "v", progress=False, checkpoint_every=3)
    journal = parted / "v.journal.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:10])  # lose 3 entries, cut one
    with open(parted / "v.bin.partial", "ab") as f:
        f.write(b"\x7f" * 1000)  # written but never journaled
    info = convert_arrays(feats.items(), parted, "v", progress=False)
    assert info["resumed_samples"] == 20 - 3
    assert _store_files(whole) == _store_files(parted)


def test_changed_parameters_restart_instead_of_resuming(tmp_path):
    feats = _features(n=10, seed=5)
    with pytest.raises(_Interrupt):
        convert_arrays(_interrupted(feats.items(), 5), tmp_path, "a", max_len=4, progress=False)
    info = convert_arrays(feats.items(), tmp_path, "a", max_len=8, progress=False)
    assert info["resumed_samples"] == 0
    store = open_store(tmp_path, "a")
    for sid, arr in feats.items():
        np.testing.assert_array_equal(store.get(sid), f16(arr[:8]))


def test_rerun_on_unchanged_source_is_skipped(tmp_path):
    src = _dump(_features(n=5), tmp_path / "f.pkl")
    first = convert_pickle(src, tmp_path / "s", "a", progress=False)
    before = _store_files(tmp_path / "s")
    again = convert_pickle(src, tmp_path / "s", "a", progress=False)
    assert again["skipped"] and again["bin_sha256"] == first["bin_sha256"]
    assert _store_files(tmp_path / "s") == before
    assert not convert_pickle(src, tmp_path / "s", "a", max_len=3, progress=False)["skipped"]
    _dump(_features(n=5, seed=9), src)  # new content
    redo = convert_pickle(src, tmp_path / "s", "a", max_len=3, progress=False)
    assert not redo["skipped"] and redo["source"]["sha256"] != first["source"]["sha256"]


def test_verify_store_detects_a_flipped_byte(tmp_path):
    convert_arrays(_features(n=8).items(), tmp_path, "a", progress=False)
    assert verify_store(tmp_path) == []
    binf = tmp_path / "a.bin"
    data = bytearray(binf.read_bytes())
    data[len(data) // 2] ^= 0x01
    binf.write_bytes(bytes(data))
    problems = verify_store(tmp_path)
    assert len(problems) == 1 and "sha256" in problems[0] and "a.bin" in problems[0]


def test_verify_store_reports_stale_source(tmp_path):
    src = _dump(_features(n=4), tmp_path / "f.pkl")
    convert_pickle(src, tmp_path / "s", "a", progress=False)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert any("changed since conversion" in p for p in verify_store(tmp_path / "s"))


def test_memmap_features_pickle_cheaply(tmp_path):
    feats = _features(n=6)
    convert_arrays(feats.items(), tmp_path, "a", progress=False)
    store = open_store(tmp_path, "a", max_len=5)
    store.get("S01_E01_3")  # opens the mapping
    blob = pickle.dumps(store)
    assert len(blob) < 4096 and store._mm is not None
    clone = pickle.loads(blob)
    assert clone._mm is None and clone.max_len == 5
    for sid, arr in feats.items():
        np.testing.assert_array_equal(clone.get(sid), f16(arr[:5]))


def test_dataloader_workers_read_the_store(tmp_path):
    feats = _features(n=10, seed=6)
    convert_arrays(feats.items(), tmp_path, "a", progress=False)
    store = open_store(tmp_path, "a")

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(store)

        def __getitem__(self, i):
            sid = store.ids()[i]
            return sid, store.get(sid)

    loader = torch.utils.data.DataLoader(DS(), batch_size=None, num_workers=2)
    got = dict(loader)
    assert got.keys() == feats.keys()
    for sid, arr in feats.items():  # each worker reads the right rows, in order, at float16 precision
        np.testing.assert_array_equal(np.asarray(got[sid]), f16(arr))


class _Evil:
    def __reduce__(self):
        return os.system, ("echo pwned > PWNED_MARKER",)


def test_malicious_pickle_is_refused_and_writes_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle.dumps({"a": np.zeros((2, 3), np.float32), "b": _Evil()}))
    with pytest.raises(safe_pickle.UnsafePickleError, match="system"):
        convert_pickle(src, tmp_path / "s", "a", progress=False)
    assert not (tmp_path / "PWNED_MARKER").exists()
    assert not (tmp_path / "s" / "a.bin").exists()
    manifest = tmp_path / "s" / "manifest.json"
    if manifest.exists():
        assert not json.loads(manifest.read_text())["modalities"].get("a", {}).get("complete")
    with pytest.raises(IncompleteStoreError):
        open_store(tmp_path / "s", "a")


def test_store_serves_what_the_in_memory_source_serves(tmp_path):
    """The FeatureSource contract, behaviourally: the same pickle through the store and through
    InMemoryFeatures gives the same ids, dims, frames (truncated alike) and true lengths."""
    from amess.data.features import InMemoryFeatures

    feats = _features(n=9, seed=11)
    src = _dump(feats, tmp_path / "f.pkl")
    convert_pickle(src, tmp_path / "s", "a", progress=False)
    store = open_store(tmp_path / "s", "a", max_len=7)
    mem = InMemoryFeatures(src, max_len=7)
    assert isinstance(store, MemmapFeatures) and store.dim == mem.dim == 8 and store.path.endswith("a.bin")
    assert sorted(store.ids()) == sorted(mem.ids()) and len(store) == len(mem) == 9
    assert "nope" not in store and "nope" not in mem
    for sid, arr in feats.items():
        assert sid in store and store.length(sid) == mem.length(sid) == len(arr)
        np.testing.assert_array_equal(store.get(sid), mem.get(sid))
        assert store.get(sid).shape == (min(len(arr), 7), 8)


def test_bad_names_and_dtypes(tmp_path):
    with pytest.raises(ValueError, match="modality name"):
        convert_arrays([], tmp_path, "../evil", progress=False)
    with pytest.raises(ValueError, match="float16 or float32"):
        convert_arrays([], tmp_path, "a", dtype="int8", progress=False)


def test_reads_stay_correct_across_page_releases(tmp_path):
    feats = _features(n=50, dim=64, seed=7, max_t=60)
    convert_arrays(feats.items(), tmp_path, "a", dtype="float32", progress=False)
    store = open_store(tmp_path, "a")
    for _ in range(2):  # > 16 reads: the mapping's pages are released and faulted back in
        for sid, arr in reversed(list(feats.items())):
            np.testing.assert_array_equal(store.get(sid), arr)
    if hasattr(__import__("mmap"), "MADV_DONTNEED"):
        assert store._release  # madvise worked on this platform


# --------------------------------------------------------------------------- integrity and repair

def _converted(tmp_path, n: int = 6, seed: int = 0):
    feats = _features(n=n, seed=seed)
    feats["S01_E01_0"] = np.ones((3, 8), np.float32)  # every sample with frames
    src = _dump(feats, tmp_path / "f.pkl")
    convert_pickle(src, tmp_path / "s", "a", progress=False)
    return feats, src, tmp_path / "s"


def _assert_serves(store_dir, feats):
    store = open_store(store_dir, "a")
    for sid, arr in feats.items():
        np.testing.assert_array_equal(store.get(sid), f16(arr))


def test_store_errors_are_data_errors():
    from amess.data import DataError
    from amess.data.store import StoreError

    assert issubclass(StoreError, DataError) and issubclass(IncompleteStoreError, DataError)
    assert issubclass(StoreError, RuntimeError)  # what callers caught before


def test_a_changed_byte_is_refused_on_read_naming_the_sample_and_convert_repairs(tmp_path):
    from amess.data.store import StoreError

    feats, src, store_dir = _converted(tmp_path)
    index = json.loads((store_dir / "a.index.json").read_text())
    k = index["ids"].index("S01_E01_3")
    data = bytearray((store_dir / "a.bin").read_bytes())
    data[index["offset"][k] * 8 * 2 + 5] ^= 0x40  # a byte inside sample S01_E01_3's rows
    (store_dir / "a.bin").write_bytes(bytes(data))
    store = open_store(store_dir, "a")  # sizes and index are intact: opening is cheap and passes
    np.testing.assert_array_equal(store.get("S01_E01_1"), f16(feats["S01_E01_1"]))
    with pytest.raises(StoreError, match=r"a.bin: sample S01_E01_3: its stored bytes changed since conversion "
                                         r"\(crc32 mismatch\).*amess data convert"):
        store.get("S01_E01_3")
    with pytest.raises(StoreError, match="S01_E01_3"):
        open_store(store_dir, "a", max_len=1).get("S01_E01_3")  # a shorter view checks all the rows
    problems = verify_store(store_dir)
    assert len(problems) == 1 and "sha256 differs" in problems[0] and "['S01_E01_3']" in problems[0]
    again = convert_pickle(src, store_dir, "a", progress=False)
    assert not again["skipped"]
    assert verify_store(store_dir) == []
    _assert_serves(store_dir, feats)


def test_swapped_ids_in_the_index_are_refused_and_convert_repairs(tmp_path):
    from amess.data.store import StoreError

    feats, src, store_dir = _converted(tmp_path)
    path = store_dir / "a.index.json"
    index = json.loads(path.read_text())
    index["ids"][1], index["ids"][2] = index["ids"][2], index["ids"][1]
    path.write_text(json.dumps(index, separators=(",", ":")) + "\n")
    with pytest.raises(StoreError, match=r"a.index.json: the index changed since conversion"):
        open_store(store_dir, "a")
    assert any("a.index.json changed since conversion" in p for p in verify_store(store_dir))
    assert not convert_pickle(src, store_dir, "a", progress=False)["skipped"]
    _assert_serves(store_dir, feats)


def test_inconsistent_index_is_refused_even_with_a_matching_hash(tmp_path):
    """An index whose hash was updated too (e.g. written by a buggy tool) is still checked."""
    import hashlib

    from amess.data.store import StoreError

    _, _, store_dir = _converted(tmp_path)
    path = store_dir / "a.index.json"
    index = json.loads(path.read_text())
    index["ids"][1] = index["ids"][0]
    text = json.dumps(index, separators=(",", ":")) + "\n"
    path.write_text(text)
    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["modalities"]["a"]["index_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="duplicate ids"):
        open_store(store_dir, "a")


def test_a_changed_source_makes_the_store_stale_until_converted_again(tmp_path):
    from amess.data.store import StoreError

    feats, src, store_dir = _converted(tmp_path)
    feats["S01_E01_2"] = np.full((4, 8), 2.0, np.float32)
    _dump(feats, src)
    with pytest.raises(StoreError, match=r"a: its source .*f.pkl changed since conversion .*may hold old features"):
        open_store(store_dir, "a")
    assert any("stale" in p for p in verify_store(store_dir))
    assert not convert_pickle(src, store_dir, "a", progress=False)["skipped"]
    _assert_serves(store_dir, feats)


def test_a_touched_source_is_rechecked_not_reconverted(tmp_path):
    from amess.data.store import StoreError

    feats, src, store_dir = _converted(tmp_path)
    before = (store_dir / "a.bin").stat().st_mtime_ns
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StoreError, match="modified again; same size"):
        open_store(store_dir, "a")
    again = convert_pickle(src, store_dir, "a", progress=False)
    assert again["skipped"] and again["source"]["mtime_ns"] == st.st_mtime_ns + 10**9
    assert (store_dir / "a.bin").stat().st_mtime_ns == before  # not rewritten
    _assert_serves(store_dir, feats)


def test_a_store_of_an_older_version_is_rebuilt(tmp_path):
    from amess.data.store import StoreError

    feats, src, store_dir = _converted(tmp_path)
    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["version"] = 1
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="store version 1 is not supported"):
        open_store(store_dir, "a")
    assert not convert_pickle(src, store_dir, "a", progress=False)["skipped"]
    _assert_serves(store_dir, feats)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"name": "not ours"}')
    with pytest.raises(StoreError, match="not an amess feature store's is in the way"):
        convert_pickle(src, tmp_path / "other", "a", progress=False)


def test_cli_convert_repairs_instead_of_skipping(tmp_path, capsys):
    from amess.cli import main
    from test_data import write_mintrec

    write_mintrec(tmp_path / "d")
    args = ["data", "convert", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "st"), "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    binf = tmp_path / "st" / "audio.bin"
    data = bytearray(binf.read_bytes())
    data[-3] ^= 0xFF
    binf.write_bytes(bytes(data))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "audio: " in out and "(written)" in out.split("audio: ")[1].splitlines()[0]
    assert "video: " in out and "(up to date, skipped)" in out.split("video: ")[1].splitlines()[0]
    assert "problem" not in out


def test_auto_store_reconverts_a_changed_index(tmp_path, caplog):
    from amess.config import DataConfig
    from amess.data import get_reader
    from test_data import write_mintrec

    write_mintrec(tmp_path)
    cfg = DataConfig(data_dir=str(tmp_path), feature_store="auto")
    first = get_reader(cfg).load(["train"])["train"]
    want = {s.id: first.audio.get(s.id) for s in first.samples}
    path = tmp_path / "amess_feature_store" / "audio.index.json"
    index = json.loads(path.read_text())
    index["ids"][0], index["ids"][1] = index["ids"][1], index["ids"][0]
    path.write_text(json.dumps(index, separators=(",", ":")) + "\n")
    again = get_reader(cfg).load(["train"])["train"]
    assert "audio.index.json changed since conversion; converting it again" in caplog.text
    for sid, arr in want.items():
        np.testing.assert_array_equal(again.audio.get(sid), arr)
