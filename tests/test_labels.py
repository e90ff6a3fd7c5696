"""Label descriptions: shipped data, loading, and generation through a local fake endpoint."""

from __future__ import annotations

import argparse
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from amess.labels import load_descriptions, load_provenance, shipped_sets
from amess.labels.generate import (
    DEFAULT_PROMPT,
    LabelGenerationError,
    add_cli,
    chat_completions_url,
    generate_descriptions,
    read_label_file,
    render_prompt,
)

MINTREC = [
    "Complain", "Praise", "Apologise", "Thank", "Criticize", "Agree", "Taunt", "Flaunt",
    "Joke", "Oppose", "Comfort", "Care", "Inform", "Advise", "Arrange", "Introduce", "Leave",
    "Prevent", "Greet", "Ask for help",
]  # fmt: skip
MINTREC_BINARY = ["Emotion", "Goal"]
MINTREC2 = [
    "Acknowledge", "Advise", "Agree", "Apologise", "Arrange", "Ask for help",
    "Asking for opinions", "Care", "Comfort", "Complain", "Confirm", "Criticize", "Doubt",
    "Emphasize", "Explain", "Flaunt", "Greet", "Inform", "Introduce", "Invite", "Joke", "Leave",
    "Oppose", "Plan", "Praise", "Prevent", "Refuse", "Taunt", "Thank", "Warn",
]  # fmt: skip
SETS = {"mintrec": MINTREC, "mintrec_alt": MINTREC, "mintrec_binary": MINTREC_BINARY, "mintrec2": MINTREC2,
        "mintrec2_alt": MINTREC2}
SEVERAL = {"mintrec_alt": 2, "mintrec2_alt": 2}  # sets with several descriptions per label: how many

TEMPLATE = "Describe <<{label}>> among [{labels}]. {dataset_hint}"


# --------------------------------------------------------------------------- shipped data


def _shipped_doc(name: str) -> dict:
    import importlib.resources as resources

    text = resources.files("amess.labels").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def test_shipped_sets_listed():
    assert shipped_sets() == sorted(SETS)


@pytest.mark.parametrize("name", sorted(SETS))
def test_shipped_set_labels_in_official_order(name):
    doc = _shipped_doc(name)
    assert list(doc["descriptions"]) == SETS[name]
    descs = load_descriptions(name, SETS[name])
    assert len(descs) == len(SETS[name])
    if name in SEVERAL:
        assert all(isinstance(d, list) and len(d) == SEVERAL[name] for d in descs)
        labels, descs = [lb for lb in SETS[name] for _ in range(SEVERAL[name])], sum(descs, [])
    else:
        labels = SETS[name]
    for label, text in zip(labels, descs):
        assert isinstance(text, str) and len(text.split()) >= 15, label
        # 1 to 3 sentences (ignore "?" / "!" inside quoted examples and "..." ellipses)
        unquoted = re.sub(r'"[^"]*"', "Q", text).replace("...", "")
        n_sent = len(re.findall(r"[.!?](\s|$)", unquoted))
        assert 1 <= n_sent <= 3, (label, n_sent)
    assert len(set(descs)) == len(descs), "descriptions must differ"


@pytest.mark.parametrize("name", sorted(SETS))
def test_shipped_provenance(name):
    prov = load_provenance(name)
    for key in ("model", "prompt", "date", "notes"):
        assert isinstance(prov.get(key), str) and prov[key].strip(), key
    assert prov["date"] == {"mintrec_alt": "2026-12-03", "mintrec2_alt": "2026-12-07"}.get(name, "2026-11-28")
    assert "{label}" in prov["prompt"]


def test_load_descriptions_follows_requested_order():
    labels = ["Greet", "Complain", "Ask for help"]
    descs = load_descriptions("mintrec", labels)
    full = dict(zip(MINTREC, load_descriptions("mintrec", MINTREC)))
    assert descs == [full[label] for label in labels]


