"""`amess extract` and its parts on clips made here (espeak-ng speech over a moving face):
decoding, Whisper frames and ASR, dlib faces and the speaker rule, the custom layout it
writes (accepted by `amess data check` and `amess train`), resuming, provenance, errors,
the Hugging Face paths with tiny random models, and `amess predict --clip`."""

from __future__ import annotations

import json
import pickle
import tracemalloc

import numpy as np
import pytest

from clipmaker import UTTERANCES, clip_set, extracted, make_clip, missing_tools

pytest.importorskip("av")
pytest.importorskip("faster_whisper")
pytest.importorskip("dlib")
if missing_tools():
    pytest.skip(f"needs Debian's {', '.join(missing_tools())} (make test installs them)", allow_module_level=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "clips_shared"


def test_decode_resamples_to_16k_and_samples_frames(root, tmp_path):
    from amess.extract.media import SAMPLE_RATE, load_clip

    clip = load_clip(clip_set(root) / "clips" / "c1.mp4")
    assert clip.id == "c1" and clip.has_video
    assert abs(clip.audio.shape[0] / SAMPLE_RATE - clip.duration) < 0.15
    frames = list(clip.frames(fps=4, max_side=120))
    assert abs(len(frames) - clip.duration * 4) <= 1.5
    t, img = frames[1]
    assert 0.2 <= t <= 0.35 and img.shape == (120, 120, 3) and img.dtype == np.uint8
    odd = make_clip(tmp_path / "odd.mp4", None, seconds=0.5, size=360)  # 1080-byte rows: padded when decoded
    assert all(img.flags.c_contiguous for _, img in load_clip(odd).frames(fps=4, max_side=640))


def test_wav_has_no_video_and_garbage_is_one_clear_error(tmp_path):
    from amess.extract.media import MediaError, load_clip

    wav = make_clip(tmp_path / "w.wav", "hello")
    clip = load_clip(wav)
    assert not clip.has_video and list(clip.frames(4, 640)) == [] and clip.audio.shape[0] > 8000
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"#!/bin/sh\necho not a video\n")
    with pytest.raises(MediaError, match=r"bad\.mp4: not a readable audio or video file"):
        load_clip(bad)


def test_whisper_frames_at_50_per_second_and_asr(root):
    from amess.extract import get_extractor, load_clip

    clip = load_clip(clip_set(root) / "clips" / "c2.mp4")
    enc = get_extractor("audio", "whisper", threads=2)
    frames = enc.extract(clip)
    assert frames.shape == (int(np.ceil(clip.audio.shape[0] / 16000 * 50)), 384)
    assert np.isfinite(frames).all() and frames.std() > 0.1
    text = get_extractor("text", "whisper", threads=2).extract(clip)
    assert "thank you" in text.lower()
    rec = enc.describe()
    assert rec["name"] == "whisper" and rec["dim"] == 384 and len(rec["weights"]["sha256"]) == 64
    assert rec["versions"]["faster-whisper"]


def test_speaker_rule_prefers_the_mouth_that_follows_the_sound():
    from amess.extract.faces import Face, Track, choose_speaker

    times = np.arange(12) / 4
    audio = np.zeros(16000 * 3, np.float32)
    loud = [k for k in range(12) if k % 3 == 0]
    for k in loud:  # bursts of sound at every third sampled frame
        c = int(times[k] * 16000)
        audio[c - 1000:c + 1000] = 0.5
    talker = Track([Face(k, t, (0, 0, 40, 40), 0.08 if k in loud else 0.01) for k, t in enumerate(times)])
    bigger = Track([Face(k, t, (50, 0, 150, 100), 0.02 + 0.01 * (k % 2)) for k, t in enumerate(times)])
    assert choose_speaker([bigger, talker], audio, 0.25) is talker
    still = [Track([Face(k, t, (0, 0, 40, 40), 0.03) for k, t in enumerate(times[:5])]),
             Track([Face(k, t, (50, 0, 90, 40), 0.03) for k, t in enumerate(times)])]
    assert choose_speaker(still, audio, 0.25) is still[1]  # nobody's mouth moves: the longest track
    assert choose_speaker([], audio, 0.25) is None


def test_streaming_pickle_is_plain_and_bounded(tmp_path):
    from amess.data.safe_pickle import safe_load
    from amess.extract.pipeline import write_feature_pickle

    def items():
        for i in range(40):
            yield f"s{i}", np.full((300, 256), i, np.float32)  # 300 KB each, 12 MB in all

    write_feature_pickle(tmp_path / "warm.pkl", [])  # its imports are not what is measured
    tracemalloc.start()
    n = write_feature_pickle(tmp_path / "f.pkl", items())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 40 and peak < 3 * 2**20
    for loaded in (safe_load(tmp_path / "f.pkl"), pickle.loads((tmp_path / "f.pkl").read_bytes())):
        assert list(loaded) == [f"s{i}" for i in range(40)] and loaded["s7"].shape == (300, 256)
        assert float(loaded["s7"][0, 0]) == 7.0


