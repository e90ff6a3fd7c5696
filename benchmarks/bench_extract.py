"""Clip extraction: speed and memory per extractor, ASR word error rate, and the end-to-end
latency of `amess predict --clip`, on clips made here (espeak-ng speech over scikit-image's
astronaut face, moved a little per frame, 360x360 at 25 fps, muxed by ffmpeg).

    python benchmarks/bench_extract.py [--out DIR] [--threads 2]

1. Speed: each extractor in a fresh process over the same clips; seconds of media per
   second of compute, wall clock and CPU (all threads), after a warm-up clip (model loading
   reported apart). Peak resident memory (ru_maxrss) of that process.
2. ASR: word error rate (lower-case, punctuation dropped) of each Whisper setting against the
   text espeak-ng spoke.
3. Latency: a 5-second clip through `amess predict RUN --clip` in a fresh process (cold:
   Python start, run and model loading included) and through `Predictor.predict_clips` in a
   warm process, for an A-MESS run (packaged MiniLM encoder) trained on the extracted clips.

The hub-style extractors are measured with random weights in the real architectures
(wav2vec 2.0 base, Swin tiny): the compute is the same as with trained weights.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SENTENCES = {  # id: (text, intent)
    "help_1": ("can you help me carry these heavy boxes", "help"),
    "help_2": ("could you give me a hand with the dishes please", "help"),
    "help_3": ("please help me move this table to the kitchen", "help"),
    "help_4": ("i need some help with my homework tonight", "help"),
    "thank_1": ("thank you so much for the lovely gift", "thank"),
    "thank_2": ("thanks a lot for driving me home yesterday", "thank"),
    "thank_3": ("i really appreciate everything you did for us", "thank"),
    "thank_4": ("thank you for being such a good friend", "thank"),
    "sorry_1": ("i am so sorry that i broke your favourite mug", "apologise"),
    "sorry_2": ("sorry for being late to the meeting again", "apologise"),
    "sorry_3": ("i apologise for what i said last night", "apologise"),
    "sorry_4": ("please forgive me for forgetting your birthday", "apologise"),
    "greet_1": ("good morning everyone and welcome to the store", "greet"),
    "greet_2": ("hello there, it is nice to see you again", "greet"),
    "greet_3": ("hi, how are you doing today", "greet"),
    "greet_4": ("hey, welcome back, we missed you", "greet"),
}
FIVE_SECONDS = ("excuse me, could you please help me carry all of these heavy boxes up the stairs to the third "
                "floor apartment")
DESCRIPTIONS = {"help": "The speaker asks someone for help with a task.",
                "thank": "The speaker thanks someone for something they did or gave.",
                "apologise": "The speaker says sorry for something they did wrong.",
                "greet": "The speaker greets someone who arrives or whom they meet."}


def make_data(root: Path) -> Path:
    from clipmaker import make_clip

    clips = root / "clips"
    if not (root / "labels.tsv").is_file():
        for k, (text, _) in SENTENCES.items():
            make_clip(clips / f"{k}.mp4", text, fps=25, size=360)
        make_clip(root / "five" / "five_seconds.mp4", FIVE_SECONDS, fps=25, size=360)
        split = {1: "train", 2: "train", 3: "dev", 4: "test"}
        (root / "labels.tsv").write_text("id\tlabel\tsplit\n" + "".join(
            f"{k}\t{lab}\t{split[int(k[-1])]}\n" for k, (_, lab) in SENTENCES.items()))
        (root / "transcripts.tsv").write_text("id\ttext\n" + "".join(f"{k}\t{t}\n" for k, (t, _) in SENTENCES.items()))
        (root / "desc.yaml").write_text("".join(f"{k}: {v}\n" for k, v in DESCRIPTIONS.items()))
    return clips


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from amess.extract import get_extractor, load_clip
modality, spec, settings, threads, clips = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
t0, c0 = time.perf_counter(), time.process_time()
ext = get_extractor(modality, spec, threads=threads, **settings)
first = load_clip(clips[0]); out0 = ext.extract(first)   # warm-up: model loading
load_wall, load_cpu = time.perf_counter() - t0, time.process_time() - c0
wall = cpu = media = 0.0
texts = {}
for path in clips[1:]:
    clip = load_clip(path)
    t, c = time.perf_counter(), time.process_time()
    out = ext.extract(clip)
    wall += time.perf_counter() - t; cpu += time.process_time() - c; media += clip.duration
    if isinstance(out, str):
        texts[clip.id] = out
print(json.dumps({"media_s": media, "wall_s": wall, "cpu_s": cpu, "load_wall_s": load_wall, "load_cpu_s": load_cpu,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "texts": texts,
                  "dim": ext.dim if modality != "text" else None}))
"""


