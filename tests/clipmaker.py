"""Test clips made here in well under a second each: speech from Debian's espeak-ng, video
from scikit-image's astronaut photo (a face) moved a few pixels per frame, muxed by ffmpeg."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

TOOLS = ("ffmpeg", "espeak-ng")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def speech(path: Path, text: str, *, speed: int = 160) -> Path:
    subprocess.run(["espeak-ng", "-s", str(speed), "-w", str(path), text], check=True, capture_output=True)
    return path


def astronaut() -> np.ndarray:
    """scikit-image's astronaut photo (512, 512, 3), read from the package's file (importing
    skimage.data costs seconds)."""
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-image is not installed (pip install 'amess[test]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "astronaut.png"
    return np.asarray(Image.open(path).convert("RGB"))


def face_frames(n: int, *, size: int = 240, face: bool = True, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: the astronaut's face, drifting a few pixels per frame (or grey noise)."""
    rng = np.random.default_rng(seed)
    if not face:
        return rng.integers(90, 110, (n, size, size, 3), dtype=np.uint8)
    from PIL import Image

    img = astronaut()[20:360, 60:400]  # (340, 340, 3): head and shoulders
    big = np.asarray(Image.fromarray(img).resize((size + 24, size + 24), Image.BILINEAR))
    out = np.empty((n, size, size, 3), np.uint8)
    for k in range(n):
        dx, dy = int(12 + 8 * np.sin(k / 5)), int(12 + 6 * np.cos(k / 7))
        out[k] = big[dy:dy + size, dx:dx + size]
    return out


def make_clip(path: Path, text: str | None, *, face: bool = True, fps: int = 10, seconds: float | None = None,
              size: int = 240) -> Path:
    """An .mp4 (H.264 + AAC) of the spoken `text` over a moving face; `text=None`: a silent
    video of `seconds`. `path` ending in .wav: the speech alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = path.with_suffix(".speech.wav")
    if text is not None:
        speech(wav, text)
    if path.suffix == ".wav":
        wav.rename(path)
        return path
    if text is not None and seconds is None:
        import wave

        with wave.open(str(wav)) as w:
            seconds = w.getnframes() / w.getframerate()
    n = max(1, int(round((seconds or 1.0) * fps)))
    frames = face_frames(n, size=size, face=face)
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{size}x{size}",
           "-r", str(fps), "-i", "-"]
    if text is not None:
        cmd += ["-i", str(wav), "-c:a", "aac", "-shortest"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True, capture_output=True)
    wav.unlink(missing_ok=True)
    return path


UTTERANCES = {  # id: (spoken text, label, split, face in the video)
    "c1": ("can you help me carry these boxes", "help", "train", True),
    "c2": ("thank you so much for the lovely gift", "thank", "train", True),
    "c3": ("please help me move this table", "help", "dev", True),
    "c4": ("thanks a lot for your kindness", "thank", "test", False),
}
_made: dict[str, Path] = {}


def clip_set(root: Path) -> Path:
    """The four test clips (made once per test process) under root/clips, with
    root/labels.tsv (id, label, split) and root/transcripts.tsv (id, text)."""
    if "clips" not in _made:
        for cid, (text, _, _, face) in UTTERANCES.items():
            make_clip(root / "clips" / f"{cid}.mp4", text, face=face)
        (root / "labels.tsv").write_text("id\tlabel\tsplit\n" + "".join(
            f"{c}\t{lab}\t{split}\n" for c, (_, lab, split, _) in UTTERANCES.items()))
        (root / "transcripts.tsv").write_text("id\ttext\n" + "".join(
            f"{c}\t{text}\n" for c, (text, _, _, _) in UTTERANCES.items()))
        _made["clips"] = root
    return _made["clips"]


def extracted(root: Path) -> Path:
    """`amess extract` of the test clips with ASR, Whisper frames and dlib faces at 2 fps
    (once per test process): the dataset folder."""
    if "data" not in _made:
        from amess.cli import main

        src = clip_set(root)
        out = root / "data"
        rc = main(["extract", "--clips", str(src / "clips"), "--asr", "--labels", str(src / "labels.tsv"),
                   "--fps", "2", "--threads", "2", "--no-progress", "--out", str(out)])
        assert rc == 0
        _made["data"] = out
    return _made["data"]


def trained_run(root: Path, encoder_dir: Path) -> Path:
    """A tiny A-MESS run (random 2-layer BERT, one step) trained on `extracted(root)`."""
    if "run" not in _made:
        from amess.cli import main

        data = extracted(root)
        (root / "desc.yaml").write_text("help: The speaker asks someone for help with a task.\n"
                                        "thank: The speaker thanks someone for something.\n")
        out = root / "run"
        rc = main(["train", "--dataset", "custom", "--data-dir", str(data), "--method", "amess",
                   "--text-encoder", str(encoder_dir), "--label-descriptions", str(root / "desc.yaml"),
                   "--epochs", "1", "--max-steps", "1", "--ood-detector", "msp", "--set", "train.plots=false",
                   "--no-progress", "--out", str(out)])
        assert rc == 0
        _made["run"] = out
    return _made["run"]
