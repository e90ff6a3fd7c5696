"""Hugging Face backbones, by hub name (for users with a network) or a local folder.

- `audio: hf` — any speech model with a `last_hidden_state` (wav2vec 2.0, WavLM, HuBERT,
  data2vec-audio): the last (or `layer`-th) hidden state, about 50 frames per second for the
  convolutional front-ends of these models. Audio is fed in windows of `chunk_seconds` so
  memory stays bounded on long clips.
- `video: hf` — any vision backbone (Swin, ViT, ConvNeXt, ...) on the speaker's face crop
  (found as in `amess.extract.faces`), enlarged by `margin`: its pooled output, or the mean
  of its last hidden state when it has no pooler.

Preprocessing comes from the model's own feature extractor / image processor when the
folder or hub entry has one; otherwise (e.g. a random-initialised test model) audio is
normalised to zero mean and unit variance, and crops are resized to the config's
`image_size` and normalised with the ImageNet mean and std. The record says which.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from amess.extract.faces import FaceSettings, SpeakerFaceExtractor
from amess.extract.media import SAMPLE_RATE, Clip
from amess.extract.registry import Extractor, ExtractorError, folder_weights, register_extractor

log = logging.getLogger(__name__)

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@lru_cache(maxsize=4)
def _load(model: str, kind: str):
    """(model in eval mode, its preprocessor or None)."""
    try:
        import transformers
    except ImportError:
        raise ExtractorError("hf extractors need transformers") from None
    try:
        net = transformers.AutoModel.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ExtractorError(f"{model}: cannot load a Hugging Face model ({e}); expected a hub name or a folder "
                             "with config.json and weights") from None
    net.eval()
    pre = None
    try:
        if kind == "audio":
            pre = transformers.AutoFeatureExtractor.from_pretrained(model)
        else:
            pre = transformers.AutoImageProcessor.from_pretrained(model, use_fast=False)
    except (OSError, ValueError, ImportError) as e:
        log.info("%s: no usable preprocessor (%s); using the built-in one", model, str(e).splitlines()[0][:120])
    return net, pre


def _hf_weights(model: str) -> dict[str, Any]:
    p = Path(model).expanduser()
    if p.is_dir():
        return folder_weights(p, _WEIGHT_FILES)
    net, _ = _load(model, "any")
    return {"name": model, "revision": getattr(net.config, "_commit_hash", None)}


class _HFBase(Extractor):
    packages = ("transformers", "torch")
    main_setting = "model"
    _kind = "audio"

    @property
    def net(self):
        return _load(self.settings.model, self._kind)[0]

    @property
    def preprocessor(self):
        return _load(self.settings.model, self._kind)[1]

    def weights(self) -> dict[str, Any]:
        return _hf_weights(self.settings.model)

    def describe(self) -> dict[str, Any]:
        rec = super().describe()
        rec["preprocessing"] = type(self.preprocessor).__name__ if self.preprocessor is not None else "built-in"
        return rec


@dataclass
class HFAudioSettings:
    model: str = "microsoft/wavlm-base-plus"
    """hub name or local folder of a speech model (wav2vec 2.0, WavLM, HuBERT, ...)"""
    layer: int = -1
    """hidden state taken: -1 is the last"""
    chunk_seconds: float = 30.0
    """audio is encoded in windows of this length"""


@register_extractor("audio", "hf")
class HFSpeech(_HFBase):
    """A speech model's hidden states, (frames, hidden) at ~50 frames per second."""

    Settings = HFAudioSettings
    frame_rate = 50.0

    @property
    def dim(self) -> int:
        return int(self.net.config.hidden_size)

    def _inputs(self, wave: np.ndarray):
        import torch

        if self.preprocessor is not None:
            return self.preprocessor(wave, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        x = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
        return {"input_values": torch.from_numpy(x.astype(np.float32))[None]}

    def extract(self, clip: Clip) -> np.ndarray:
        import torch

        step = int(self.settings.chunk_seconds * SAMPLE_RATE)
        parts = []
        with torch.inference_mode():
            for start in range(0, clip.audio.shape[0], step):
                wave = clip.audio[start:start + step]
                if wave.shape[0] < 400:  # shorter than the first convolution's receptive field
                    continue
                out = self.net(**self._inputs(wave), output_hidden_states=self.settings.layer != -1)
                h = out.last_hidden_state if self.settings.layer == -1 else out.hidden_states[self.settings.layer]
                parts.append(h[0].float().numpy())  # (frames, hidden)
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


@dataclass
class HFVisionSettings(FaceSettings):
    model: str = "microsoft/swin-tiny-patch4-window7-224"
    """hub name or local folder of a vision backbone"""
    margin: float = 0.25
    """the face box is enlarged by this fraction of its size on each side (the speaker crop)"""
    batch_size: int = 16
    """crops per forward pass"""


@register_extractor("video", "hf")
class HFVisionCrop(SpeakerFaceExtractor, _HFBase):
    """A vision backbone's embedding of the speaker crop, per sampled frame."""

    Settings = HFVisionSettings
    packages = ("transformers", "torch", "dlib-bin", "face-recognition-models", "av")
    _kind = "image"

    @property
    def dim(self) -> int:
        cfg = self.net.config
        return int(getattr(cfg, "hidden_size", None) or cfg.hidden_sizes[-1])

    @property
    def image_size(self) -> int:
        size = getattr(self.net.config, "image_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def _payload(self, img, rect, shape, box):
        from PIL import Image

        l, t, r, b = box
        m = self.settings.margin
        dw, dh = (r - l) * m, (b - t) * m
        h, w = img.shape[:2]
        crop = img[max(0, int(t - dh)): min(h, int(b + dh)), max(0, int(l - dw)): min(w, int(r + dw))]
        s = self.image_size
        return np.asarray(Image.fromarray(crop).resize((s, s), Image.BILINEAR))  # (s, s, 3) uint8

    def _pixels(self, crops: list[np.ndarray]):
        import torch

        if self.preprocessor is not None:
            return self.preprocessor(images=crops, return_tensors="pt")["pixel_values"]
        x = (np.stack(crops).astype(np.float32) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD  # (n, s, s, 3)
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (n, 3, s, s)

    def _embed(self, payloads: list[np.ndarray]) -> np.ndarray:
        import torch

        rows = []
        with torch.inference_mode():
            for i in range(0, len(payloads), self.settings.batch_size):
                out = self.net(pixel_values=self._pixels(payloads[i:i + self.settings.batch_size]))
                pooled = getattr(out, "pooler_output", None)
                if pooled is None:
                    pooled = out.last_hidden_state.mean(1)
                rows.append(pooled.reshape(pooled.shape[0], -1).float().numpy())  # (n, dim)
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)
