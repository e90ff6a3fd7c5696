"""SDIF-DA: settings, shapes, masks, the augmented rows, the offline augmentation against a
local stub endpoint, and runs through the one loop."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from torch import nn

from amess.cli import main
from amess.config import Config, field_docs
from amess.data.augment import augment_samples, parse_paraphrases, read_augmented
from amess.data.batch import Collator, Sample
from amess.models import METHODS, build_model
from amess.models.sdif_da import ParaphraseRows, SdifDaSettings

DV, DA = 7, 5  # feature sizes of the unit tests: nothing may assume 256 / 768


@pytest.fixture(scope="module")
def pooler_dir(tmp_path_factory, tiny_encoder_dir):
    """The tiny BERT (hidden 32) with a pooler, which SDIF's text representation reads; no
    dropout, so that training-mode outputs can be compared."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_pooler")
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def encoder(pooler_dir):
    from amess.models.encoders import load_text_encoder

    return load_text_encoder(str(pooler_dir), parts=("pooler",))


def make_model(encoder, *, video=DV, audio=DA, C=4, **settings):
    torch.manual_seed(0)
    settings = {"cross_heads": 4, **settings}
    cfg = Config().override({"model.method": "sdif_da", **{f"sdif_da.{k}": v for k, v in settings.items()}})
    return build_model("sdif_da", config=cfg, encoder=encoder, num_labels=C, video_dim=video, audio_dim=audio)


