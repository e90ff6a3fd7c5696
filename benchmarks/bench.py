"""`make bench`: speed and memory of the one training loop (docs: benchmarking.md).

1. Throughput, in one process, methods alternated A B A B: training samples/s over whole
   steps (data loading included) at batch 16, inference samples/s at batch 64, and
   latency of one utterance (batch 1). Median of repetitions, with min and max.
   Datasets: the real MIntRec text (`../shared/data/mintrec`, text only) and the synthetic
   MIntRec-format data (all modalities).
2. Peak resident memory (ru_maxrss of a fresh child process per configuration) of a short
   `amess train` run: text-only on the real text (must never open a feature file), and all
   modalities on a synthetic dataset of MIntRec's size (2,224 utterances) at realistic frame
   counts.

Results are printed as markdown and, with `--append FILE`, appended to it as a dated block.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_MINTREC = REPO.parent / "shared" / "data" / "mintrec"


def _cfg(data_dir: Path, method: str, modalities: list[str], batch: int, extra: dict | None = None):
    from amess.config import Config

    return Config().override({"data.data_dir": str(data_dir), "data.modalities": modalities,
                              "model.method": method, "train.batch_size": batch, "train.progress": False,
                              "data.dev_split": "train:0.1" if not (data_dir / "dev.tsv").exists() else "dev",
                              "data.test_splits": [], **(extra or {})})


class Bench:
    """Holds one method's model, loaders and optimiser so that methods can be alternated."""

    def __init__(self, cfg):
        from amess.train import make_accelerator, make_loader, make_optimizer, setup_seed

        self.cfg = cfg
        self.acc = make_accelerator(cfg)
        self.data, model, self.collator = setup_seed(cfg, 0)
        opt, sched = make_optimizer(cfg, model, 10_000)
        loader = make_loader(self.data.train, cfg, self.collator, shuffle=True, seed=0, batch_size=cfg.train.batch_size)
        self.model, self.opt, self.loader, self.sched = self.acc.prepare(model, opt, loader, sched)
        self.eval_loader = make_loader(self.data.train, cfg, self.collator, shuffle=False, seed=0, batch_size=64)
        self.one_loader = make_loader(self.data.train, cfg, self.collator, shuffle=False, seed=0, batch_size=1)
        self._it = iter(self.loader)

    def _next(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def train(self, steps: int) -> float:
        """Samples/s over `steps` whole steps (batch assembly included)."""
        from amess.train import train_step

        self.model.train()
        n, t = 0, time.perf_counter()
        for _ in range(steps):
            batch = self._next()
            train_step(self.cfg, self.model, batch, self.opt, self.sched, self.acc, len(self.data.label_names))
            n += len(batch)
        return n / (time.perf_counter() - t)

    @torch.no_grad()
    def infer(self, batches: int) -> float:
        self.model.eval()
        n, t = 0, time.perf_counter()
        for i, batch in enumerate(self.eval_loader):
            if i >= batches:
                break
            out = self.model(batch)
            self.acc.unwrap_model(self.model).predict_scores(out)
            n += len(batch)
        return n / (time.perf_counter() - t)

    @torch.no_grad()
    def latency_ms(self, count: int) -> float:
        self.model.eval()
        times = []
        for i, batch in enumerate(self.one_loader):
            if i >= count:
                break
            t = time.perf_counter()
            self.model(batch)
            times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times)


def _stats(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} (min {min(xs):.1f}, max {max(xs):.1f})"


def throughput(data_dir: Path, methods: list[str], modalities: list[str], reps: int, steps: int,
               extra: dict | None = None) -> dict:
    benches = {m: Bench(_cfg(data_dir, m, modalities, 16, extra)) for m in methods}
    for b in benches.values():  # warm-up: model, allocator, first batches
        b.train(3)
        b.infer(1)
    res = {m: {"train": [], "infer": [], "latency": []} for m in methods}
    for _ in range(reps):
        for m, b in benches.items():  # A B A B
            res[m]["train"].append(b.train(steps))
            res[m]["infer"].append(b.infer(4))
            res[m]["latency"].append(b.latency_ms(10))
    return res


