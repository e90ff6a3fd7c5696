"""`amess extract`: a folder of clips -> a dataset folder in the custom reader's layout.

    DATA_DIR/
      train.tsv [dev.tsv test.tsv]   id<TAB>text<TAB>label (id: the clip's file name without extension)
      labels.txt                     the intents, one per line (when --labels gives them)
      audio.pkl video.pkl            dict id -> (frames, dim) float32, the official pickle layout
      extraction.json                every extractor: name, settings, weights, package versions
      .amess_extract/                one finished clip per file (the resume cache)

Clips are processed one at a time: each is decoded, passed through every extractor, and its
features are written to its own file in the cache before the next one starts, so memory
does not grow with the number of clips and an interrupted run resumes where it stopped (a
clip whose file changed is extracted again). Only at the end are the pickles assembled,
streamed from the cache one clip at a time (`write_feature_pickle`), and the TSVs,
`labels.txt` and `extraction.json` written, each atomically.
"""

from __future__ import annotations

import csv
import json
import logging
import pickle
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from amess.data.base import DataError
from amess.extract.media import Clip, MediaError, find_clips, load_clip
from amess.extract.registry import Extractor, ExtractorError, identity

log = logging.getLogger(__name__)

EXTRACTION_FILE = "extraction.json"
CACHE_DIR = ".amess_extract"
FEATURE_FILES = {"video": "video.pkl", "audio": "audio.pkl"}
EXTRACTION_FORMAT = 1
SPLITS = ("train", "dev", "test")
OOS_LABEL = "UNK"


@dataclass
class ClipFeatures:
    """What the extractors made of one clip."""

    id: str
    text: str
    features: dict[str, np.ndarray]
    """modality -> (frames, dim) float32"""
    duration: float
    seconds: dict[str, float] = field(default_factory=dict)
    """modality -> compute time spent on this clip"""


def extract_clip(path: Path, extractors: dict[str, Extractor], *, text: str | None = None,
                 max_seconds: float = 120.0, clip_id: str | None = None) -> ClipFeatures:
    """Decode one clip and run every extractor on it (`text` given: no ASR)."""
    t0 = time.perf_counter()
    clip = load_clip(path, clip_id=clip_id, max_seconds=max_seconds)
    seconds = {"decode": time.perf_counter() - t0}
    feats: dict[str, np.ndarray] = {}
    for modality in ("audio", "video"):
        if modality in extractors:
            t0 = time.perf_counter()
            feats[modality] = _checked(extractors[modality].extract(clip), extractors[modality], clip)
            seconds[modality] = time.perf_counter() - t0
    if text is None:
        if "text" not in extractors:
            raise DataError(f"{path}: no transcript given and no ASR extractor")
        t0 = time.perf_counter()
        text = str(extractors["text"].extract(clip))
        seconds["text"] = time.perf_counter() - t0
    return ClipFeatures(id=clip.id, text=clean_text(text), features=feats, duration=clip.duration, seconds=seconds)


def _checked(arr: Any, ext: Extractor, clip: Clip) -> np.ndarray:
    a = np.asarray(arr, np.float32)
    if a.ndim != 2 or a.shape[1] != ext.dim:
        raise ExtractorError(f"{clip.path}: {ext.modality} extractor {ext.name} returned shape {a.shape}, "
                             f"expected (frames, {ext.dim})")
    if not np.isfinite(a).all():
        raise ExtractorError(f"{clip.path}: {ext.modality} extractor {ext.name} returned NaN or inf values")
    return a


def clean_text(text: str) -> str:
    """One line of text without tabs (the TSV's field separator)."""
    return " ".join(text.split())


class _Stream:
    def __init__(self, items: Iterable[tuple[str, np.ndarray]]):
        self.items = iter(items)