def run_child(modality: str, spec: str, settings: dict, threads: int, clips: list[Path]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, modality, spec, json.dumps(settings), str(threads),
                        *map(str, clips)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def wer(ref: str, hyp: str) -> tuple[int, int]:
    """(word edits, reference words) after lower-casing and dropping punctuation."""
    norm = lambda s: re.sub(r"[^a-z0-9' ]+", " ", s.lower().replace("favourite", "favorite")).split()  # noqa: E731
    r, h = norm(ref), norm(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
    return d[len(h)], len(r)


def random_hf_models(root: Path) -> dict[str, Path]:
    import torch
    from transformers import SwinConfig, SwinModel, Wav2Vec2Config, Wav2Vec2Model

    out = {"wav2vec2-base (random)": root / "w2v2_base", "swin-tiny (random)": root / "swin_tiny"}
    torch.manual_seed(0)
    if not out["wav2vec2-base (random)"].is_dir():
        Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(out["wav2vec2-base (random)"])
    if not out["swin-tiny (random)"].is_dir():
        SwinModel(SwinConfig()).save_pretrained(out["swin-tiny (random)"])
    return out


def sh(cmd: list[str], **kw) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_extract_out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--only-latency", action="store_true", help="skip the per-extractor measurements")
    args = ap.parse_args()
    root = Path(args.out).resolve()
    clips = make_data(root)
    files = sorted(clips.glob("*.mp4"))
    amess = str(Path(sys.executable).with_name("amess"))
    load = os.getloadavg()
    rows, results = [], {}
    configs = [("audio", "whisper", {}, "whisper tiny.en encoder (384-d, 50/s)"),
               ("video", "dlib", {"fps": 4.0}, "dlib face descriptor, 4 fps (128-d)"),
               ("text", "whisper", {}, "ASR whisper tiny.en, greedy, 10 s context"),
               ("text", "whisper", {"context_seconds": 30.0}, "ASR whisper tiny.en, greedy, 30 s (faster-whisper)")]
    if args.only_latency:
        configs = []
    elif not args.skip_hf:
        hf = random_hf_models(root)
        configs += [("audio", f"hf:{hf['wav2vec2-base (random)']}", {}, "hf wav2vec 2.0 base arch. (768-d, 50/s)"),
                    ("video", f"hf:{hf['swin-tiny (random)']}", {"fps": 4.0}, "hf Swin-tiny on the speaker crop, 4 fps")]
    for modality, spec, settings, label in configs:
        r = run_child(modality, spec, settings, args.threads, files)
        results[label] = r
        line = (f"| {label} | {r['media_s'] / r['wall_s']:.2f} | {r['media_s'] / r['cpu_s']:.2f} | "
                f"{r['load_wall_s']:.1f} | {r['peak_rss_mib']:.0f} |")
        if modality == "text":
            errs = [wer(SENTENCES[k][0], v) for k, v in r["texts"].items()]
            r["wer"] = sum(e for e, _ in errs) / sum(n for _, n in errs)
            line += f" WER {100 * r['wer']:.1f}% ({sum(e for e, _ in errs)}/{sum(n for _, n in errs)} words) |"
        else:
            line += " |"
        rows.append(line)
        print(line, flush=True)

    # the whole path: extract -> train -> predict --clip
    data, run = root / "data", root / "run"
    t_extract = sh([amess, "extract", "--clips", str(clips), "--asr", "--labels", str(root / "labels.tsv"),
                    "--threads", str(args.threads), "--no-progress", "--out", str(data)])
    sh([amess, "data", "check", "--dataset", "custom", "--data-dir", str(data)])
    t_train = sh([amess, "train", "--dataset", "custom", "--data-dir", str(data), "--method", "amess",
                  "--label-descriptions", str(root / "desc.yaml"), "--epochs", "3", "--ood-detector", "msp",
                  "--no-progress", "--out", str(run)])
    five = root / "five" / "five_seconds.mp4"
    if not (root / "five" / "five.mp4").is_file():  # cut to exactly 5 s
        sh(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(five), "-t", "5", "-c:v", "libx264", "-preset",
            "ultrafast", "-c:a", "aac", str(root / "five" / "five.mp4")])
    five = root / "five" / "five.mp4"
    cold = [sh([amess, "predict", str(run), "--clip", str(five), "--threads", str(args.threads)]) for _ in range(3)]
    import amess as pkg

    p = pkg.load_run(run)
    p.predict_clips([five], threads=args.threads)  # warm-up
    warm = []
    for _ in range(3):
        t = time.perf_counter()
        [pred] = p.predict_clips([five], threads=args.threads)
        warm.append(time.perf_counter() - t)
    from amess.extract import load_clip

    dur = load_clip(five).duration
    print()
    print(f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores; "
          f"{len(files) - 1} clips measured, "
          f"{sum(r['media_s'] for r in results.values()) / max(1, len(results)):.1f} s of media")
    print("| extractor | media s / wall s | media s / CPU s | model load s | peak RSS MiB | ASR |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nend to end: extract {len(files)} clips (whisper + dlib + ASR) {t_extract:.1f} s, "
          f"train amess 3 epochs {t_train:.1f} s")
    print(f"predict --clip on a {dur:.1f} s clip: cold process {min(cold):.1f} s (median {sorted(cold)[1]:.1f}), "
          f"warm {min(warm):.2f} s (median {sorted(warm)[1]:.2f}); transcript: {pred.text!r} -> {pred.label}")
    (root / "results.json").write_text(json.dumps({"load": load, "extractors": results, "extract_s": t_extract,
                                                   "train_s": t_train, "cold_s": cold, "warm_s": warm,
                                                   "clip_s": dur}, indent=2))


if __name__ == "__main__":
    main()
