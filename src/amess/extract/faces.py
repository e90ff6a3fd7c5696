"""The speaker's face in each sampled video frame.

Every extractor here follows the same three steps:

1. Detect faces (dlib's HOG frontal-face detector) and their 68 landmarks in frames sampled
   at `fps`, and link them into tracks across frames (greedy, by box overlap).
2. Pick the active speaker's track by the rule in `choose_speaker`: the track whose mouth
   opening best follows the loudness of the audio (Pearson correlation over the track's
   frames). Tracks seen in fewer than `MIN_TRACK_FRAMES` frames take part only when no track
   is longer; when no track's mouth moves with the sound (a still image, silence), the track
   seen in most frames wins, then the larger face.
3. Describe the speaker's face in each frame where it is seen: dlib's 128-d face descriptor
   (`dlib`, offline) or a Hugging Face vision backbone on the speaker crop (`hf`, in
   `amess.extract.hf`). Frames without the speaker give no row, as in MIntRec's keyframe
   features; a clip without a face gives `(0, dim)` and the batch masks handle it.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amess.extract.media import SAMPLE_RATE, Clip
from amess.extract.registry import Extractor, ExtractorError, file_sha256, register_extractor

log = logging.getLogger(__name__)

MIN_TRACK_FRAMES = 3
LINK_IOU = 0.3
"""box overlap (intersection over union) above which a face continues a track"""
MAX_GAP = 2
"""sampled frames a track may go unseen (a blink of the detector) and still continue"""
# 68-point layout: 60-67 inner lips (upper 61-63, lower 67-65), 27 nose bridge, 8 chin
_INNER_UPPER, _INNER_LOWER = (61, 62, 63), (67, 66, 65)


def face_models_dir() -> Path:
    """The model files of `face-recognition-models`, found without importing it (its
    __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ExtractorError("face extractors need the package face-recognition-models: pip install 'amess[extract]'")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class _Dlib:
    """dlib's detector, landmark model and face descriptor network, loaded once."""

    _shared: "_Dlib | None" = None

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError:
            raise ExtractorError("face extractors need dlib: pip install 'amess[extract]' (dlib-bin)") from None
        d = face_models_dir()
        self.dlib = dlib
        self.landmarks_file = d / "shape_predictor_68_face_landmarks.dat"
        self.descriptor_file = d / "dlib_face_recognition_resnet_model_v1.dat"
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(self.landmarks_file))
        self._descriptor = None

    @property
    def descriptor(self):
        if self._descriptor is None:
            self._descriptor = self.dlib.face_recognition_model_v1(str(self.descriptor_file))
        return self._descriptor

    @classmethod
    def get(cls) -> "_Dlib":
        if cls._shared is None:
            cls._shared = _Dlib()
        return cls._shared


@dataclass
class Face:
    """One detected face in one sampled frame."""

    frame: int
    time: float
    box: tuple[int, int, int, int]
    """(left, top, right, bottom) in pixels of the downscaled frame"""
    mouth: float
    """inner-lip gap over face height (0 closed, about 0.1 wide open)"""
    payload: Any = None
    """what the describing step needs (an aligned chip or a crop), kept instead of the frame"""