def make_samples(video_lens=(3, 0, 5, 2), audio_lens=(4, 6, 1, 3), *, video=DV, audio=DA, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda n, d: rng.standard_normal((n, d)).astype(np.float32) if n and d else None  # noqa: E731
    return [Sample(id=f"s{i}", text=f"utterance number {i} " + "word " * i, label=i % 4, video=f(nv, video),
                   audio=f(na, audio)) for i, (nv, na) in enumerate(zip(video_lens, audio_lens))]


def collate(encoder, samples, *, video=DV, audio=DA, hook=None):
    return Collator(encoder.tokenizer, text_max_len=16, video_dim=video or None, audio_dim=audio or None,
                    hook=hook)(samples)


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return model


def test_registered_and_every_setting_shown(capsys):
    cls = METHODS["sdif_da"]
    assert cls.Settings is SdifDaSettings and cls.encoder_parts == ("pooler",)
    assert main(["methods", "show", "sdif_da"]) == 0
    shown = capsys.readouterr().out
    docs = field_docs(SdifDaSettings)
    for f in dataclasses.fields(SdifDaSettings):
        assert f"{f.name} = {f.default!r}" in shown and docs[f.name] in shown, f.name
    s = SdifDaSettings()  # configs/sdif.py (MIntRec, 20 intents)
    got = (s.self_layers, s.cross_layers, s.self_heads, s.cross_heads, s.dropout, s.cross_dropout)
    assert got == (1, 1, 8, 12, 0.2, 0.3)
    with pytest.raises(ValueError, match="sdif_da.cross_dropout"):
        SdifDaSettings(cross_dropout=1.0)


def test_forward_shapes_masks_and_wrong_subsets(encoder):
    for video, audio, r in ((DV, DA, 6), (DV, 0, 4), (0, DA, 4)):
        model = make_model(encoder, video=video or None, audio=audio or None).eval()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        out = model(collate(encoder, make_samples(video=video, audio=audio), video=video, audio=audio))
        assert out.logits.shape == (4, 4) and out.pooled.shape == (4, r * 32 // 2) and out.augmented is None
    # audio as wide as the text is not projected (the reference); any other width is
    assert isinstance(make_model(encoder, audio=32).to_text["audio"], nn.Identity)
    assert isinstance(make_model(encoder).to_text["audio"], nn.Linear)

    model = make_model(encoder).eval()
    batch = collate(encoder, make_samples())
    with torch.no_grad():
        ref = model(batch)
        padded = dataclasses.replace(batch)
        for name in ("video", "audio"):  # 9 more frames of garbage, masked out
            x, m = getattr(batch, name), getattr(batch, f"{name}_mask")
            setattr(padded, name, torch.cat([x, 1e3 * torch.randn(x.shape[0], 9, x.shape[2])], 1))
            setattr(padded, f"{name}_mask", torch.cat([m, torch.zeros(m.shape[0], 9, dtype=torch.bool)], 1))
        got = model(padded)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled, ref.pooled, atol=1e-5, rtol=1e-5)

    # no sample with video, one without audio: finite outputs, loss and gradients
    model.train()
    batch = collate(encoder, make_samples(video_lens=(0, 0, 0, 0), audio_lens=(0, 2, 3, 1)))
    loss, parts = model.loss(model(batch), batch)
    loss.backward()
    assert math.isfinite(loss.item()) and set(parts) == {"ce"}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    no_audio = dataclasses.replace(collate(encoder, make_samples()), audio=None, audio_mask=None)
    assert torch.isfinite(model.eval()(no_audio).logits).all()

    with pytest.raises(ValueError, match="method 'sdif_da' needs text and at least one of video and audio"):
        make_model(encoder, video=None, audio=None)
    with pytest.raises(ValueError, match="sdif_da.cross_heads=12 must divide the hidden size 32"):
        make_model(encoder, cross_heads=12)


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(encoder):
    model = make_model(encoder).train()
    batch = collate(encoder, make_samples(video_lens=(3, 0, 5, 2, 4, 1), audio_lens=(4, 6, 1, 3, 2, 5)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, _ = model.loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# ----- augmented rows ---------------------------------------------------------------------

def test_augmented_rows_reuse_their_source_features_in_training_only(encoder, tmp_path):
    table = {"s1": ["a paraphrase of the second one"], "s2": ["the third, said otherwise", "third again, longer "
                                                                "than the source by a good many words"]}
    hook = ParaphraseRows(table, encoder.tokenizer, text_max_len=16, per_sample=2)
    samples = make_samples()
    batch = collate(encoder, samples, hook=hook)
    assert batch.extras["aug_valid"].tolist() == [[False, False], [True, False], [True, True], [False, False]]
    assert batch.extras["aug_input_ids"].shape[:2] == (4, 2)

    model = no_dropout(make_model(encoder, augmented_tsv=str(tmp_path / "aug.tsv"))).train()
    out = model(batch)
    assert out.logits.shape == (4, 4) and out.augmented.logits.shape == (3, 4)
    assert out.augmented.labels.tolist() == [1, 2, 2]  # the source rows' labels
    # each augmented row = the model on the paraphrase with its source row's video and audio
    s2 = samples[2]
    alone = collate(encoder, [dataclasses.replace(samples[1], text=table["s1"][0])]
                    + [dataclasses.replace(s2, text=t) for t in table["s2"]])
    with torch.no_grad():
        want = model.eval()(alone).logits  # plain rows (s1's paraphrase, then s2's two)
    got = out.augmented.logits
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    close = lambda x, y: torch.allclose(x, y, atol=1e-5, rtol=1e-5)  # noqa: E731  s2's two, in either order
    assert close(got[1:], want[1:]) or close(got[1:], want[[2, 1]])
    torch.testing.assert_close(out.logits, model.eval()(batch).logits, atol=1e-5, rtol=1e-5)  # own rows unchanged
    model.train()
    loss, parts = model.loss(out, batch)
    union = torch.nn.functional.cross_entropy(torch.cat([out.logits, out.augmented.logits]),
                                              torch.cat([batch.labels, out.augmented.labels]))
    assert loss.item() == pytest.approx(union.item(), rel=1e-6)
    assert parts["aug_rows"] == 3.0 and {"ce", "ce_aug"} <= set(parts)

    model.eval()
    assert model(batch).augmented is None  # evaluation never sees them
    model.train()
    with pytest.raises(ValueError, match="aug.tsv.*holds no augmented rows"):
        model(collate(encoder, samples))  # the file named in the settings never reached the batch


def test_parse_paraphrases():
    answer = ('Here are 3 paraphrases:\n1. "Can you give me a hand?"\n2) could you help me out\n'
              "- Can you give me a hand?\n\n* Help me, please.\tNow\n4. one too many")
    assert parse_paraphrases(answer, "Can you help me?", 3) == [
        "Can you give me a hand?", "could you help me out", "Help me, please. Now"]
    assert parse_paraphrases('["one way", "another way"]', "src", 5) == ["one way", "another way"]
    assert parse_paraphrases("Can you help me?\n", "can you help me", 2) == []  # only the source again


# ----- the offline augmentation, against a local stub endpoint -------------------------------

class StubLLM:
    """A local OpenAI chat-completions endpoint. `faults`: utterance -> list of modes, one used
    per request for that utterance (`http500`, `badjson`, `nochoices`, `empty`, `copy`);
    `down`: every request fails with HTTP 503."""

    def __init__(self, faults=None, down=False):
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.down = down
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                prompt = body["messages"][-1]["content"]
                text = re.search(r"Utterance: (.*)", prompt).group(1)
                n = int(re.search(r"Write (\d+) different", prompt).group(1))
                mode = "down" if outer.down else (outer.faults.get(text) or ["ok"]).pop(0)
                if mode in ("down", "http500"):
                    return self._send(503 if mode == "down" else 500, b'{"error": {"message": "boom"}}')
                if mode == "badjson":
                    return self._send(200, b"{not json")
                if mode == "nochoices":
                    return self._send(200, b'{"choices": []}')
                content = {"empty": " ", "copy": text}.get(mode) or "Sure:\n" + "\n".join(
                    f'{k}. "{text} (version {k})"' for k in range(1, n + 1))
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                return self._send(200, json.dumps(reply).encode())

            def _send(self, code, payload):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


ROWS = [Sample(id=f"u{i}", text=f"utterance {i} here", label=i % 3) for i in range(6)] + [
    Sample(id="oos", text="out of scope", label=3)]
NAMES = ["Greet", "Leave", "Thank"]


def test_augment_writes_rows_with_source_ids_caches_and_survives_faults(tmp_path):
    out = tmp_path / "aug" / "aug.tsv"
    faults = {"utterance 1 here": ["http500"] * 3, "utterance 2 here": ["badjson"], "utterance 4 here": ["copy"] * 3}
    with StubLLM(faults) as srv:
        rep = augment_samples(ROWS, NAMES, endpoint=srv.base + "/v1", model="stub", out=out, n=2, api_key="sk-x",
                              retries=2, backoff=0.0, progress=False)
        assert all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sk-x" for r in srv.requests)
        assert srv.requests[0]["body"]["model"] == "stub" and srv.requests[0]["body"]["temperature"] == 1.0
        assert '"Greet"' in srv.requests[0]["body"]["messages"][-1]["content"]
        # u1: 3 HTTP 500s; u2: malformed once, then answered; u4: only copies of the source
        assert rep.failed == ["u1", "u4"] and not rep.stopped_early and not rep.complete
        assert rep.requests == 1 + 3 + 2 + 1 + 3 + 1 and rep.sources == 6  # the oos row is not sent
        table = read_augmented(out)
        assert sorted(table) == ["u0", "u2", "u3", "u5"]
        assert table["u2"] == ["utterance 2 here (version 1)", "utterance 2 here (version 2)"]
        lines = out.read_text().splitlines()
        assert lines[0] == "id\tsource_id\tlabel\ttext" and lines[1].startswith("u0#aug1\tu0\tGreet\t")
        prov = json.loads((out.parent / "aug.tsv.json").read_text())
        assert prov["model"] == "stub" and prov["n"] == 2 and prov["failed"] == ["u1", "u4"]
        assert prov["endpoint"] == srv.base.removeprefix("http://") and "sk-x" not in out.read_text()
        assert "{text}" in prov["prompt"] and prov["rows"] == 8
        assert len(list((out.parent / ".augment_cache").glob("*.json"))) == 4

    # rerun against a healthy endpoint: only the two failed utterances are asked again
    with StubLLM() as srv:
        rep = augment_samples(ROWS, NAMES, endpoint=srv.base, model="stub", out=out, n=2, progress=False)
        assert rep.requests == 2 and rep.cached == 4 and rep.complete
        assert sorted(read_augmented(out)) == ["u0", "u1", "u2", "u3", "u4", "u5"]
        rep = augment_samples(ROWS, NAMES, endpoint=srv.base, model="stub", out=out, n=2, progress=False)
        assert rep.requests == 0 and rep.cached == 6 and len(srv.requests) == 2  # all cached: nothing sent


def test_augment_stops_early_when_the_endpoint_is_down(tmp_path):
    out = tmp_path / "aug.tsv"
    with StubLLM(down=True) as srv:
        rep = augment_samples(ROWS, NAMES, endpoint=srv.base, model="stub", out=out, retries=1, backoff=0.0,
                              max_consecutive_failures=2, progress=False)
        assert len(srv.requests) == 4
    assert rep.stopped_early and rep.failed == ["u0", "u1"] and rep.rows == 0
    assert json.loads((tmp_path / "aug.tsv.json").read_text())["not_reached"] == 4
    with StubLLM() as srv:  # connection refused once the server is gone
        base = srv.base
    rep = augment_samples(ROWS[:1], NAMES, endpoint=base, model="stub", out=out, retries=0, progress=False)
    assert rep.failed == ["u0"]


# ----- the one loop ------------------------------------------------------------------------

FAST = ["--set", "sdif_da.cross_heads=4"]


def _train(out, data_dir, enc, *extra):
    return main(["train", "--data-dir", str(data_dir), "--method", "sdif_da", "--text-encoder", str(enc),
                 "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--no-progress", "--set",
                 "train.plots=false", "--out", str(out), *FAST, *extra])


def test_cli_augment_then_train_with_it_then_predict_without_it(tmp_path, synth_dir, pooler_dir, caplog, capsys,
                                                              monkeypatch):
    from amess import load_run
    from amess.data.safe_pickle import safe_load
    from amess.models.sdif_da import SDIFDA

    aug = tmp_path / "aug.tsv"
    with StubLLM() as srv:
        rc = main(["data", "augment", "--data-dir", str(synth_dir), "--endpoint", srv.base + "/v1", "--model", "stub",
                   "--n", "2", "--out", str(aug), "--no-progress"])
        assert rc == 0 and "wrote" in capsys.readouterr().out
        n_train = len((synth_dir / "train.tsv").read_text().splitlines()) - 1
        assert len(srv.requests) == n_train
    table = read_augmented(aug)
    train_ids = {"_".join(r.split("\t")[:3]) for r in (synth_dir / "train.tsv").read_text().splitlines()[1:]}
    assert set(table) == train_ids and all(len(v) == 2 for v in table.values())
    assert json.loads((tmp_path / "aug.tsv.json").read_text())["dataset"] == "mintrec"

    seen = []
    loss = SDIFDA.loss

    def spy(self, out, batch):
        seen.append(len(batch) if out.augmented is None else (len(batch), out.augmented.logits.shape[0]))
        return loss(self, out, batch)

    monkeypatch.setattr(SDIFDA, "loss", spy)
    out = tmp_path / "run"
    assert _train(out, synth_dir, pooler_dir, "--set", f"sdif_da.augmented_tsv={aug}") == 0
    assert seen == [(8, 8), (8, 8)]  # one paraphrase of each of the 8 rows, in both steps
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert spec["settings"]["augmented_tsv"] == str(aug) and spec["encoder"]["parts"] == ["pooler"]
    m = json.loads((out / "seed_0" / "metrics.json").read_text())
    assert m["steps"] == 2 and math.isfinite(m["history"][0]["train_loss"])

    aug.unlink()  # a trained run predicts without the augmentation file
    rows = [line.split("\t") for line in (synth_dir / "test.tsv").read_text().splitlines()[1:3]]
    ids = ["_".join(r[:3]) for r in rows]
    video = safe_load(synth_dir / "video_data" / "video_feats.pkl")
    audio = safe_load(synth_dir / "audio_data" / "audio_feats.pkl")
    preds = load_run(out).predict([r[3] for r in rows], video=[None, np.concatenate(video[ids[1]], 0)],
                                  audio=[audio[i] for i in ids])
    assert len(preds) == 2 and preds[0].ranked
    caplog.clear()
    assert _train(tmp_path / "run2", synth_dir, pooler_dir, "--set", f"sdif_da.augmented_tsv={aug}") == 2
    assert "aug.tsv" in caplog.text and "holds no augmented rows" in caplog.text


def test_mintrec2_with_ood_detectors_and_outlier_exposure(tmp_path, pooler_dir):
    from amess.data.synth import generate_mintrec2

    data = tmp_path / "mintrec2"
    generate_mintrec2(data, seed=0, size=200)
    out = tmp_path / "run"
    dets = ["msp", "maxlogit", "energy", "mahalanobis", "doc"]
    assert _train(out, data, pooler_dir, "--dataset", "mintrec2", "--ood-detector", *dets, "--outlier-exposure") == 0
    m = json.loads((out / "seed_0" / "metrics.json").read_text())
    assert set(m["metrics"]["test"]["ood"]) == set(dets)
    with np.load(out / "seed_0" / "outputs_test.npz") as z:
        assert z["pooled"].shape[1] == 3 * 32 and np.isfinite(z["pooled"]).all()


def test_binary_task_with_text_and_video_from_the_store(tmp_path, synth_dir, pooler_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    out = tmp_path / "bin"
    assert _train(out, data, pooler_dir, "--task", "binary", "--modalities", "text,video",
                  "--feature-store", "auto") == 0
    spec = json.loads((out / "seed_0" / "model_spec.json").read_text())
    assert spec["label_names"] == ["Emotion", "Goal"] and spec["modalities"] == ["text", "video"]