def test_several_descriptions_per_label_from_lists_and_joined_sets(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"A": ["alpha one", " alpha two "], "B": "beta"}))
    assert load_descriptions(str(path), ["B", "A"]) == ["beta", ["alpha one", "alpha two"]]
    other = tmp_path / "other.json"
    other.write_text('{"A": "alpha three", "B": ["beta two"]}')
    assert load_descriptions(f"{path}+{other}", ["A", "B"]) == [
        ["alpha one", "alpha two", "alpha three"], ["beta", "beta two"]]
    joined = load_descriptions("mintrec+mintrec_alt", ["Greet", "Leave"])
    base, alt = load_descriptions("mintrec", ["Greet", "Leave"]), load_descriptions("mintrec_alt", ["Greet", "Leave"])
    assert joined == [[b] + a for b, a in zip(base, alt)]
    with pytest.raises(ValueError, match="no description.*'C'"):
        load_descriptions(f"{path}+mintrec", ["A", "C"])
    empty = tmp_path / "empty.yaml"
    empty.write_text("A: []\nB: ['ok', '']\n")
    with pytest.raises(ValueError, match=r"empty.yaml.*\['A', 'B'\]"):
        load_descriptions(str(empty), ["A"])


def test_load_descriptions_missing_label_names_file_and_labels(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"descriptions": {"A": "alpha", "B": "beta"}}))
    with pytest.raises(ValueError) as err:
        load_descriptions(str(path), ["A", "C", "D"])
    msg = str(err.value)
    assert str(path) in msg and "'C'" in msg and "'D'" in msg
    with pytest.raises(ValueError, match="UNK"):
        load_descriptions("mintrec2", MINTREC2 + ["UNK"])
    with pytest.raises(ValueError, match="case differs"):
        load_descriptions("mintrec", ["complain"])


