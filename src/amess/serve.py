"""`amess serve RUN`: a local web page over a trained run. Type an utterance or upload a clip;
see the intents ranked as a bar chart, the transcript with the anchor words highlighted, and
the out-of-scope verdict of each detector.

The standard library's `http.server`, one static page (`serve_static/index.html`, no CDN),
and a JSON API:

    GET  /              the page (with /app.js and /style.css)
    GET  /api/info      the run: method, intents, modalities, detectors, whether clips work
    POST /api/predict   {"text": "..."} -> the prediction
    POST /api/clip      the clip's bytes as the body (X-Filename: its name, for the extension)

It binds to 127.0.0.1 unless told otherwise. An upload must declare its Content-Length, at
most `max_upload_mb`; it is streamed to a file in the server's private temporary folder,
decoded as media only (never run), and deleted when its prediction is done, whatever
happens. One prediction runs at a time (the model is shared).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import shutil
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("serve_static")
MAX_TEXT_CHARS = 2000
MAX_JSON_BYTES = 64 * 1024
_CHUNK = 1 << 16
_PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}


class _Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class AmessServer(ThreadingHTTPServer):
    """The HTTP server, holding the predictor, its lock and the upload folder."""

    daemon_threads = True

    def __init__(self, predictor, address: tuple[str, int], *, max_upload_mb: float = 50.0,
                 threads: int | None = None):
        super().__init__(address, _Handler)
        self.predictor = predictor
        self.lock = threading.Lock()
        self.max_upload = int(max_upload_mb * 2**20)
        self.threads = threads
        self.upload_dir = Path(tempfile.mkdtemp(prefix="amess-serve-"))
        os.chmod(self.upload_dir, 0o700)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        shutil.rmtree(self.upload_dir, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        p = self.predictor
        return {"run": str(p.seed_dir), "method": p.method, "intents": p.label_names,
                "modalities": ["text", *p.feature_dims], "detectors": list(p.detectors),
                "clips": _clips_available(p), "max_upload_mb": round(self.max_upload / 2**20, 1)}

    def result(self, pred, **extra: Any) -> dict[str, Any]:
        d = pred.to_dict()
        d["thresholds"] = {n: float(det.threshold) for n, det in self.predictor.detectors.items()}
        d["out_of_scope_any"] = any(pred.ood.values()) if pred.ood else None
        return {**d, **extra}


def _clips_available(predictor) -> str | None:
    """None when clips can be predicted here, else why not."""
    from importlib.util import find_spec

    missing = [m for m in ("av", "faster_whisper") if find_spec(m) is None]
    if "video" in predictor.feature_dims and find_spec("dlib") is None:
        missing.append("dlib")
    if missing:
        return f"needs {', '.join(missing)}: pip install 'amess[extract]'"
    from amess.extract.clips import run_records

    unknown = [m for m, r in run_records(predictor).items() if r is None]
    if unknown:
        return f"this run's {', '.join(unknown)} features come from an unknown extractor (no extraction.json)"
    return None


class _Handler(BaseHTTPRequestHandler):
    server: AmessServer
    server_version = "amess"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in _PAGES:
            name, ctype = _PAGES[path]
            self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), ctype)
        elif path == "/api/info":
            self._json(HTTPStatus.OK, self.server.info())
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            length = self._length()
            if path == "/api/predict":
                self._json(HTTPStatus.OK, self._predict_text(length))
            elif path == "/api/clip":
                self._json(HTTPStatus.OK, self._predict_clip(length))
            else:
                self.close_connection = True
                raise _Refused(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
        except _Refused as e:
            self._json(e.status, {"error": str(e)})
        except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input: DataError, MediaError, ...
            log.warning("%s: %s", path, e)
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})

    def _length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or self.headers.get("Content-Length") is None:
            self.close_connection = True
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        try:
            n = int(self.headers["Content-Length"])
        except ValueError:
            self.close_connection = True
            raise _Refused(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if n < 0:
            self.close_connection = True
            raise _Refused(HTTPStatus.BAD_REQUEST, "Content-Length is negative")
        return n

    def _predict_text(self, length: int) -> dict[str, Any]:
        if length > MAX_JSON_BYTES:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request over {MAX_JSON_BYTES} bytes")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            raise _Refused(HTTPStatus.BAD_REQUEST, 'expected JSON like {"text": "..."}') from None
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise _Refused(HTTPStatus.BAD_REQUEST, 'expected JSON like {"text": "..."} with a non-empty text')
        if len(text) > MAX_TEXT_CHARS:
            raise _Refused(HTTPStatus.BAD_REQUEST, f"text over {MAX_TEXT_CHARS} characters")
        with self.server.lock:
            [pred] = self.server.predictor.predict([text.strip()])
        return self.server.result(pred, source="text")

    def _predict_clip(self, length: int) -> dict[str, Any]:
        from amess.extract.media import MEDIA_SUFFIXES

        why = _clips_available(self.server.predictor)
        limit = self.server.max_upload
        if why or length > limit or length == 0:
            self.close_connection = True
            if why:
                raise _Refused(HTTPStatus.BAD_REQUEST, f"clips cannot be predicted here: {why}")
            raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length else HTTPStatus.BAD_REQUEST,
                           f"upload of {length} bytes: expected 1 byte to {limit / 2**20:.0f} MiB")
        name = Path(self.headers.get("X-Filename", "clip.mp4")).name
        suffix = Path(name).suffix.lower()
        if suffix not in MEDIA_SUFFIXES:
            self.close_connection = True
            raise _Refused(HTTPStatus.BAD_REQUEST, f"{name}: expected a clip ending in {', '.join(MEDIA_SUFFIXES)}")
        fd, tmp = tempfile.mkstemp(suffix=suffix, dir=self.server.upload_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                left = length
                while left:
                    block = self.rfile.read(min(_CHUNK, left))
                    if not block:
                        raise _Refused(HTTPStatus.BAD_REQUEST, f"upload ended after {length - left} of {length} bytes")
                    f.write(block)
                    left -= len(block)
            with self.server.lock:
                [pred] = self.server.predictor.predict_clips([tmp], threads=self.server.threads)
            return self.server.result(pred, source="clip", clip=name)
        finally:
            Path(tmp).unlink(missing_ok=True)


def make_server(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, seed: int | None = None,
                max_upload_mb: float = 50.0, threads: int | None = None) -> AmessServer:
    """The server for a run (`port=0`: any free port); call `serve_forever()` on it."""
    from amess.predictor import load_run

    predictor = load_run(run_dir, seed=seed)
    server = AmessServer(predictor, (host, port), max_upload_mb=max_upload_mb, threads=threads)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("serving on %s: reachable from other machines; the page has no authentication", host)
    return server


def cmd_serve(args: argparse.Namespace) -> int:
    server = make_server(args.run_dir, host=args.host, port=args.port, seed=args.seed,
                         max_upload_mb=args.max_upload_mb, threads=args.threads)
    print(f"serving {server.predictor.seed_dir} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("serve", help="a local web page: type an utterance or upload a clip, see the ranked intents")
    p.add_argument("run_dir", help="a run folder (its first seed) or a seed folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--seed", type=int, default=None, help="which seed's model (default: the first)")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest clip accepted (default 50 MiB)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the extractors")
    p.set_defaults(func=cmd_serve)