def test_extract_writes_the_custom_layout_that_check_accepts(root, capsys):
    from amess.cli import main
    from amess.data.safe_pickle import safe_load

    data = extracted(root)
    assert (data / "labels.txt").read_text().split() == ["help", "thank"]
    rows = {s: (data / f"{s}.tsv").read_text().splitlines() for s in ("train", "dev", "test")}
    assert rows["train"][0] == "id\ttext\tlabel" and rows["train"][1].startswith("c1\t")
    assert rows["train"][1].endswith("\thelp") and "help me" in rows["train"][1].lower()
    video, audio = safe_load(data / "video.pkl"), safe_load(data / "audio.pkl")
    assert sorted(video) == sorted(audio) == sorted(UTTERANCES)
    assert video["c4"].shape == (0, 128)  # no face in that clip: no frames
    assert 3 <= video["c1"].shape[0] <= 6 and video["c1"].shape[1] == 128
    assert audio["c1"].shape[1] == 384 and 100 < audio["c1"].shape[0] < 140
    rec = json.loads((data / "extraction.json").read_text())
    assert {m: r["name"] for m, r in rec["extractors"].items()} == {"audio": "whisper", "video": "dlib",
                                                                      "text": "whisper"}
    assert rec["extractors"]["video"]["settings"]["fps"] == 2.0 and rec["clips_without_face"] == 1
    capsys.readouterr()
    assert main(["data", "check", "--dataset", "custom", "--data-dir", str(data)]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_extract_resumes_after_an_interruption(root, tmp_path, monkeypatch):
    import amess.extract.pipeline as pipeline
    from amess.extract import extract_dataset, get_extractor

    src = clip_set(root)
    kw = dict(extractors={"audio": get_extractor("audio", "whisper", threads=2)}, transcripts=src / "transcripts.tsv",
              labels=src / "labels.tsv", progress=False)
    real = pipeline.extract_clip

    def dies_on_c3(path, *a, **k):
        if path.stem == "c3":
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(pipeline, "extract_clip", dies_on_c3)
    with pytest.raises(KeyboardInterrupt):
        extract_dataset([src / "clips"], tmp_path / "d", **kw)
    assert not (tmp_path / "d" / "extraction.json").exists()
    monkeypatch.setattr(pipeline, "extract_clip", real)
    s = extract_dataset([src / "clips"], tmp_path / "d", **kw)
    assert (s.cached, s.extracted, s.clips) == (2, 2, 4)
    assert "c3\tplease help me move this table\thelp" in (tmp_path / "d" / "dev.tsv").read_text()
    assert not (tmp_path / "d" / "video.pkl").exists()
    assert extract_dataset([src / "clips"], tmp_path / "d", **kw).extracted == 0  # nothing left to do
    with pytest.raises(ValueError, match="extracted before with other extractors"):
        extract_dataset([src / "clips"], tmp_path / "d", **{**kw, "extractors": {
            "audio": get_extractor("audio", "whisper", threads=2, window="30s")}})


def test_extract_input_errors_name_the_file(root, tmp_path, caplog):
    from amess.cli import main

    src = clip_set(root)
    (tmp_path / "t.tsv").write_text("id\ttext\nc1\thello\n")
    args = ["extract", "--clips", str(src / "clips"), "--video-extractor", "none", "--no-progress",
            "--out", str(tmp_path / "o")]
    assert main(args + ["--transcripts", str(tmp_path / "t.tsv")]) == 2
    assert "t.tsv: 3 clip(s) without a transcript, e.g. ['c2', 'c3', 'c4']" in caplog.text
    (tmp_path / "l.tsv").write_text("clip\tintent\n")
    assert main(args + ["--asr", "--labels", str(tmp_path / "l.tsv")]) == 2
    assert "l.tsv: line 1: expected a header with the columns ['id', 'label']" in caplog.text
    assert main(args) == 2
    assert "give --transcripts TSV (columns id, text) or --asr" in caplog.text
    assert main(args + ["--asr", "--audio-extractor", "wav2vec"]) == 2
    assert "unknown audio extractor 'wav2vec'; known: ['hf', 'whisper']" in caplog.text


# --- the Hugging Face paths, with tiny random-initialised models saved as folders ------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    import torch
    from transformers import SwinConfig, SwinModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    d = tmp_path_factory.mktemp("tiny_hf")
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                 conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
                  ).save_pretrained(d / "wav2vec2")
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(d / "wav2vec2")
    SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                         window_size=4)).save_pretrained(d / "swin")
    return d


