"""Generate label descriptions through any OpenAI-compatible chat endpoint.

A-MESS's semantic synchronisation (SS) aligns the multimodal representation with one
description per intent, written by a large language model. This module (re)writes such
descriptions for any label set: one chat-completions request per label, answers cached on
disk, the result written as a YAML file in the same format as the shipped sets
(``provenance`` + ``descriptions``), readable by :func:`amess.labels.load_descriptions`.

Endpoint
    ``endpoint`` is the *base URL* of the OpenAI-compatible API, e.g.
    ``http://localhost:8000/v1`` or ``https://api.openai.com/v1``; the request goes to
    ``{endpoint}/chat/completions``. Rules, exactly:

    - a trailing ``/`` is ignored;
    - a URL with no path at all (``http://localhost:8000``) gets ``/v1`` appended;
    - a URL that already ends in ``/chat/completions`` is used as is;
    - any other path (``.../v1``, ``.../openai/v1``, ``.../v1beta/openai``) is taken as the
      base URL and ``/chat/completions`` is appended.

Prompt template
    Plain text with three placeholders, replaced literally (other braces are left alone,
    so a template may contain JSON): ``{label}`` (the label being described), ``{labels}``
    (all labels, comma-separated, so the model can make descriptions discriminative) and
    ``{dataset_hint}`` (free text about the data; may be empty).

Cache
    One JSON file per request in ``cache_dir`` (default ``<out parent>/.label_cache``),
    named by the sha256 of (model, rendered prompt, label); the rendered prompt includes the
    fixed system message. The rendered prompt contains
    the template, the label set and the dataset hint, so changing any of those asks again.
    Temperature and endpoint are *not* part of the key: the same model asked the same
    question through another server reuses the answer. Use another cache dir to force new
    answers. A rerun with everything cached sends no request at all.

Only the standard library is used for HTTP (``urllib.request``), so no client package is
needed. The API key, when there is one, is sent as ``Authorization: Bearer``; it is never
written to the cache or the output file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

from amess.fileio import write_text

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PROMPT",
    "SYSTEM_PROMPT",
    "LabelGenerationError",
    "add_cli",
    "chat_completions_url",
    "generate_descriptions",
    "read_label_file",
    "render_prompt",
]

SYSTEM_PROMPT = (
    "You write short, precise descriptions of intent labels for a multimodal intent "
    "recognition dataset (text, video of the speaker, audio of the speaker's voice)."
)
"""System message sent with every request (part of the cache key through the request)."""

DEFAULT_PROMPT = """\
You are helping to build a multimodal intent recognition system that reads what a speaker \
says (text), how they look (face and body, from video) and how they sound (tone of voice, \
from audio).
{dataset_hint}

The full set of intent labels is: {labels}.

Describe the intent "{label}" in 1 to 3 sentences. Say what a speaker with this intent \
wants, the wording they typically use, their tone of voice, and their facial expressions \
and body language. Make the description discriminative: make clear what separates \
"{label}" from the labels in the set that are most easily confused with it.
Answer with the description only: no title, no list, no quotation marks, and do not start \
with the label name."""
"""Default prompt template; see the module docstring for its placeholders."""

class LabelGenerationError(RuntimeError):
    """A request for one label failed (HTTP error, network error, malformed or empty answer)."""


# --------------------------------------------------------------------------- helpers


def render_prompt(template: str, label: str, labels: list[str], dataset_hint: str = "") -> str:
    """Fill the template's placeholders (literal replacement) and tidy blank lines."""
    if "{label}" not in template:
        raise ValueError("prompt template must contain the placeholder {label}")
    text = (
        template.replace("{labels}", ", ".join(labels))
        .replace("{dataset_hint}", dataset_hint.strip())
        .replace("{label}", label)
    )
    return re.sub(r"\n\s*\n(\s*\n)+", "\n\n", text).strip()


def chat_completions_url(endpoint: str) -> str:
    """The chat-completions URL for a base URL (rules in the module docstring)."""
    endpoint = endpoint.strip()
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(
            f"endpoint must be an http(s) base URL such as http://localhost:8000/v1, got {endpoint!r}"
        )
    path = parsed.path.rstrip("/")
    if path.endswith("/chat/completions"):
        pass
    elif path == "":
        path = "/v1/chat/completions"
    else:
        path = path + "/chat/completions"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, parsed.query, ""))


