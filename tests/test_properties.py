"""Property-based tests (hypothesis) of what reads untrusted files: the TSV readers, the
restricted unpickler (its C and its compact Python path) and the feature store.

Random bytes and random variations of well-formed files either load correctly (round-trip
equality) or raise the project's own error type (`DataError`, or `UnsafePickleError` for
pickles): never another exception, never silently wrong data. Examples are few and
small, so the file runs in seconds.
"""

from __future__ import annotations

import io
import json
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amess.config import DataConfig
from amess.data import DataError, get_reader
from amess.data.safe_pickle import UnsafePickleError, safe_load, to_numpy
from amess.data.store import convert_arrays, open_store

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LABELS = ["book", "cancel"]
POSITION = st.integers(0, 1 << 20)  # a byte position, taken modulo the file's length
HEADER = "id\ttext\tlabel"


def _custom_dir(d: Path, train: bytes) -> DataConfig:
    (d / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (d / "train.tsv").write_bytes(train)
    return DataConfig(dataset="custom", data_dir=str(d), modalities=["text"], dev_split="train:0.1")


# --------------------------------------------------------------------------- TSV readers

# a field: any text without tab, newline or carriage return (the TSV's own separators)
FIELD = st.text(st.characters(blacklist_characters="\t\n\r", blacklist_categories=("Cs",)), max_size=12)


@st.composite
def tsv_files(draw) -> tuple[bytes, list[tuple[str, str, int]]]:
    """A well-formed custom-dataset train.tsv in a random variation, and the samples it holds."""
    ids = draw(st.lists(FIELD.map(str.strip).filter(bool), min_size=1, max_size=6, unique=True))
    rows = [(i, draw(FIELD), draw(st.sampled_from(LABELS))) for i in ids]
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    lines = [HEADER] + ["\t".join(r) for r in rows]
    blank = draw(st.sampled_from(["", eol, eol + "  " + eol]))  # trailing blank lines are skipped
    text = eol.join(lines) + draw(st.sampled_from(["", eol])) + blank
    bom = draw(st.booleans())
    want = [(i, t.strip(), LABELS.index(lab)) for i, t, lab in rows]
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"), want


@FAST
@given(tsv_files())
def test_well_formed_tsv_round_trips(case):
    data, want = case
    with tempfile.TemporaryDirectory() as d:
        reader = get_reader(_custom_dir(Path(d), data))
        got = reader.read_rows("train")
        assert [(s.id, s.text, s.label) for s in got] == want
        assert [s.line for s in got] == list(range(2, 2 + len(want)))
        assert [s.id for s in reader.load(["train"])["train"].samples] == [w[0] for w in want]


@st.composite
def damaged_tsvs(draw) -> bytes:
    """Random bytes, alone or after a valid header, or a well-formed file with bytes changed."""
    kind = draw(st.sampled_from(["bytes", "after_header", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "after_header":
        return HEADER.encode() + b"\n" + draw(st.binary(max_size=300))
    data = bytearray(draw(tsv_files())[0])
    for _ in range(draw(st.integers(1, 4))):
        data[draw(POSITION) % len(data)] = draw(st.integers(0, 255))
    return bytes(data)


@FAST
@given(damaged_tsvs(), st.sampled_from(["custom", "mintrec", "mintrec2"]))
def test_damaged_tsv_loads_or_raises_data_error(data, dataset):
    with tempfile.TemporaryDirectory() as d:
        cfg = _custom_dir(Path(d), data)
        if dataset != "custom":
            cfg = DataConfig(dataset=dataset, data_dir=d, modalities=["text"], context=dataset == "mintrec2",
                             dev_split="train:0.1")
        try:
            reader = get_reader(cfg)
            samples = reader.load(["train"])["train"].samples
        except DataError:
            return
        assert samples and len({s.id for s in samples}) == len(samples)  # what loads is usable
        assert all(0 <= s.label <= len(reader.label_names) for s in samples)
        problems: list[str] = []
        assert [s.id for s in reader.read_rows("train", problems=problems)] == [s.id for s in samples]
        assert problems == []


# --------------------------------------------------------------------------- restricted unpickler

def _load_both(path: Path):
    """Both unpicklers: the C one (full precision) and the compact Python one (float16)."""
    return safe_load(path), safe_load(path, compact_dtype=np.float16)


FLOAT_DTYPES = st.sampled_from([np.float16, np.float32, np.float64])
FEATURE = st.one_of(
    hnp.arrays(FLOAT_DTYPES, st.tuples(st.integers(0, 4), st.integers(1, 5)),
               elements=st.floats(-1e4, 1e4, width=16)),
    hnp.arrays(np.int64, st.tuples(st.integers(0, 3), st.integers(1, 4)), elements=st.integers(-100, 100)),
    st.lists(hnp.arrays(np.float32, st.just((1, 3)), elements=st.floats(-10, 10, width=32)), max_size=3),
    hnp.arrays(np.float32, st.tuples(st.integers(0, 3), st.integers(1, 4)),
               elements=st.floats(-10, 10, width=32)).map(torch.from_numpy),
)
FEATURE_DICTS = st.dictionaries(FIELD, FEATURE, max_size=4)


def _as_float32(value) -> np.ndarray:
    return to_numpy(value, path="p", sample_id="s")


@FAST
@given(FEATURE_DICTS, st.integers(2, 5))
def test_feature_pickles_round_trip_through_both_unpicklers(obj, protocol):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        full, small = _load_both(path)
    assert list(full) == list(small) == list(obj)
    for k, v in obj.items():
        want = _as_float32(v)
        np.testing.assert_array_equal(_as_float32(full[k]), want)
        np.testing.assert_array_equal(_as_float32(small[k]).astype(np.float16), want.astype(np.float16))


@st.composite
def damaged_pickles(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "mutated", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    # positions are drawn independently of the length: a pickled tensor's size varies between runs
    # (torch.save records a serialization id), and hypothesis needs the same draws each time
    data = bytearray(pickle.dumps(draw(FEATURE_DICTS), protocol=draw(st.integers(2, 5))))
    if kind == "truncated":
        return bytes(data[: draw(POSITION) % len(data)])
    for _ in range(draw(st.integers(1, 3))):
        data[draw(POSITION) % len(data)] = draw(st.integers(0, 255))
    return bytes(data)


@FAST
@given(damaged_pickles())
def test_damaged_pickles_load_or_raise_unsafe_pickle_error(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.pkl"
        path.write_bytes(data)
        for compact in (None, np.float16):
            try:
                obj = safe_load(path, compact_dtype=compact)
            except UnsafePickleError as e:
                assert str(path) in str(e)
                continue
            if isinstance(obj, dict):  # what loads goes through to_numpy: a feature, or a DataError
                for k, v in obj.items():
                    try:
                        arr = to_numpy(v, path=path, sample_id=str(k), store_dtype=np.float16)
                    except DataError:
                        continue
                    assert arr.dtype == np.float32 and arr.ndim == 2 and np.isfinite(arr).all()


# --------------------------------------------------------------------------- feature store

@st.composite
def feature_sets(draw) -> dict[str, np.ndarray]:
    dim = draw(st.integers(1, 6))
    n = draw(st.integers(1, 6))
    return {f"id{k}": draw(hnp.arrays(np.float32, st.tuples(st.integers(0, 5), st.just(dim)),
                                      elements=st.floats(-6e4, 6e4, width=32)))
            for k in range(n)}


def _expected(arr: np.ndarray, dtype: str, max_len: int | None) -> np.ndarray:
    kept = arr[:max_len] if max_len is not None else arr
    return kept.astype(np.float16).astype(np.float32) if dtype == "float16" else kept


@FAST
@given(feature_sets(), st.sampled_from(["float16", "float32"]), st.one_of(st.none(), st.integers(1, 4)))
def test_store_round_trips(feats, dtype, max_len):
    with tempfile.TemporaryDirectory() as d:
        convert_arrays(feats.items(), d, "a", dtype=dtype, max_len=max_len, progress=False)
        store = open_store(d, "a")
        assert store.ids() == list(feats)
        dims = {arr.shape[1] for arr in feats.values() if len(arr)}
        assert store.dim == (dims.pop() if dims else 0)  # known from a sample with frames
        for sid, arr in feats.items():
            want = _expected(arr, dtype, max_len) if len(arr) else np.zeros((0, store.dim), np.float32)
            np.testing.assert_array_equal(store.get(sid), want)
            assert store.length(sid) == len(arr)


@FAST
@given(feature_sets(), st.sampled_from(["manifest.json", "a.index.json", "a.bin"]), st.data())
def test_damaged_store_serves_the_right_data_or_raises_data_error(feats, name, data):
    with tempfile.TemporaryDirectory() as d:
        convert_arrays(feats.items(), d, "a", dtype="float16", progress=False)
        path = Path(d) / name
        raw = bytearray(path.read_bytes())
        if not raw:
            return  # a .bin of samples without frames
        how = data.draw(st.sampled_from(["flip", "truncate", "append"]))
        if how == "flip":
            raw[data.draw(POSITION) % len(raw)] ^= data.draw(st.integers(1, 255))
        elif how == "truncate":
            raw = raw[: data.draw(POSITION) % len(raw)]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=8))
        path.write_bytes(bytes(raw))
        try:
            store = open_store(d, "a")
            got = {sid: store.get(sid) for sid in feats}
        except DataError:
            return
    for sid, arr in feats.items():  # not refused: then exactly the converted data
        assert got[sid].shape[0] == len(arr)
        if len(arr):
            np.testing.assert_array_equal(got[sid], _expected(arr, "float16", None))


@pytest.mark.parametrize("payload", [b"", b"\x80\x05", json.dumps({"a": 1}).encode(), io.BytesIO(b"x").read()])
def test_store_files_replaced_by_junk_are_refused(tmp_path, payload):
    convert_arrays({"x": np.ones((2, 3), np.float32)}.items(), tmp_path, "a", progress=False)
    for name in ("manifest.json", "a.index.json", "a.bin"):
        good = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(DataError):
            open_store(tmp_path, "a").get("x")
        (tmp_path / name).write_bytes(good)
    np.testing.assert_array_equal(open_store(tmp_path, "a").get("x"), np.ones((2, 3), np.float32))