def peak_rss(args: list[str]) -> tuple[float, float]:
    """Peak RSS (MiB) and wall seconds of `amess ARGS` in a fresh child process."""
    code = ("import resource, sys, time; from amess.cli import main; t = time.time(); rc = main(sys.argv[1:]); "
            "print('BENCH', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time() - t, rc)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH")][-1].split()
    if line[3] != "0":
        raise RuntimeError(f"amess {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return int(line[1]) / 1024, float(line[2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=15, help="training steps per repetition")
    p.add_argument("--methods", default="text,amess")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--append", default=None, help="append the results block to this markdown file")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    from amess.data.synth import generate

    lines = []
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines += [f"### {now}: `make bench` (benchmarks/bench.py --threads {args.threads} --reps {args.reps} "
              f"--steps {args.steps})", "",
              f"Machine: {os.cpu_count()} cores, {cpu}; torch {torch.__version__}, {args.threads} threads; "
              "encoder packaged all-MiniLM-L6-v2 (6 layers, hidden 384); batch 16 (train), 64 (inference), "
              "1 (latency); text max 30 tokens, padded per batch.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth = tmp / "synth"
        generate(synth, seed=0, size=1000)
        sets = []
        if (SHARED_MINTREC / "train.tsv").is_file():
            sets.append(("MIntRec text (real train.tsv)", SHARED_MINTREC, ["text"]))
        sets.append(("synthetic, text+video+audio", synth, ["text", "video", "audio"]))
        lines += ["| data | method | train samples/s | inference samples/s | latency ms (batch 1) |",
                  "|---|---|---|---|---|"]
        ratios = []
        for name, d, mods in sets:
            res = throughput(d, methods, mods, args.reps, args.steps)
            for m in methods:
                r = res[m]
                lines.append(f"| {name} | {m} | {_stats(r['train'])} | {_stats(r['infer'])} | "
                             f"{_stats(r['latency'])} |")
            if "text" in res and "amess" in res:
                tr = statistics.median(res["text"]["train"]) / statistics.median(res["amess"]["train"])
                inf = statistics.median(res["text"]["infer"]) / statistics.median(res["amess"]["infer"])
                ratios.append(f"{name}: amess step time = {tr:.2f}x text, inference time = {inf:.2f}x text")
        lines += [""] + [f"- {r}" for r in ratios]
        if not args.skip_memory:
            big = tmp / "mintrec_size"
            generate(big, seed=0, size=2224, video_len=(20, 226), audio_len=(60, 478))
            mem_rows = []
            common = ["--no-progress", "--max-steps", "20", "--epochs", "1", "--set", "train.plots=false",
                      "--threads", str(args.threads)]
            if (SHARED_MINTREC / "train.tsv").is_file():
                rss, sec = peak_rss(["train", "--data-dir", str(SHARED_MINTREC), "--modalities", "text",
                                     "--method", "text", "--dev-split", "train:0.1", "--test-splits", "dev",
                                     "--out", str(tmp / "m1"), *common])
                mem_rows.append(("text, real MIntRec text, text only", rss, sec))
            for m in methods:
                rss, sec = peak_rss(["train", "--data-dir", str(big), "--method", m, "--out", str(tmp / f"m_{m}"),
                                     *common])
                mem_rows.append((f"{m}, synthetic MIntRec-size (2,224 utt., video 20-225 x 256, "
                                 f"audio 60-477 x 768), all modalities", rss, sec))
            lines += ["", "| peak memory: run (20 steps + evaluation, fresh process) | peak RSS MiB | wall s |",
                      "|---|---|---|"]
            lines += [f"| {n} | {r:.0f} | {s:.0f} |" for n, r, s in mem_rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