def _endpoint_host(endpoint: str) -> str:
    """Host[:port] of the endpoint, without credentials, for the provenance block."""
    parsed = urllib.parse.urlsplit(endpoint.strip())
    host = parsed.hostname or ""
    if parsed.port:
        host = f"{host}:{parsed.port}"
    return host


def _redact(url: str) -> str:
    """URL without user info or query string (which may hold secrets), for messages."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    if parsed.port:
        host = f"{host}:{parsed.port}"
    return urllib.parse.urlunsplit((parsed.scheme, host, parsed.path, "", ""))


def cache_key(model: str, prompt: str, label: str, system: str = SYSTEM_PROMPT) -> str:
    """sha256 hex digest identifying one (model, rendered prompt, label) request.

    The system message is part of the prompt sent, so it is part of the key too.
    """
    payload = json.dumps(
        {"model": model, "system": system, "prompt": prompt, "label": label},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _clean_answer(content: str) -> str:
    """Strip whitespace, and a leading <think>...</think> block some reasoning models emit."""
    text = content.strip()
    if text.startswith("<think>") and "</think>" in text:
        text = text.split("</think>", 1)[1].strip()
    return text


def read_label_file(path: str | Path) -> list[str]:
    """Read a label list from a file.

    Accepted formats:

    - ``.yaml`` / ``.yml`` / ``.json``: a list of strings, or a mapping with a ``labels``
      list, or a descriptions file (``descriptions:`` mapping, or a plain mapping
      label -> text), whose keys are the labels in file order;
    - anything else: plain text, one label per line; blank lines and lines starting with
      ``#`` are ignored, surrounding whitespace is stripped.

    Duplicates and non-string entries raise ValueError.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml", ".json"):
        data: Any = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        if isinstance(data, dict):
            if isinstance(data.get("labels"), list):
                data = data["labels"]
            elif isinstance(data.get("descriptions"), dict):
                data = list(data["descriptions"].keys())
            else:
                data = list(data.keys())
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of labels, got {type(data).__name__}")
        labels = []
        for i, item in enumerate(data):
            if not isinstance(item, str):
                raise ValueError(
                    f"{path}: entry {i} is {item!r} ({type(item).__name__}), not a string; "
                    "quote it in YAML"
                )
            labels.append(item.strip())
    else:
        labels = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
    _check_labels(labels, str(path))
    return labels


def _check_labels(labels: list[str], where: str) -> None:
    if not labels:
        raise ValueError(f"{where}: no labels")
    if any(not isinstance(lab, str) or not lab.strip() for lab in labels):
        raise ValueError(f"{where}: labels must be non-empty strings")
    seen: set[str] = set()
    dups: set[str] = set()
    for lab in labels:
        (dups if lab in seen else seen).add(lab)
    if dups:
        raise ValueError(f"{where}: duplicate labels: {sorted(set(dups))}")


# --------------------------------------------------------------------------- HTTP


def _request_description(
    url: str,
    *,
    label: str,
    model: str,
    prompt: str,
    api_key: str | None,
    temperature: float,
    timeout: float,
) -> str:
    """POST one chat-completions request and return the cleaned answer text."""
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
        ],
        "temperature": temperature,
    }
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(
        url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
    )
    where = f"label {label!r}, endpoint {_redact(url)}"
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        try:
            detail = exc.read().decode("utf-8", "replace").strip()
        except Exception:  # noqa: BLE001 - best effort detail only
            detail = ""
        detail = f": {detail[:500]}" if detail else ""
        raise LabelGenerationError(f"{where}: HTTP {exc.code} {exc.reason}{detail}") from exc
    except urllib.error.URLError as exc:
        raise LabelGenerationError(f"{where}: request failed: {exc.reason}") from exc
    except (TimeoutError, OSError) as exc:
        raise LabelGenerationError(f"{where}: request failed: {exc}") from exc

    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        snippet = raw[:200].decode("utf-8", "replace")
        raise LabelGenerationError(
            f"{where}: malformed response, not JSON ({exc}): {snippet!r}"
        ) from exc
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise LabelGenerationError(
            f"{where}: malformed response, no choices[0].message.content: "
            f"{json.dumps(data)[:300]}"
        ) from exc
    if not isinstance(content, str):
        raise LabelGenerationError(
            f"{where}: malformed response, choices[0].message.content is "
            f"{type(content).__name__}, not a string"
        )
    text = _clean_answer(content)
    if not text:
        raise LabelGenerationError(f"{where}: empty answer")
    return text


