"""Clip descriptions as a non-verbal stream: a video LLM's words about each clip, embedded
by a frozen text encoder into a feature pickle that the readers take as the video stream.

The input is a folder of `{train,dev,test}.tsv` files (any of them), one row per sample:
the first columns name the sample (`Dialogue_id Utterance_id` -> `dia{D}_utt{U}`, MIntRec2.0;
`season episode clip` -> `S_E_C`, MIntRec; or a single `id`), every further column is one
text field. MIntRec2.0's `video_descriptions/` (written by VideoLLaMA2-7B-16F, see
`shared/data/mintrec2/SOURCE.md`) has three: `Speakers Actions`, `Emotions and Facial
Expressions`, `Interaction with Others`.

Granularity, for a sample with F fields (`d` = the encoder's hidden size):

- `field`: one vector per field, the mean of its last hidden states over the real tokens
  ([CLS] and [SEP] included, as sentence-transformers pools): `(F, d)`.
- `sentence`: each field split into sentences (after `.`, `!` or `?` and a space), one
  mean-pooled vector per sentence, fields in order: `(S, d)`.
- `token`: the last hidden states of each field's word pieces ([CLS], [SEP] and padding
  left out), fields concatenated in time: `(N, d)`.

The output is the official pickle layout, a dict sample id -> `(T, d)` float32 numpy array,
written with plain `pickle.dump` (so the official loaders and `amess.data.safe_pickle` both
read it) through a temporary file and `os.replace`, with provenance in `OUT.json`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import logging
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from amess.data.base import DataError

log = logging.getLogger(__name__)

GRANULARITIES = ("field", "sentence", "token")
DEFAULT_GRANULARITY = "field"
"""Measured on MIntRec2.0 train+dev (README, "Clip descriptions as a non-verbal stream"): the
smallest file (34 MB against 69 MB per sentence and 1.1 GB per token), the least encoder time,
and beside the text in a linear probe the finer granularities did no better."""
DEFAULT_MAX_LEN = 128
"""Max tokens of one encoded text (a field, or a sentence), special tokens included. The
longest MIntRec2.0 description field is 82 MiniLM tokens."""
DEFAULT_BATCH_SIZE = 64
SPLITS = ("train", "dev", "test")
PICKLE_PROTOCOL = 4  # the official loaders run on Python 3.8, whose highest protocol is 5; 4 needs no buffers

# the columns that name a sample, and how they become its id (docs/datasets.md)
ID_LAYOUTS: tuple[tuple[tuple[str, ...], Callable[[list[str]], str]], ...] = (
    (("dialogue_id", "utterance_id"), lambda v: f"dia{v[0]}_utt{v[1]}"),
    (("season", "episode", "clip"), lambda v: "_".join(v)),
    (("id",), lambda v: v[0]),
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class DescriptionRow:
    """One sample's description: its id, its text fields (header order) and its line."""

    id: str
    fields: tuple[str, ...]
    line: int


@dataclass
class DescriptionFile:
    """One parsed description TSV."""

    path: Path
    id_columns: list[str]
    field_names: list[str]
    rows: list[DescriptionRow]


