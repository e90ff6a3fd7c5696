"""SDIF-DA's data augmentation as an offline step: LLM paraphrases of the training utterances.

    amess data augment --dataset mintrec --data-dir DIR --endpoint URL --model NAME --n 3 --out aug.tsv

Each in-scope training utterance is sent, with its intent, to an OpenAI-compatible chat
endpoint, which answers with `n` paraphrases. The method `sdif_da` trains with them when
`sdif_da.augmented_tsv` names the file: each paraphrase is a training row with its source
row's label and video and audio features (see `amess.models.sdif_da`).

Output, `OUT.tsv`: header `id source_id label text`, one paraphrase a row, `id` =
`{source_id}#aug{k}` (k from 1). `label` is the source's intent name, for reading; training
takes the label of the source row under the run's task. Written atomically at the end,
also when some utterances failed (they are listed in the provenance).

Provenance, `OUT.tsv.json` (the `FILE.json` convention of `amess.training.spec`): model,
endpoint host (never a key), prompt template, system message, temperature, n, dataset,
data folder, split, counts, the source ids that failed, date.

Cache: one JSON file per utterance in `cache_dir` (default `<out dir>/.augment_cache`),
named by `amess.labels.generate.cache_key(model, rendered prompt, source id)`, written
atomically as each answer arrives. A rerun (after a kill, or after failures) sends requests
only for the utterances without a cached answer; a rerun with everything cached sends none.

Endpoint faults: the HTTP client is `amess.labels.generate`'s (stdlib, errors naming the
endpoint). A failed request (HTTP error, no connection, malformed JSON, empty answer, or an
answer with no usable paraphrase) is retried `retries` times with a growing pause; an
utterance that still fails is skipped and reported, and after `max_consecutive_failures`
failures in a row the run stops early (the endpoint is down): what was answered stays
cached, so the same command resumes.

What the reference does instead (JoeYing1019/SDIF-DA `chatGPT_gen_data.py` and
`methods/SDIF/manager.py`): it asks gpt-3.5-turbo, per intent, for 25 new utterances given
the intent's definition and 20 example utterances sampled from train, dev *and test*
(25,000 rows in `data/MIntRec/augment_train.tsv`), and pretrains the text encoder on them
with a text-only head before the multimodal training. Ours is per utterance and train only:
no dev or test text reaches training, and every generated row has a source whose video and
audio it can reuse.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from amess.data.base import DataError, read_tsv
from amess.data.batch import Sample
from amess.fileio import write_text
from amess.labels.generate import (SYSTEM_PROMPT, LabelGenerationError, _endpoint_host,
                                   _redact, _request_description, cache_key, chat_completions_url)

log = logging.getLogger(__name__)

AUGMENTED_HEADER = ["id", "source_id", "label", "text"]
AUG_ID_SEP = "#aug"

DEFAULT_PROMPT = """\
Here is an utterance from a TV-series dialogue. Its speaker's intent is "{label}".

Utterance: {text}