def _read_cache(path: Path) -> str | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        text = entry["description"]
        if isinstance(text, str) and text.strip():
            return text
        logger.warning("cache entry %s has no description; asking again", path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("cache entry %s unreadable (%s); asking again", path, exc)
    return None


# --------------------------------------------------------------------------- main API


def generate_descriptions(
    labels: list[str],
    *,
    endpoint: str,
    model: str,
    out: Path,
    cache_dir: Path | None = None,
    api_key: str | None = None,
    prompt_template: str = DEFAULT_PROMPT,
    temperature: float = 0.0,
    timeout: float = 60,
    dataset_hint: str = "",
) -> dict:
    """Ask an OpenAI-compatible endpoint for one description per label and write a YAML file.

    Args:
        labels: the label names, in the order they should appear in the file.
        endpoint: base URL of the API, e.g. ``http://localhost:8000/v1`` (``/v1`` is added
            when the URL has no path; see the module docstring for the exact rules).
        model: model name sent in the request and recorded in the provenance.
        out: output YAML file, written atomically (temporary file, then ``os.replace``).
        cache_dir: where answers are cached; default ``<out parent>/.label_cache``.
        api_key: bearer token; None reads ``OPENAI_API_KEY`` from the environment, and no
            ``Authorization`` header is sent when neither is set (or the key is empty).
        prompt_template: template with ``{label}``, ``{labels}``, ``{dataset_hint}``.
        temperature: sampling temperature sent with each request.
        timeout: seconds allowed for each request.
        dataset_hint: free text about the dataset inserted into the prompt.

    Returns:
        The document written: ``{"provenance": {...}, "descriptions": {label: text}}``.

    Raises:
        LabelGenerationError: a request failed or returned a malformed or empty answer; the
            message names the label and the endpoint. Answers already received stay cached.
        ValueError: bad labels, template or endpoint.
    """
    labels = list(labels)
    _check_labels(labels, "labels")
    out = Path(out)
    url = chat_completions_url(endpoint)
    cache = Path(cache_dir) if cache_dir is not None else out.parent / ".label_cache"
    if api_key is None:
        api_key = os.environ.get("OPENAI_API_KEY")

    descriptions: dict[str, str] = {}
    n_requests = 0
    for label in labels:
        prompt = render_prompt(prompt_template, label, labels, dataset_hint)
        entry_path = cache / f"{cache_key(model, prompt, label)}.json"
        text = _read_cache(entry_path)
        if text is None:
            logger.info("asking %s (%s) to describe %r", _redact(url), model, label)
            text = _request_description(
                url,
                label=label,
                model=model,
                prompt=prompt,
                api_key=api_key,
                temperature=temperature,
                timeout=timeout,
            )
            n_requests += 1
            entry = {
                "model": model,
                "label": label,
                "prompt": prompt,
                "system": SYSTEM_PROMPT,
                "temperature": temperature,
                "endpoint_host": _endpoint_host(endpoint),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "description": text,
            }
            write_text(entry_path, json.dumps(entry, indent=2, ensure_ascii=False) + "\n")
        else:
            logger.debug("cached description for %r", label)
        descriptions[label] = text
    logger.info(
        "%d labels described, %d requests sent, %d from cache %s",
        len(labels),
        n_requests,
        len(labels) - n_requests,
        cache,
    )

    doc = {
        "provenance": {
            "model": model,
            "endpoint": _endpoint_host(endpoint),
            "prompt": prompt_template,
            "system": SYSTEM_PROMPT,
            "dataset_hint": dataset_hint,
            "temperature": temperature,
            "date": _dt.date.today().isoformat(),
            "notes": (
                "Generated by `amess labels generate`: one chat-completions request per "
                "label; {label}, {labels} and {dataset_hint} in the prompt were filled per "
                "label. Answers cached by sha256(model, rendered prompt, label)."
            ),
        },
        "descriptions": descriptions,
    }
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)
    write_text(out, text)
    logger.info("wrote %s", out)
    return doc