class _StreamingPickler(pickle.Pickler):
    """Pickles a `_Stream` as a plain dict whose items are produced one at a time."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is _Stream:
            return dict, (), None, None, obj.items  # dict() then its items, batch by batch
        return NotImplemented


def write_feature_pickle(path: Path, items: Iterable[tuple[str, np.ndarray]]) -> int:
    """Write a feature pickle (a dict id -> array, readable by plain `pickle.load` and the
    restricted unpickler) without holding more than one item in memory: the dict is written
    as `dict()` plus its items, and the pickler's memo is off (fast mode) so it keeps no
    reference to what it wrote. Returns the number of items."""
    from amess.training.artifacts import atomic_path

    count = [0]

    def counted() -> Iterator[tuple[str, np.ndarray]]:
        for k, v in items:
            count[0] += 1
            yield k, v

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        p = _StreamingPickler(f, protocol=4)
        p.fast = True  # no memo: nothing shared between items, and nothing kept alive
        p.dump(_Stream(counted()))
    return count[0]


def read_id_tsv(path: Path, columns: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, dict[str, str]]:
    """id -> {column: value} from a TSV whose header has `id` and `columns` (and maybe `optional`)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    want = ("id", *columns)
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if any(c not in header for c in want):
        raise DataError(f"{path}: line 1: expected a header with the columns {list(want)} (tab-separated), "
                        f"got {rows[0] if rows else 'an empty file'}")
    idx = {c: header.index(c) for c in (*want, *optional) if c in header}
    out: dict[str, dict[str, str]] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(want) or any(idx[c] >= len(row) for c in want):
            raise DataError(f"{path}: line {n}: {len(row)} fields, expected the columns {list(want)}")
        sid = row[idx["id"]].strip()
        if sid in out:
            raise DataError(f"{path}: line {n}: id {sid!r} appears twice")
        out[sid] = {c: row[i].strip() for c, i in idx.items() if c != "id" and i < len(row)}
    return out


def _source(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_file(cache: Path, clip_id: str) -> Path:
    return cache / f"{clip_id}.npz"


def _save_shard(path: Path, cf: ClipFeatures, source: dict[str, Any]) -> None:
    from amess.training.artifacts import atomic_path

    meta = {"id": cf.id, "text": cf.text, "duration": cf.duration, "seconds": cf.seconds, "source": source}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **cf.features)