def test_hf_speech_and_vision_backbones_by_folder(root, tiny_hf, tmp_path):
    from amess.cli import main
    from amess.data.safe_pickle import safe_load

    src = clip_set(root)
    out = tmp_path / "hf_data"
    rc = main(["extract", "--clips", str(src / "clips" / "c1.mp4"), str(src / "clips" / "c4.mp4"),
               "--transcripts", str(src / "transcripts.tsv"), "--audio-extractor", f"hf:{tiny_hf / 'wav2vec2'}",
               "--video-extractor", f"hf:{tiny_hf / 'swin'}", "--fps", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    audio, video = safe_load(out / "audio.pkl"), safe_load(out / "video.pkl")
    seconds = (src / "clips" / "c1.mp4").stat().st_size and audio["c1"].shape[0] / 50
    assert audio["c1"].shape[1] == 32 and 1.8 < seconds < 3.0  # ~50 frames per second
    assert video["c1"].shape[1] == 16 and video["c1"].shape[0] >= 3 and video["c4"].shape == (0, 16)
    rec = json.loads((out / "extraction.json").read_text())["extractors"]
    assert rec["audio"]["name"] == "hf" and rec["audio"]["preprocessing"] == "Wav2Vec2FeatureExtractor"
    assert rec["video"]["preprocessing"] == "built-in" and len(rec["video"]["weights"]["sha256"]) == 64
    assert rec["text"] == {"modality": "text", "name": "tsv", "file": "transcripts.tsv"}


# --- predict from clips -----------------------------------------------------------------------

def test_predict_clip_with_the_runs_extractors(root, tiny_encoder_dir, tmp_path, capsys):
    from amess.cli import main
    from clipmaker import trained_run

    run = trained_run(root, tiny_encoder_dir)
    spec = json.loads((run / "seed_0" / "model_spec.json").read_text())
    assert spec["features"]["audio"]["extractor"]["extractors"]["audio"]["name"] == "whisper"
    capsys.readouterr()
    assert main(["predict", str(run), "--clip", str(clip_set(root) / "clips" / "c3.mp4"), "--json"]) == 0
    [r] = json.loads(capsys.readouterr().out)
    assert r["id"] == "c3" and "move this table" in r["text"].lower()
    assert {x["intent"] for x in r["ranked"]} == {"help", "thank"}
    assert abs(sum(x["probability"] for x in r["ranked"]) - 1) < 1e-4
    assert set(r["out_of_scope"]) == {"msp"} and isinstance(r["anchors"], list) and r["anchors"]
    csv_out = tmp_path / "p.csv"
    assert main(["predict", str(run), "--clips", str(clip_set(root) / "clips" / "c4.mp4"), "--out", str(csv_out)]) == 0
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "id,clip,transcript,intent,probability,oos_msp,anchors" and lines[1].startswith("c4,")


def test_predict_refuses_another_extractors_features(root, tiny_encoder_dir, tmp_path, caplog):
    import shutil

    from amess.cli import main
    from clipmaker import trained_run

    run = trained_run(root, tiny_encoder_dir)
    spec = json.loads((run / "seed_0" / "model_spec.json").read_text())
    audio_rec = spec["features"]["audio"]["extractor"]["extractors"]["audio"]
    np.save(tmp_path / "a.npy", np.zeros((50, 384), np.float32))
    other = {**audio_rec, "name": "hf", "settings": {"model": "microsoft/wavlm-base-plus", "layer": -1,
                                                      "chunk_seconds": 30.0}, "weights": {"name": "wavlm"}}
    (tmp_path / "a.npy.json").write_text(json.dumps(other))
    assert main(["predict", str(run), "--text", "help me", "--audio", str(tmp_path / "a.npy")]) == 2
    assert "this run's audio features were made by whisper (model=packaged:whisper-tiny.en" in caplog.text
    assert "a.npy come from hf (model=microsoft/wavlm-base-plus" in caplog.text
    # a run whose recorded weights are not the ones installed here
    bad = tmp_path / "bad_run"
    shutil.copytree(run / "seed_0", bad)
    audio_rec["weights"]["sha256"] = "0" * 64
    (bad / "model_spec.json").write_text(json.dumps(spec))
    caplog.clear()
    assert main(["predict", str(bad), "--clip", str(clip_set(root) / "clips" / "c1.mp4")]) == 2
    assert "weights 000000000000" in caplog.text and "the audio extractor available here" in caplog.text


@pytest.mark.parametrize("arch", ["wavlm", "hubert"])
def test_hf_speech_other_architectures_and_missing_model(root, tmp_path, arch):
    import torch
    import transformers

    from amess.extract import ExtractorError, get_extractor, load_clip

    cfg_cls, model_cls = {"wavlm": ("WavLMConfig", "WavLMModel"), "hubert": ("HubertConfig", "HubertModel")}[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=37, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=2, num_buckets=8, max_bucket_distance=20)
    getattr(transformers, model_cls)(cfg).save_pretrained(tmp_path / arch)
    ext = get_extractor("audio", f"hf:{tmp_path / arch}")
    clip = load_clip(clip_set(root) / "clips" / "c2.mp4")
    frames = ext.extract(clip)
    assert frames.shape[1] == 32 and abs(frames.shape[0] - clip.duration * 50) < 3
    assert ext.describe()["preprocessing"] == "built-in"
    with pytest.raises(ExtractorError, match=r"nowhere: cannot load a Hugging Face model"):
        get_extractor("audio", f"hf:{tmp_path / 'nowhere'}").extract(clip)