def test_user_files_yaml_json_plain_mapping(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("B: beta\nA: alpha\n")
    assert load_descriptions(str(plain), ["A", "B"]) == ["alpha", "beta"]
    assert load_provenance(str(plain)) == {}

    js = tmp_path / "d.json"
    js.write_text(json.dumps({"provenance": {"model": "m"}, "descriptions": {"A": " a "}}))
    assert load_descriptions(str(js), ["A"]) == ["a"]
    assert load_provenance(str(js)) == {"model": "m"}

    with pytest.raises(FileNotFoundError, match="mintrec"):
        load_descriptions(str(tmp_path / "nope.yaml"), ["A"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("A: ''\nB: [1]\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_descriptions(str(bad), ["A"])


def test_read_label_file_formats(tmp_path):
    txt = tmp_path / "labels.txt"
    txt.write_text("# comment\nAgree\n\n  Ask for help  \n# another\nWarn\n")
    assert read_label_file(txt) == ["Agree", "Ask for help", "Warn"]
    yml = tmp_path / "labels.yaml"
    yml.write_text("- Agree\n- Ask for help\n")
    assert read_label_file(yml) == ["Agree", "Ask for help"]
    js = tmp_path / "labels.json"
    js.write_text('["X", "Y"]')
    assert read_label_file(js) == ["X", "Y"]
    dup = tmp_path / "dup.txt"
    dup.write_text("A\nB\nA\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_label_file(dup)
    notstr = tmp_path / "n.yaml"
    notstr.write_text("- yes\n- A\n")
    with pytest.raises(ValueError, match="not a string"):
        read_label_file(notstr)


def test_endpoint_url_rules():
    assert chat_completions_url("http://h:1/v1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("https://h/openai/v1") == "https://h/openai/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    with pytest.raises(ValueError):
        chat_completions_url("localhost:8000")


def test_render_prompt():
    text = render_prompt(DEFAULT_PROMPT, "Warn", ["Warn", "Advise"], "")
    assert '"Warn"' in text and "Warn, Advise" in text and "{" not in text
    assert "\n\n\n" not in text
    # braces other than the placeholders are left alone
    assert render_prompt('{"x": 1} {label}', "L", ["L"]) == '{"x": 1} L'
    with pytest.raises(ValueError):
        render_prompt("no placeholder", "L", ["L"])


# --------------------------------------------------------------------------- fake endpoint


class FakeServer:
    """A local OpenAI chat-completions endpoint. mode: ok | http500 | badjson | nochoices | empty."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.requests: list[dict] = []
        self.errors: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # silence
                pass

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    outer.errors.append("body not JSON")
                    body = {}
                outer.requests.append(
                    {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                )
                if self.path != "/v1/chat/completions":
                    outer.errors.append(f"bad path {self.path}")
                    return self._send(404, b'{"error": "not found"}')
                if not isinstance(body.get("model"), str) or not isinstance(
                    body.get("messages"), list
                ):
                    outer.errors.append("body lacks model/messages")
                    return self._send(400, b'{"error": "bad request"}')
                user = [m for m in body["messages"] if m.get("role") == "user"][-1]["content"]
                match = re.search(r"<<(.+?)>>", user) or re.search(r'intent "(.+?)"', user)
                label = match.group(1) if match else "?"
                if outer.mode == "http500":
                    return self._send(500, b'{"error": {"message": "boom"}}')
                if outer.mode == "badjson":
                    return self._send(200, b"{not json")
                if outer.mode == "nochoices":
                    return self._send(200, json.dumps({"choices": []}).encode())
                content = "   " if outer.mode == "empty" else f"  Description of {label} by {body['model']}.\n"
                reply = {
                    "id": "x",
                    "object": "chat.completion",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}
                    ],
                }
                return self._send(200, json.dumps(reply).encode())

            def _send(self, code: int, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def test_generate_writes_file_and_caches(tmp_path):
    labels = ["Agree", "Ask for help", "Warn"]
    out = tmp_path / "gen" / "descs.yaml"
    with FakeServer() as srv:
        doc = generate_descriptions(
            labels, endpoint=srv.base + "/v1", model="fake-llm", out=out,
            prompt_template=TEMPLATE, dataset_hint="hint", api_key="sk-test",
        )
        assert not srv.errors
        assert len(srv.requests) == 3
        assert all(r["auth"] == "Bearer sk-test" for r in srv.requests)
        assert srv.requests[0]["body"]["model"] == "fake-llm"
        assert srv.requests[0]["body"]["temperature"] == 0.0

        assert out.is_file()
        assert load_descriptions(str(out), labels) == [
            f"Description of {lab} by fake-llm." for lab in labels
        ]
        assert doc["descriptions"] == dict(zip(labels, load_descriptions(str(out), labels)))
        prov = load_provenance(str(out))
        assert prov["model"] == "fake-llm"
        assert prov["endpoint"] == srv.base.removeprefix("http://")
        assert prov["prompt"] == TEMPLATE
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", prov["date"])
        assert "sk-test" not in out.read_text()
        cache = tmp_path / "gen" / ".label_cache"
        assert len(list(cache.glob("*.json"))) == 3
        assert not list(out.parent.glob("*.tmp"))

        # rerun: everything cached, zero requests; endpoint without /v1 accepted
        out.unlink()
        generate_descriptions(
            labels, endpoint=srv.base, model="fake-llm", out=out,
            prompt_template=TEMPLATE, dataset_hint="hint",
        )
        assert len(srv.requests) == 3
        assert out.is_file()

        # another model -> new requests; no key -> no Authorization header
        generate_descriptions(
            labels[:1], endpoint=srv.base, model="other", out=out,
            prompt_template=TEMPLATE, dataset_hint="hint",
        )
        assert len(srv.requests) == 4
        assert srv.requests[-1]["auth"] is None
        assert not srv.errors


def test_generate_default_prompt_and_env_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    out = tmp_path / "d.yaml"
    with FakeServer() as srv:
        generate_descriptions(["Doubt", "Confirm"], endpoint=srv.base + "/v1/", model="m", out=out)
        assert not srv.errors
        assert srv.requests[0]["auth"] == "Bearer sk-env"
        user = srv.requests[0]["body"]["messages"][-1]["content"]
        assert '"Doubt"' in user and "Doubt, Confirm" in user
    assert load_descriptions(str(out), ["Confirm"]) == ["Description of Confirm by m."]


@pytest.mark.parametrize(
    "mode, pattern",
    [
        ("http500", r"HTTP 500.*boom"),
        ("badjson", r"malformed response"),
        ("nochoices", r"malformed response"),
        ("empty", r"empty answer"),
    ],
)
def test_generate_errors_name_label_and_endpoint(tmp_path, mode, pattern):
    out = tmp_path / "d.yaml"
    with FakeServer(mode) as srv:
        with pytest.raises(LabelGenerationError) as err:
            generate_descriptions(
                ["Refuse", "Invite"], endpoint=srv.base + "/v1", model="m", out=out,
                prompt_template=TEMPLATE, timeout=10,
            )
    msg = str(err.value)
    assert "'Refuse'" in msg, msg
    assert f"{srv.base}/v1/chat/completions" in msg, msg
    assert re.search(pattern, msg), msg
    assert not out.exists()
    assert not list((tmp_path / ".label_cache").glob("*.json"))


def test_generate_connection_refused(tmp_path):
    with FakeServer() as srv:
        base = srv.base
    with pytest.raises(LabelGenerationError, match="'Warn'.*request failed"):
        generate_descriptions(["Warn"], endpoint=base, model="m", out=tmp_path / "d.yaml", timeout=5)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amess")
    sub = parser.add_subparsers(dest="command")
    add_cli(sub)
    return parser


def test_cli_generate_end_to_end(tmp_path, monkeypatch, capsys):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# my set\nGreet\nLeave\n")
    out = tmp_path / "out" / "descs.yaml"
    cache = tmp_path / "cache"
    monkeypatch.setenv("MY_KEY", "sk-cli")
    with FakeServer() as srv:
        argv = [
            "labels", "generate", "--labels", str(labels_file), "--endpoint", srv.base + "/v1",
            "--model", "cli-llm", "--out", str(out), "--cache-dir", str(cache),
            "--api-key-env", "MY_KEY", "--temperature", "0.3",
        ]
        args = _parser().parse_args(argv)
        assert callable(args.func)
        assert args.func(args) == 0
        assert len(srv.requests) == 2 and not srv.errors
        assert srv.requests[0]["auth"] == "Bearer sk-cli"
        assert srv.requests[0]["body"]["temperature"] == 0.3
        assert len(list(cache.glob("*.json"))) == 2
        assert load_descriptions(str(out), ["Greet", "Leave"]) == [
            "Description of Greet by cli-llm.", "Description of Leave by cli-llm."
        ]
        assert "wrote 2 descriptions" in capsys.readouterr().out

        # rerun: cached
        args = _parser().parse_args(argv)
        assert args.func(args) == 0
        assert len(srv.requests) == 2

    # unset key variable -> exit code 2, nothing sent
    args = _parser().parse_args(argv[:-4] + ["--api-key-env", "NOT_SET_VAR"])
    assert args.func(args) == 2
    assert "NOT_SET_VAR" in capsys.readouterr().err


def test_cli_generate_error_exit_code(tmp_path, capsys):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("Greet\n")
    with FakeServer("http500") as srv:
        args = _parser().parse_args([
            "labels", "generate", "--labels", str(labels_file), "--endpoint", srv.base,
            "--model", "m", "--out", str(tmp_path / "o.yaml"),
        ])
        assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "'Greet'" in err and "HTTP 500" in err


def test_cli_show_and_bare_labels(capsys):
    args = _parser().parse_args(["labels", "show", "--set", "mintrec2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "Asking for opinions:" in out and "claude" in out

    args = _parser().parse_args(["labels", "show", "--set", "no_such_set"])
    assert args.func(args) == 2

    args = _parser().parse_args(["labels"])
    assert args.func(args) == 2