Write {n} different paraphrases of this utterance. Each must keep the meaning, the intent \
"{label}" and the conversational style of the original, as one natural spoken sentence or \
two, but vary the wording and the sentence structure.
Answer with the {n} paraphrases only, one per line: no numbering, no quotation marks, no \
other text."""
"""Default prompt; placeholders `{text}`, `{label}`, `{n}`, replaced literally."""


class AugmentationError(RuntimeError):
    """The run could not go on (the endpoint failed too many times in a row)."""


@dataclass
class AugmentReport:
    """What `augment_samples` did: rows written, requests sent, utterances that failed."""

    out: Path
    sources: int
    rows: int
    requests: int
    cached: int
    failed: list[str] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def complete(self) -> bool:
        return not self.failed and not self.stopped_early


# ----- prompt and answer ------------------------------------------------------------------

def render_prompt(template: str, *, text: str, label: str, n: int) -> str:
    """Fill `{text}`, `{label}`, `{n}` literally (other braces are left alone)."""
    if "{text}" not in template:
        raise ValueError("augmentation prompt template must contain the placeholder {text}")
    return template.replace("{label}", label).replace("{n}", str(n)).replace("{text}", text).strip()


_BULLET = re.compile(r"^\s*(?:\(?\d{1,2}[.):]\)?|[-*\u2022])\s*")
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"


def _norm(text: str) -> str:
    return re.sub(r"[^\w]+", " ", text.casefold()).strip()


def parse_paraphrases(answer: str, source: str, n: int) -> list[str]:
    """Up to `n` paraphrases from an answer: one per line (or a JSON list of strings), with
    numbering, bullets and quotes stripped, whitespace (tabs, newlines) collapsed; lines
    ending in ':' (a preamble), copies of the source and duplicates are dropped."""
    text = answer.strip()
    lines: list[str] = []
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if isinstance(items, list) and all(isinstance(i, str) for i in items):
            lines = items
    if not lines:
        lines = text.splitlines()
    out, seen = [], {_norm(source)}
    for line in lines:
        line = " ".join(_BULLET.sub("", line).split()).strip(_QUOTES + " ")
        if not line or line.endswith(":") or _norm(line) in seen or not _norm(line):
            continue
        seen.add(_norm(line))
        out.append(line)
        if len(out) == n:
            break
    return out


# ----- the run ----------------------------------------------------------------------------

def _read_cached(path: Path) -> list[str] | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        items = entry["paraphrases"]
        if isinstance(items, list) and items and all(isinstance(i, str) and i.strip() for i in items):
            return items
        log.warning("cache entry %s holds no paraphrase; asking again", path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("cache entry %s unreadable (%s); asking again", path, e)
    return None


def augment_samples(samples: Sequence[Sample], label_names: Sequence[str], *, endpoint: str, model: str,
                    out: str | Path, n: int = 3, cache_dir: str | Path | None = None, api_key: str | None = None,
                    prompt_template: str = DEFAULT_PROMPT, temperature: float = 1.0, timeout: float = 60.0,
                    retries: int = 2, backoff: float = 1.0, max_consecutive_failures: int = 5,
                    provenance: dict[str, Any] | None = None, progress: bool = True) -> AugmentReport:
    """Paraphrase each in-scope sample (`label < len(label_names)`) through the endpoint and
    write `out` (TSV) and `out.json` (provenance); see the module docstring.

    `api_key` None reads OPENAI_API_KEY (no Authorization header when unset). `temperature`
    defaults to 1.0, the API's default, which the reference used. `provenance`: extra
    entries for the provenance file (the command line adds the dataset and folder).
    """
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if retries < 0 or max_consecutive_failures < 1:
        raise ValueError("retries must be >= 0 and max_consecutive_failures >= 1")
    out = Path(out)
    url = chat_completions_url(endpoint)
    cache = Path(cache_dir) if cache_dir is not None else out.parent / ".augment_cache"
    api_key = os.environ.get("OPENAI_API_KEY") if api_key is None else api_key
    C = len(label_names)
    todo = [s for s in samples if s.label < C]
    if not todo:
        raise ValueError("no in-scope training utterance to paraphrase")
    ids = [s.id for s in todo]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate sample ids among the training rows, e.g. "
                         f"{sorted({i for i in ids if ids.count(i) > 1})[:3]}")
    rows: list[tuple[str, str, str, str]] = []
    report = AugmentReport(out=out, sources=len(todo), rows=0, requests=0, cached=0)
    in_a_row = 0
    for s in tqdm(todo, desc="paraphrasing", disable=not progress):
        label = label_names[s.label]
        prompt = render_prompt(prompt_template, text=s.text, label=label, n=n)
        entry_path = cache / f"{cache_key(model, prompt, s.id)}.json"
        found = _read_cached(entry_path)
        if found is not None:
            report.cached += 1
        else:
            found, error = None, None
            for attempt in range(retries + 1):
                if attempt:
                    time.sleep(backoff * attempt)
                report.requests += 1
                try:
                    answer = _request_description(url, label=s.id, model=model, prompt=prompt, api_key=api_key,
                                                  temperature=temperature, timeout=timeout)
                except LabelGenerationError as e:
                    error = str(e).replace(f"label {s.id!r}", f"sample {s.id!r}", 1)
                    continue
                found = parse_paraphrases(answer, s.text, n)
                if found:
                    break
                error = f"sample {s.id!r}, endpoint {_redact(url)}: no usable paraphrase in the answer {answer[:200]!r}"
            if not found:
                report.failed.append(s.id)
                in_a_row += 1
                log.warning("%s (after %d attempt(s)); skipped", error, retries + 1)
                if in_a_row >= max_consecutive_failures:
                    report.stopped_early = True
                    log.error("%d utterances failed in a row: stopping; rerun the same command to resume", in_a_row)
                    break
                continue
            write_text(entry_path, json.dumps({
                "model": model, "source_id": s.id, "prompt": prompt, "system": SYSTEM_PROMPT,
                "temperature": temperature, "endpoint_host": _endpoint_host(endpoint),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "answer": answer, "paraphrases": found}, indent=2, ensure_ascii=False) + "\n")
        in_a_row = 0
        rows += [(f"{s.id}{AUG_ID_SEP}{k}", s.id, label, text) for k, text in enumerate(found, start=1)]
    report.rows = len(rows)
    not_reached = ids[ids.index(report.failed[-1]) + 1:] if report.stopped_early else []
    write_text(out, "\t".join(AUGMENTED_HEADER) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    write_text(out.with_name(out.name + ".json"), json.dumps({
        "kind": "paraphrases of training utterances (SDIF-DA data augmentation)",
        "model": model, "endpoint": _endpoint_host(endpoint), "prompt": prompt_template, "system": SYSTEM_PROMPT,
        "temperature": temperature, "n": n, **(provenance or {}),
        "date": _dt.date.today().isoformat(), "sources": len(todo), "rows": len(rows),
        "failed": report.failed, "not_reached": len(not_reached), "cache_dir": str(cache),
        "notes": "Written by `amess data augment`: one chat-completions request per in-scope training "
                 "utterance; answers cached by sha256(model, rendered prompt, source id)."},
        indent=2, ensure_ascii=False) + "\n")
    log.info("%d paraphrases of %d utterances written to %s (%d requests, %d from cache, %d failed)",
             report.rows, len(todo), out, report.requests, report.cached, len(report.failed))
    return report


def read_augmented(path: str | Path) -> dict[str, list[str]]:
    """`{source_id: [paraphrase, ...]}` from a file written by `augment_samples`; errors name
    the file and the line."""
    path = Path(path)
    table: dict[str, list[str]] = {}
    seen: set[str] = set()
    for r in read_tsv(path, AUGMENTED_HEADER):
        if not r["source_id"] or not r["text"]:
            raise DataError(f"{path}: line {r['_line']}: empty source_id or text")
        if r["id"] in seen:
            raise DataError(f"{path}: line {r['_line']}: duplicate id {r['id']!r}")
        seen.add(r["id"])
        table.setdefault(r["source_id"], []).append(r["text"])
    return table


# ----- command line: `amess data augment` -------------------------------------------------

def cmd_augment(args: argparse.Namespace) -> int:
    """Read the dataset's training split (text only) and paraphrase it; 0 when every
    utterance got paraphrases, 1 when some failed (rerun to retry them)."""
    from amess.config import Config
    from amess.data import get_reader

    o: dict[str, Any] = {"data.dataset": args.dataset, "data.data_dir": args.data_dir, "data.modalities": ["text"]}
    cfg = Config().override(o)
    reader = get_reader(cfg.data)
    samples = reader.read_rows(cfg.data.train_split)
    template = DEFAULT_PROMPT
    if args.prompt_file:
        template = Path(args.prompt_file).read_text(encoding="utf-8")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise ValueError(f"--api-key-env {args.api_key_env}: the environment variable is not set")
    report = augment_samples(
        samples, reader.label_names, endpoint=args.endpoint, model=args.model, out=args.out, n=args.n,
        cache_dir=args.cache_dir, api_key=api_key, prompt_template=template, temperature=args.temperature,
        timeout=args.timeout, retries=args.retries, progress=not args.no_progress,
        provenance={"dataset": args.dataset, "data_dir": str(Path(args.data_dir).resolve()),
                    "split": cfg.data.train_split, "source_file": str(reader.split_file(cfg.data.train_split))})
    print(f"wrote {report.rows} paraphrases of {report.sources - len(report.failed)} of {report.sources} training "
          f"utterances to {report.out} ({report.requests} requests, {report.cached} from cache)")
    if not report.complete:
        print(f"{len(report.failed)} utterance(s) failed{' and the run stopped early' if report.stopped_early else ''}"
              f"; rerun the same command to retry (answers so far are cached)")
        return 1
    print(f"train with it: --method sdif_da --set sdif_da.augmented_tsv={report.out}")
    return 0


def add_cli(data_subparsers: Any) -> None:
    """Register `augment` under `amess data`."""
    p = data_subparsers.add_parser("augment", help="paraphrase the training utterances through an LLM endpoint "
                                                   "(SDIF-DA data augmentation), cached and resumable")
    p.add_argument("--dataset", default="mintrec", help="benchmark reader (default: mintrec)")
    p.add_argument("--data-dir", required=True, help="the dataset folder as downloaded")
    p.add_argument("--endpoint", required=True, metavar="URL",
                   help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--model", required=True, metavar="NAME", help="model name for the requests")
    p.add_argument("--n", type=int, default=3, help="paraphrases per utterance (default 3)")
    p.add_argument("--out", required=True, metavar="FILE.tsv", help="output TSV (provenance beside it, FILE.tsv.json)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="answer cache (default: <out dir>/.augment_cache)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="environment variable holding the API key (default: OPENAI_API_KEY if set)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=2, help="retries of a failed request (default 2)")
    p.add_argument("--prompt-file", default=None, help="prompt template with {text}, {label}, {n}")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_augment)