def read_description_tsv(path: str | Path) -> DescriptionFile:
    """Parse a description TSV: id columns, then text fields. Accepts CRLF line endings and a
    UTF-8 byte-order mark; blank lines are skipped. Errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = [h.strip() for h in next(reader, [])]
            if not any(header):
                raise DataError(f"{path}: empty file (expected a header: id columns, then text fields)")
            id_cols, make_id = _id_layout(path, header)
            names = header[len(id_cols):]
            rows: list[DescriptionRow] = []
            seen: dict[str, int] = {}
            for raw in reader:
                line = reader.line_num
                if not raw or all(not c.strip() for c in raw):
                    continue
                if len(raw) != len(header):
                    raise DataError(f"{path}: line {line}: expected {len(header)} tab-separated fields "
                                    f"({' | '.join(header)}), got {len(raw)}")
                parts = [c.strip() for c in raw[:len(id_cols)]]
                if not all(parts):
                    raise DataError(f"{path}: line {line}: empty id column(s) {id_cols}")
                sid = make_id(parts)
                if sid in seen:
                    raise DataError(f"{path}: line {line}: sample {sid} already described on line {seen[sid]}")
                seen[sid] = line
                rows.append(DescriptionRow(sid, tuple(c.strip() for c in raw[len(id_cols):]), line))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    return DescriptionFile(path, id_cols, names, rows)


def _id_layout(path: Path, header: list[str]) -> tuple[list[str], Callable[[list[str]], str]]:
    low = [h.lower() for h in header]
    for cols, make_id in ID_LAYOUTS:
        if tuple(low[:len(cols)]) == cols:
            if len(header) == len(cols):
                raise DataError(f"{path}: header {header} has id column(s) but no text field after them")
            return header[:len(cols)], make_id
    raise DataError(f"{path}: header {header}: expected the id column(s) first, one of "
                    f"{[' '.join(c) for c, _ in ID_LAYOUTS]} (any case), then the text fields")


def read_description_folder(folder: str | Path) -> list[DescriptionFile]:
    """The `{train,dev,test}.tsv` present in `folder`; ids must be unique across them and
    every file must have the same text fields."""
    folder = Path(folder)
    paths = [folder / f"{s}.tsv" for s in SPLITS if (folder / f"{s}.tsv").is_file()]
    if not paths:
        raise DataError(f"{folder}: no description file (expected one or more of "
                        f"{[s + '.tsv' for s in SPLITS]})")
    files = [read_description_tsv(p) for p in paths]
    where: dict[str, Path] = {}
    for f in files:
        if f.field_names != files[0].field_names:
            raise DataError(f"{f.path}: text fields {f.field_names} differ from {files[0].path}'s "
                            f"{files[0].field_names}")
        for r in f.rows:
            if r.id in where:
                raise DataError(f"{f.path}: line {r.line}: sample {r.id} is also described in {where[r.id]}")
            where[r.id] = f.path
    return files


def split_sentences(text: str) -> list[str]:
    """Sentences of one field: split after `.`, `!` or `?` followed by white space."""
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text.strip())) if s]


def _units(fields: tuple[str, ...], granularity: str) -> list[str]:
    """The texts encoded for one sample: its fields, or their sentences."""
    if granularity == "sentence":
        return [s for f in fields for s in split_sentences(f)]
    return list(fields)


def embed_rows(rows: Iterable[DescriptionRow], encoder, *, granularity: str = DEFAULT_GRANULARITY,
               max_len: int = DEFAULT_MAX_LEN, batch_size: int = DEFAULT_BATCH_SIZE, chunk_size: int = 1024,
               device: str = "cpu", progress: bool = True, stats: dict | None = None
               ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (sample id, `(T, d)` float32 array) per row, in order.

    `encoder` is a frozen `amess.models.encoders.TextEncoder`. Rows are taken `chunk_size`
    at a time; inside a chunk the texts are sorted by length and encoded `batch_size` at a
    time (little padding), so memory holds one chunk's outputs, never the whole set.
    `stats`, if given, receives counts: texts encoded, texts truncated to `max_len`.
    """
    import torch
    from tqdm import tqdm

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 (room for [CLS], one token and [SEP]), got {max_len}")
    rows = list(rows)
    tok = encoder.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    encoder.eval().to(device)
    counts = stats if stats is not None else {}
    counts.setdefault("texts", 0)
    counts.setdefault("truncated", 0)
    bar = tqdm(total=len(rows), desc=f"embedding descriptions ({granularity})", unit="clip", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start:start + chunk_size]
            owner: list[int] = []  # text k belongs to chunk[owner[k]]
            texts: list[str] = []
            for i, r in enumerate(chunk):
                for t in _units(r.fields, granularity):
                    owner.append(i)
                    texts.append(t)
            enc = tok(texts, truncation=True, max_length=max_len, return_special_tokens_mask=True) if texts else {
                "input_ids": [], "special_tokens_mask": []}
            full = tok(texts, truncation=False)["input_ids"] if texts else []
            counts["texts"] += len(texts)
            counts["truncated"] += sum(len(a) > len(b) for a, b in zip(full, enc["input_ids"]))
            out: list[np.ndarray | None] = [None] * len(texts)
            order = sorted(range(len(texts)), key=lambda k: len(enc["input_ids"][k]))
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                n = max(len(enc["input_ids"][k]) for k in idx)
                ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), n), dtype=torch.long)
                for j, k in enumerate(idx):
                    seq = enc["input_ids"][k]
                    ids[j, :len(seq)] = torch.tensor(seq)
                    mask[j, :len(seq)] = 1
                hidden = encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).float()  # (b, n, d)
                if granularity == "token":
                    for j, k in enumerate(idx):
                        real = [p for p, s in enumerate(enc["special_tokens_mask"][k]) if not s]
                        out[k] = hidden[j, real].cpu().numpy()  # (tokens, d)
                else:
                    pooled = encoder.pool(hidden, mask.to(device), "mean")  # (b, d)
                    for j, k in enumerate(idx):
                        out[k] = pooled[j:j + 1].cpu().numpy()  # (1, d)
            d = encoder.hidden_size
            per_sample: list[list[np.ndarray]] = [[] for _ in chunk]
            for k, i in enumerate(owner):
                per_sample[i].append(out[k])
            for r, parts in zip(chunk, per_sample):
                arr = np.concatenate(parts, 0) if parts else np.zeros((0, d), np.float32)
                yield r.id, np.ascontiguousarray(arr, dtype=np.float32)
            bar.update(len(chunk))
    bar.close()


