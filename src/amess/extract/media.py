"""Decoding one clip with PyAV: its audio as 16 kHz mono float32 samples, and its video
frames sampled at a set rate (RGB, downscaled to a maximum side).

Clips are untrusted files: they are only ever decoded as media (nothing in them is run),
decoding stops at `max_seconds`, and an unreadable file raises one `MediaError` line naming
the file and what was expected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from amess.data.base import DataError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
"""Hz: every audio extractor (Whisper, wav2vec 2.0, WavLM, HuBERT) takes 16 kHz mono."""
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".ts")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".m4a", ".ogg", ".opus", ".aac")
MEDIA_SUFFIXES = VIDEO_SUFFIXES + AUDIO_SUFFIXES


class MediaError(DataError):
    """A clip that cannot be decoded; the message names the file and what was expected."""


def _av():
    try:
        import av
    except ImportError:
        raise MediaError("decoding clips needs PyAV: pip install 'amess[extract]'") from None
    return av


def _open(path: Path):
    av = _av()
    if not path.is_file():
        raise MediaError(f"{path}: no such file (expected an audio or video clip)")
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{path}: not a readable audio or video file ({e}); expected a media file "
                         f"ffmpeg decodes, e.g. {', '.join(MEDIA_SUFFIXES[:3])}, .wav") from None


@dataclass
class Clip:
    """One decoded clip. `audio` is the whole (bounded) waveform; frames are decoded on
    demand, one at a time, so memory does not grow with the video's length."""

    id: str
    path: Path
    audio: np.ndarray
    """(samples,) float32 in [-1, 1] at SAMPLE_RATE (empty when the file has no audio)."""
    duration: float
    """seconds (the longer of the audio and the video, at most max_seconds)."""
    has_video: bool
    max_seconds: float

    def frames(self, fps: float, max_side: int) -> Iterator[tuple[float, np.ndarray]]:
        """`(time in s, (h, w, 3) uint8 RGB)` for the first frame at or after each multiple of
        1/fps, downscaled so that its longer side is at most `max_side` pixels."""
        if not self.has_video:
            return
        av = _av()
        with _open(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            w, h = stream.codec_context.width, stream.codec_context.height
            scale = min(1.0, max_side / max(w, h)) if w and h else 1.0
            size = {"width": max(2, int(round(w * scale))) // 2 * 2,
                    "height": max(2, int(round(h * scale))) // 2 * 2} if scale < 1.0 else {}
            k = 0
            try:
                for frame in container.decode(stream):
                    t = float(frame.time) if frame.time is not None else k / fps
                    if t > self.max_seconds:
                        break
                    if t + 1e-6 < k / fps:
                        continue
                    # rows of a decoded frame may be padded (line alignment): dlib needs them contiguous
                    yield t, np.ascontiguousarray(frame.to_ndarray(format="rgb24", **size))
                    k = int(np.floor(t * fps + 1e-6)) + 1
            except av.FFmpegError as e:
                raise MediaError(f"{self.path}: video stream breaks off at {k / fps:.2f} s ({e})") from None


def load_clip(path: str | Path, *, clip_id: str | None = None, max_seconds: float = 120.0) -> Clip:
    """Decode a clip's audio (resampled to 16 kHz mono) and probe its video stream."""
    av = _av()
    path = Path(path)
    with _open(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        if video is None and not container.streams.audio:
            raise MediaError(f"{path}: holds neither an audio nor a video stream")
        has_video = video is not None and not _is_cover_art(video)
        audio = _decode_audio(path, container, max_seconds, av) if container.streams.audio else np.zeros(0, np.float32)
        duration = audio.shape[0] / SAMPLE_RATE
        if video is not None and video.duration is not None and video.time_base is not None:
            duration = max(duration, float(video.duration * video.time_base))
        elif container.duration:
            duration = max(duration, container.duration / 1e6)
    if duration > max_seconds:
        log.warning("%s: %.1f s long; only its first %.0f s are used (max_seconds)", path, duration, max_seconds)
    return Clip(id=clip_id or path.stem, path=path, audio=audio, duration=min(duration, max_seconds),
                has_video=bool(has_video), max_seconds=max_seconds)


def _is_cover_art(stream) -> bool:
    """An mp3's or m4a's embedded picture shows up as a one-frame video stream."""
    try:
        return bool(stream.disposition & type(stream.disposition).attached_pic)
    except (AttributeError, TypeError):
        return False


def _decode_audio(path: Path, container, max_seconds: float, av) -> np.ndarray:
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks, n, limit = [], 0, int(max_seconds * SAMPLE_RATE)
    try:
        for frame in container.decode(stream):
            frame.pts = None  # let the resampler count samples itself (gaps in pts upset it)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
                n += chunks[-1].shape[0]
            if n >= limit:
                break
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as e:
        raise MediaError(f"{path}: audio stream is not decodable ({e}); expected audio ffmpeg reads") from None
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return np.clip(audio[:limit], -1.0, 1.0).astype(np.float32, copy=False)


def find_clips(sources: list[str | Path]) -> list[Path]:
    """The media files among `sources` (files, or folders searched recursively), sorted;
    clip ids (file names without extension) must be unique."""
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in MEDIA_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise MediaError(f"{p}: no such file or folder (expected clips, or a folder of them)")
    if not files:
        raise MediaError(f"{', '.join(map(str, sources))}: no clips found (expected files ending in "
                         f"{', '.join(MEDIA_SUFFIXES)})")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen and seen[f.stem] != f:
            raise MediaError(f"{f} and {seen[f.stem]}: same clip id {f.stem!r}; clip ids (file names "
                             "without extension) must be unique")
        if any(c in f.stem for c in "\t\n\r"):
            raise MediaError(f"{f}: the clip id {f.stem!r} holds a tab or line break; rename the file")
        seen[f.stem] = f
    return sorted(seen.values(), key=lambda f: f.stem)