@dataclass
class Track:
    faces: list[Face] = field(default_factory=list)

    @property
    def last(self) -> Face:
        return self.faces[-1]

    @property
    def area(self) -> float:
        return float(np.mean([(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in self.faces]))


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def link(tracks: list[Track], faces: list[Face], frame: int) -> None:
    """Append each face to the open track it overlaps most (greedy), or start a new track."""
    open_tracks = [t for t in tracks if frame - t.last.frame <= MAX_GAP + 1]
    pairs = sorted(((iou(t.last.box, f.box), i, j) for i, t in enumerate(open_tracks) for j, f in enumerate(faces)),
                   reverse=True)
    used_t, used_f = set(), set()
    for o, i, j in pairs:
        if o < LINK_IOU or i in used_t or j in used_f:
            continue
        open_tracks[i].faces.append(faces[j])
        used_t.add(i)
        used_f.add(j)
    tracks += [Track([f]) for j, f in enumerate(faces) if j not in used_f]


def mouth_opening(points: np.ndarray) -> float:
    """(68, 2) landmarks -> inner-lip gap divided by the nose-bridge-to-chin height."""
    gap = np.linalg.norm(points[list(_INNER_UPPER)] - points[list(_INNER_LOWER)], axis=1).mean()
    height = np.linalg.norm(points[27] - points[8])
    return float(gap / height) if height > 0 else 0.0


def loudness(audio: np.ndarray, times: np.ndarray, window: float) -> np.ndarray:
    """RMS of the audio in a `window`-second span centred on each time."""
    half = int(window * SAMPLE_RATE / 2)
    out = np.zeros(len(times), np.float64)
    for k, t in enumerate(times):
        c = int(t * SAMPLE_RATE)
        seg = audio[max(0, c - half): c + half]
        out[k] = float(np.sqrt(np.mean(seg.astype(np.float64) ** 2))) if seg.size else 0.0
    return out


def speaker_score(track: Track, audio: np.ndarray, window: float) -> float | None:
    """Pearson correlation of the track's mouth opening with the audio loudness at its frames;
    None when either does not vary."""
    if len(track.faces) < 2:
        return None
    mouth = np.array([f.mouth for f in track.faces])
    energy = loudness(audio, np.array([f.time for f in track.faces]), window)
    if mouth.std() < 1e-6 or energy.std() < 1e-9:
        return None
    return float(np.corrcoef(mouth, energy)[0, 1])


def choose_speaker(tracks: list[Track], audio: np.ndarray, window: float) -> Track | None:
    """The active speaker's track (the rule in the module docstring)."""
    if not tracks:
        return None
    longest = max(len(t.faces) for t in tracks)
    pool = [t for t in tracks if len(t.faces) >= min(MIN_TRACK_FRAMES, longest)]
    if len(pool) == 1:
        return pool[0]
    scored = [(s, t) for t in pool if (s := speaker_score(t, audio, window)) is not None]
    if scored:
        return max(scored, key=lambda st: (st[0], len(st[1].faces), st[1].area))[1]
    return max(pool, key=lambda t: (len(t.faces), t.area))


@dataclass
class FaceSettings:
    fps: float = 4.0
    """video frames sampled per second"""
    max_side: int = 640
    """frames are downscaled so that their longer side is at most this many pixels"""
    upsample: int = 0
    """dlib detector upsampling: 1 finds faces half as small, about 4x slower"""

    def __post_init__(self) -> None:
        if not self.fps > 0 or self.max_side < 64 or self.upsample < 0:
            raise ExtractorError(f"face extractor settings {self}: expected fps > 0, max_side >= 64, upsample >= 0")


class SpeakerFaceExtractor(Extractor):
    """Base of the face extractors: sampling, tracking and the speaker rule; subclasses turn
    the speaker's faces into rows (`_payload` per face as it is seen, `_embed` at the end)."""

    Settings = FaceSettings
    packages = ("dlib-bin", "face-recognition-models", "av")

    def __init__(self, settings: Any = None, *, threads: int | None = None):
        super().__init__(settings, threads=threads)
        self.faces = _Dlib.get()
        self.last_tracks: list[Track] = []

    def detect(self, img: np.ndarray, frame: int, t: float) -> list[Face]:
        out = []
        for rect in self.faces.detector(img, self.settings.upsample):
            shape = self.faces.landmarks(img, rect)
            pts = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
            h, w = img.shape[:2]
            box = (max(0, rect.left()), max(0, rect.top()), min(w, rect.right()), min(h, rect.bottom()))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            out.append(Face(frame=frame, time=t, box=box, mouth=mouth_opening(pts),
                            payload=self._payload(img, rect, shape, box)))
        return out

    def speaker_track(self, clip: Clip) -> Track | None:
        tracks: list[Track] = []
        for k, (t, img) in enumerate(clip.frames(self.settings.fps, self.settings.max_side)):
            link(tracks, self.detect(img, k, t), k)
        self.last_tracks = tracks
        return choose_speaker(tracks, clip.audio, 1.0 / self.settings.fps)

    def extract(self, clip: Clip) -> np.ndarray:
        track = self.speaker_track(clip)
        if track is None:
            return np.zeros((0, self.dim), np.float32)
        rows = self._embed([f.payload for f in track.faces])  # (frames, dim)
        for t in self.last_tracks:  # the payloads are the bulk of the memory
            for f in t.faces:
                f.payload = None
        return np.asarray(rows, np.float32).reshape(len(track.faces), self.dim)

    def _payload(self, img: np.ndarray, rect, shape, box: tuple[int, int, int, int]) -> Any:
        raise NotImplementedError

    def _embed(self, payloads: list[Any]) -> np.ndarray:
        raise NotImplementedError


@register_extractor("video", "dlib")
class DlibFaceDescriptor(SpeakerFaceExtractor):
    """dlib's 128-d face descriptor (ResNet, from face-recognition-models) of the speaker's
    face, aligned on its landmarks, per sampled frame."""

    dim = 128  # type: ignore[assignment]

    def _payload(self, img, rect, shape, box):
        return self.faces.dlib.get_face_chip(img, shape, size=150, padding=0.25)  # (150, 150, 3) uint8

    def _embed(self, payloads: list[np.ndarray]) -> np.ndarray:
        return np.array([np.array(v) for v in self.faces.descriptor.compute_face_descriptor(payloads)], np.float32)

    def weights(self) -> dict[str, Any]:
        return {"detector": "dlib.get_frontal_face_detector",
                "landmarks": {"file": self.faces.landmarks_file.name, "sha256": file_sha256(self.faces.landmarks_file)},
                "descriptor": {"file": self.faces.descriptor_file.name,
                               "sha256": file_sha256(self.faces.descriptor_file)}}