# --------------------------------------------------------------------------- CLI


def _cmd_generate(args: argparse.Namespace) -> int:
    try:
        labels = read_label_file(args.labels)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"error: cannot read labels from {args.labels}: {exc}", file=sys.stderr)
        return 2
    if args.api_key_env is None:
        api_key = os.environ.get("OPENAI_API_KEY") or ""
    else:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            print(f"error: environment variable {args.api_key_env} is not set", file=sys.stderr)
            return 2
    template = DEFAULT_PROMPT
    if args.prompt_file is not None:
        try:
            template = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as exc:
            print(f"error: cannot read prompt file: {exc}", file=sys.stderr)
            return 2
    try:
        doc = generate_descriptions(
            labels,
            endpoint=args.endpoint,
            model=args.model,
            out=Path(args.out),
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            api_key=api_key,
            prompt_template=template,
            temperature=args.temperature,
            timeout=args.timeout,
            dataset_hint=args.dataset_hint,
        )
    except (LabelGenerationError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(doc['descriptions'])} descriptions to {args.out}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from amess.labels import _load_document  # local import: avoid a cycle at import time

    try:
        source, provenance, descriptions = _load_document(args.set)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# {source}")
    for key in ("model", "date", "endpoint"):
        if provenance.get(key):
            print(f"# {key}: {provenance[key]}")
    for label, text in descriptions.items():
        texts = [text] if isinstance(text, str) else text
        print(f"\n{label}:" + "".join(f"\n  {t}" for t in texts))
    return 0


def _cmd_labels_help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return run


def add_cli(subparsers: Any) -> None:
    """Register ``labels generate`` and ``labels show`` on an argparse subparsers object.

    Each leaf parser sets ``func``: a callable taking the parsed namespace and returning an
    exit code. ``amess labels`` alone prints its help and returns 2.
    """
    labels_parser = subparsers.add_parser(
        "labels",
        help="label descriptions: show shipped sets, generate new ones with an LLM",
        description="Label descriptions used by semantic synchronisation.",
    )
    labels_parser.set_defaults(func=_cmd_labels_help(labels_parser))
    sub = labels_parser.add_subparsers(dest="labels_command", metavar="{generate,show}")

    gen = sub.add_parser(
        "generate",
        help="write descriptions for a label set through an OpenAI-compatible endpoint",
        description=(
            "Ask an OpenAI-compatible chat endpoint for one description per label and write "
            "a YAML file usable as data.label_descriptions. Answers are cached, so a rerun "
            "sends no requests."
        ),
    )
    gen.add_argument(
        "--labels",
        required=True,
        metavar="FILE",
        help="label list: text file (one per line, # comments) or YAML/JSON list",
    )
    gen.add_argument(
        "--endpoint",
        required=True,
        metavar="URL",
        help="API base URL, e.g. http://localhost:8000/v1 (/v1 is added when the URL has no path)",
    )
    gen.add_argument("--model", required=True, metavar="NAME", help="model name for the requests")
    gen.add_argument("--out", required=True, metavar="FILE", help="output YAML file")
    gen.add_argument(
        "--cache-dir", default=None, metavar="DIR", help="answer cache (default: <out dir>/.label_cache)"
    )
    gen.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="environment variable holding the API key (default: OPENAI_API_KEY if set, else no key)",
    )
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="default 0.0")
    gen.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds per request")
    gen.add_argument(
        "--dataset-hint", default="", metavar="TEXT", help="text about the dataset for the prompt"
    )
    gen.add_argument(
        "--prompt-file",
        default=None,
        metavar="FILE",
        help="prompt template with {label}, {labels}, {dataset_hint} (default: built-in)",
    )
    gen.set_defaults(func=_cmd_generate)

    show = sub.add_parser("show", help="print a label set's descriptions")
    show.add_argument(
        "--set",
        required=True,
        metavar="NAME",
        help="shipped set name (mintrec, mintrec_binary, mintrec2) or a YAML/JSON file",
    )
    show.set_defaults(func=_cmd_show)