def atomic_write(path: Path, write: Callable[[object], None], *, binary: bool = True) -> None:
    """Call `write(file)` on a temporary file beside `path` (flushed to disk), then move it into
    place (`training.artifacts.atomic_path`): readers see the old file or the complete new one."""
    from amess.training.artifacts import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb" if binary else "w",
                                        **({} if binary else {"encoding": "utf-8"})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def provenance_path(out: str | Path) -> Path:
    """Where the provenance of feature file `out` is written: `OUT.json` (e.g. `desc_feats.pkl.json`)."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _versions(encoder_name: str) -> dict[str, str]:
    from importlib import metadata

    from amess import __version__
    from amess.models.encoders import PACKAGED

    out = {"amess": __version__}
    dists = ["torch", "transformers", "numpy"]
    if encoder_name in PACKAGED:
        dists.append(PACKAGED[encoder_name].replace("_", "-"))
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def embed_description_folder(descriptions: str | Path, out: str | Path, *, text_encoder: str | None = None,
                             granularity: str = DEFAULT_GRANULARITY, max_len: int = DEFAULT_MAX_LEN,
                             batch_size: int = DEFAULT_BATCH_SIZE, device: str = "auto", progress: bool = True,
                             command: str | None = None, encoder=None) -> dict:
    """`amess data embed-descriptions`: every description TSV in `descriptions` into the
    feature pickle `out` (dict id -> `(T, d)` float32), with provenance in `OUT.json`.

    `text_encoder`: a Hugging Face name, a local folder or `packaged:minilm` (the default),
    loaded through `amess.models.encoders.load_text_encoder` and kept frozen; or pass a
    loaded `encoder` directly. `device="auto"` uses CUDA when available. Returns the
    provenance written.

    Memory: encoding is chunked (`embed_rows`), but the official format is one dict, so the
    finished arrays are held until it is written: about the output file's size (34 MB per
    field for MIntRec2.0 train+dev, 1.1 GB per token), plus the encoder.
    """
    import torch

    from amess.models.encoders import DEFAULT_TEXT_ENCODER, load_text_encoder

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    out = Path(out)
    files = read_description_folder(descriptions)
    name = text_encoder or (encoder.name if encoder is not None else DEFAULT_TEXT_ENCODER)
    if encoder is None:
        encoder = load_text_encoder(name)
    for p in encoder.parameters():
        p.requires_grad_(False)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [r for f in files for r in f.rows]
    log.info("embedding %d clip descriptions (%s) from %s with %s on %s", len(rows), granularity,
             [str(f.path) for f in files], name, device)
    t0 = time.perf_counter()
    stats: dict = {}
    feats = dict(embed_rows(rows, encoder, granularity=granularity, max_len=max_len, batch_size=batch_size,
                            device=device, progress=progress, stats=stats))
    seconds = time.perf_counter() - t0
    atomic_write(out, lambda f: pickle.dump(feats, f, protocol=PICKLE_PROTOCOL))
    lengths = np.array([a.shape[0] for a in feats.values()])
    prov = {
        "what": "clip descriptions (text written by a video LLM about each clip) embedded by a frozen text "
                "encoder; dict sample id -> (T, d) float32 numpy array",
        "command": command if command is not None else " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(name),
        "encoder": name,
        "hidden_size": encoder.hidden_size,
        "granularity": granularity,
        "pooling": {"field": "mean of the last hidden states over real tokens ([CLS]/[SEP] included), per field",
                    "sentence": "mean of the last hidden states over real tokens ([CLS]/[SEP] included), "
                                "per sentence (split after . ! ? and a space)",
                    "token": "last hidden states of each field's tokens ([CLS], [SEP], padding left out), "
                             "fields concatenated"}[granularity],
        "max_len": max_len,
        "batch_size": batch_size,
        "device": device,
        "fields": files[0].field_names,
        "sources": [{"file": str(f.path), "sha256": _sha256(f.path), "rows": len(f.rows),
                     "id_columns": f.id_columns} for f in files],
        "samples": len(feats),
        "frames": {"min": int(lengths.min()) if len(lengths) else 0,
                   "median": float(np.median(lengths)) if len(lengths) else 0.0,
                   "max": int(lengths.max()) if len(lengths) else 0,
                   "total": int(lengths.sum())},
        "texts_encoded": stats["texts"],
        "texts_truncated": stats["truncated"],
        "empty_samples": int((lengths == 0).sum()),
        "seconds": round(seconds, 1),
        "output": {"file": out.name, "bytes": out.stat().st_size, "sha256": _sha256(out)},
    }
    text = json.dumps(prov, indent=2, ensure_ascii=False) + "\n"
    atomic_write(provenance_path(out), lambda f: f.write(text), binary=False)
    log.info("wrote %s (%d samples, %.1f MiB, %.0f s) and %s", out, len(feats), out.stat().st_size / 2**20,
             seconds, provenance_path(out).name)
    return prov
