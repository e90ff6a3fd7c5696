"""`amess serve`: the JSON API over a tiny run trained on extracted clips, the upload rules,
and the page itself in a real headless browser (Debian's chromium + chromedriver through
Selenium): type a text, upload a clip, read the result, keep a screenshot."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from clipmaker import clip_set, missing_tools, trained_run

pytest.importorskip("av")
pytest.importorskip("faster_whisper")
pytest.importorskip("dlib")
if missing_tools():
    pytest.skip(f"needs Debian's {', '.join(missing_tools())} (make test installs them)", allow_module_level=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "clips_shared"


@pytest.fixture(scope="module")
def server(root, tiny_encoder_dir):
    from amess.serve import make_server

    srv = make_server(trained_run(root, tiny_encoder_dir), port=0, max_upload_mb=1, threads=2)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    assert not srv.upload_dir.exists()


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _declare_only(server, path: str, length: int, headers: dict[str, str]) -> tuple[int, dict]:
    """Send only the headers of an upload of `length` bytes (the server must answer from them)."""
    import http.client

    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.putrequest("POST", path)
    for k, v in {**headers, "Content-Length": str(length)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_api_text_clip_and_upload_rules(server, root):
    assert server.server_address[0] == "127.0.0.1"
    with urllib.request.urlopen(server.url + "api/info", timeout=10) as r:
        info = json.loads(r.read())
    assert info["intents"] == ["help", "thank"] and info["clips"] is None and info["detectors"] == ["msp"]
    code, r = _post(server.url + "api/predict", json.dumps({"text": "please help me"}).encode(),
                    {"Content-Type": "application/json"})
    assert code == 200 and r["text"] == "please help me" and len(r["ranked"]) == 2 and "msp" in r["thresholds"]
    code, r = _post(server.url + "api/predict", b'{"txt": 1}', {"Content-Type": "application/json"})
    assert code == 400 and "non-empty text" in r["error"]
    clip = (clip_set(root) / "clips" / "c4.mp4").read_bytes()
    code, r = _post(server.url + "api/clip", clip, {"X-Filename": "c4.mp4"})
    assert code == 200 and r["source"] == "clip" and "kindness" in r["text"].lower()
    code, r = _declare_only(server, "/api/clip", 2 * 2**20, {"X-Filename": "big.mp4"})
    assert code == 413 and "expected 1 byte to 1 MiB" in r["error"]  # refused before a byte of it is read
    code, r = _post(server.url + "api/clip", b"#!/bin/sh\nrm -rf /\n", {"X-Filename": "x.sh"})
    assert code == 400 and "x.sh: expected a clip ending in" in r["error"]
    code, r = _post(server.url + "api/clip", b"not a video at all", {"X-Filename": "fake.mp4"})
    assert code == 400 and "not a readable audio or video file" in r["error"]
    assert list(server.upload_dir.iterdir()) == []  # every upload deleted after use


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,1000"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_page_in_a_headless_browser(server, root, tmp_path_factory):
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    artifacts = Path(os.environ.get("AMESS_TEST_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    b = _browser()
    try:
        wait = WebDriverWait(b, 60)
        b.get(server.url)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert "amess run, 2 intents" in b.find_element(By.ID, "run-info").text
        b.find_element(By.ID, "utterance").send_keys("can you help me move this table")
        b.find_element(By.ID, "predict-text").click()
        wait.until(EC.visibility_of_element_located((By.ID, "result")))
        assert b.find_element(By.ID, "transcript").text == "can you help me move this table"
        bars = b.find_elements(By.CSS_SELECTOR, "#bars .bar .intent")
        assert sorted(e.text for e in bars) == ["help", "thank"]
        assert b.find_elements(By.CSS_SELECTOR, "#transcript mark")  # anchor words highlighted
        assert b.find_element(By.CSS_SELECTOR, ".verdict[data-detector=msp]").text.startswith("msp: ")
        b.save_screenshot(str(artifacts / "serve_text.png"))
        b.find_element(By.ID, "clip").send_keys(str(clip_set(root) / "clips" / "c3.mp4"))
        b.find_element(By.ID, "predict-clip").click()
        wait.until(lambda d: d.find_element(By.ID, "result").get_attribute("data-source") == "clip")
        assert "move this table" in b.find_element(By.ID, "transcript").text.lower()
        assert b.find_element(By.ID, "status").text == ""
        b.save_screenshot(str(artifacts / "serve_clip.png"))
    finally:
        b.quit()
    assert (artifacts / "serve_clip.png").stat().st_size > 10_000
    assert list(server.upload_dir.iterdir()) == []