def _load_shard(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return meta, {k: z[k] for k in z.files if k != "meta"}
    except (OSError, ValueError, KeyError, EOFError):
        return None


@dataclass
class ExtractSummary:
    out: Path
    clips: int
    extracted: int
    cached: int
    skipped: list[str]
    splits: dict[str, int]
    no_face: int
    media_seconds: float
    seconds: dict[str, float]
    """extractor (or decode) -> compute seconds over the clips extracted in this run"""

    def speed(self) -> dict[str, float]:
        """seconds of media per second of compute, per extractor (this run's clips)."""
        media = self.media_seconds
        return {k: media / v for k, v in self.seconds.items() if v > 0}


def extract_dataset(sources: list[str | Path], out: str | Path, *, extractors: dict[str, Extractor],
                    transcripts: str | Path | None = None, labels: str | Path | None = None,
                    split: str = "train", max_seconds: float = 120.0, progress: bool = True,
                    skip_errors: bool = False, overwrite: bool = False) -> ExtractSummary:
    """Extract every clip of `sources` into the dataset folder `out` (see the module docstring).

    `extractors`: modality -> extractor for `audio`, `video` and, without `transcripts`,
    `text` (ASR). `labels`: a TSV `id<TAB>label[<TAB>split]`; rows without a split go to `split`.
    """
    from tqdm.auto import tqdm

    from amess import __version__
    from amess.training.artifacts import write_json, write_text

    out = Path(out)
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {list(SPLITS)}")
    clips = find_clips(list(sources))
    ids = [c.stem for c in clips]
    texts = labels_of = None
    if transcripts is not None:
        texts = {k: v["text"] for k, v in read_id_tsv(Path(transcripts), ("text",)).items()}
        _require_all(Path(transcripts), ids, texts, "a transcript")
    elif "text" not in extractors:
        raise DataError("amess extract: give --transcripts TSV (columns id, text) or --asr")
    if labels is not None:
        labels_of = read_id_tsv(Path(labels), ("label",), ("split",))
        _require_all(Path(labels), ids, labels_of, "a label")
        for sid, row in labels_of.items():
            if (row.get("split") or split) not in SPLITS:
                raise DataError(f"{labels}: id {sid}: split {row['split']!r}, expected one of {list(SPLITS)}")
    extractors = {m: e for m, e in extractors.items() if not (m == "text" and texts is not None)}
    record: dict[str, Any] = {
        "format": EXTRACTION_FORMAT, "tool": "amess extract", "amess_version": __version__,
        "media": {"sample_rate": 16000, "max_seconds": max_seconds},
        "extractors": {m: e.describe() for m, e in extractors.items()},
    }
    if texts is not None:
        record["extractors"]["text"] = {"modality": "text", "name": "tsv", "file": Path(transcripts).name}
    cache = _prepare(out, record, overwrite)

    todo, cached = [], 0
    for path in clips:
        shard = _load_shard(_cache_file(cache, path.stem)) if _cache_file(cache, path.stem).is_file() else None
        if shard is not None and shard[0].get("source") == _source(path):
            cached += 1
        else:
            todo.append(path)
    if cached:
        log.info("%s: %d of %d clips already extracted; resuming with the other %d", cache, cached, len(clips),
                 len(todo))
    seconds: Counter[str] = Counter()
    media, skipped = 0.0, []
    bar = tqdm(todo, desc="extract", unit="clip", disable=not progress)
    for path in bar:
        bar.set_postfix_str(path.stem[-24:], refresh=False)
        try:
            cf = extract_clip(path, extractors, text=texts[path.stem] if texts is not None else None,
                              max_seconds=max_seconds, clip_id=path.stem)
        except (MediaError, ExtractorError) as e:
            if not skip_errors:
                raise
            log.warning("skipped: %s", e)
            skipped.append(path.stem)
            continue
        _save_shard(_cache_file(cache, path.stem), cf, _source(path))
        seconds.update(cf.seconds)
        media += cf.duration
    bar.close()

    kept = [p.stem for p in clips if p.stem not in skipped]
    split_of = {sid: (labels_of[sid].get("split") or split) if labels_of else split for sid in kept}
    rows: dict[str, list[str]] = {s: [] for s in SPLITS}
    empty, no_face = [], 0
    for sid in kept:
        meta, feats = _load_shard(_cache_file(cache, sid)) or ({}, {})
        if not meta:
            raise DataError(f"{_cache_file(cache, sid)}: unreadable cache file; delete it and rerun to extract "
                            "that clip again")
        text = texts[sid] if texts is not None else meta["text"]
        if not text:
            empty.append(sid)
        if "video" in feats and feats["video"].shape[0] == 0:
            no_face += 1
        label = labels_of[sid]["label"] if labels_of else OOS_LABEL
        rows[split_of[sid]].append(f"{sid}\t{clean_text(text)}\t{label}\n")
    if empty:
        log.warning("%d clip(s) without a transcript (no speech recognised), e.g. %s", len(empty), empty[:3])
    written = []
    for s in SPLITS:
        path = out / f"{s}.tsv"
        if rows[s]:
            write_text(path, "id\ttext\tlabel\n" + "".join(rows[s]))
            written.append(path.name)
        elif path.is_file():
            path.unlink()  # a split of an earlier extraction into this folder
    if labels_of:
        names = sorted({r["label"] for sid, r in labels_of.items() if sid in split_of} - {OOS_LABEL})
        if not names:
            raise DataError(f"{labels}: every clip is labelled {OOS_LABEL}; name at least one intent")
        write_text(out / "labels.txt", "".join(n + "\n" for n in names))
    for modality, name in FEATURE_FILES.items():
        if modality in extractors:
            write_feature_pickle(out / name, ((sid, _load_shard(_cache_file(cache, sid))[1][modality]) for sid in kept))
            written.append(name)
        elif (out / name).is_file():
            (out / name).unlink()
    record.update({"clips": len(kept), "splits": {s: len(r) for s, r in rows.items() if r}, "files": written,
                   "skipped": skipped, "clips_without_face": no_face if "video" in extractors else None,
                   "clips_without_text": len(empty)})
    write_json(out / EXTRACTION_FILE, record)
    return ExtractSummary(out=out, clips=len(kept), extracted=len(todo) - len(skipped), cached=cached,
                          skipped=skipped, splits=record["splits"], no_face=no_face, media_seconds=media,
                          seconds=dict(seconds))


def _require_all(path: Path, ids: list[str], table: dict, what: str) -> None:
    missing = [i for i in ids if i not in table]
    if missing:
        raise DataError(f"{path}: {len(missing)} clip(s) without {what}, e.g. {missing[:5]} (ids are the clip "
                        "file names without extension)")
    extra = sorted(set(table) - set(ids))
    if extra:
        log.warning("%s: %d id(s) name no clip, e.g. %s", path, len(extra), extra[:3])


def _prepare(out: Path, record: dict[str, Any], overwrite: bool) -> Path:
    """The cache folder, emptied when it was made with other extractors (and --overwrite)."""
    from amess.training.artifacts import write_json

    cache = out / CACHE_DIR
    key = {"media": record["media"], "extractors": {m: identity(r) for m, r in record["extractors"].items()
                                                    if r.get("name") != "tsv"}}
    if out.is_dir() and any(out.iterdir()) and not (out / EXTRACTION_FILE).is_file() and not cache.is_dir():
        if not overwrite:
            raise DataError(f"{out}: not empty and not written by amess extract; choose another --out "
                            "or pass --overwrite")
    settings = cache / "settings.json"
    if settings.is_file():
        try:
            old = json.loads(settings.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old != key:
            if not overwrite:
                raise DataError(f"{out}: extracted before with other extractors or settings ({settings}); "
                                "pass --overwrite to extract every clip again, or choose another --out")
            shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    write_json(settings, key)
    return cache
