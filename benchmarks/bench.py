"""`make bench`: speed and memory of the one training loop (docs: benchmarking.md).

1. Throughput, in one process, methods alternated A B A B: training samples/s over whole
   steps (data loading included) at batch 16, steady-state inference samples/s at batch 64
   (after one untimed batch; what an evaluation pass computes once, such as A-MESS's label
   descriptions, is its own column, in ms per evaluation), and latency of one utterance
   (batch 1). Median of repetitions, with min and max.
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


VARIANTS = {"amess-frozen": ("amess", {"amess.desc_encoder": "frozen"})}
"""Bench names beyond the registered methods: a method plus overrides."""
SETTINGS: list[str] = []
"""`--set KEY=VALUE` items applied to every configuration (A/B tests of a setting)."""


def _cfg(data_dir: Path, name: str, modalities: list[str], batch: int, extra: dict | None = None):
    from amess.config import Config, parse_overrides

    method, variant = VARIANTS.get(name, (name, {}))
    extra = {**parse_overrides(SETTINGS), **variant, **(extra or {})}
    return Config().override({"data.data_dir": str(data_dir), "data.modalities": modalities,
                              "model.method": method, "train.batch_size": batch, "train.progress": False,
                              "data.dev_split": "train:0.1" if not (data_dir / "dev.tsv").exists() else "dev",
                              "data.test_splits": [], **(extra or {})})


class Bench:
    """Holds one method's model, loaders and optimiser so that methods can be alternated.

    On a GPU every figure is read after `torch.cuda.synchronize()`; batches go to the
    accelerator's device, and inference runs under its autocast (`train.precision`), as in
    the training loop's evaluation. `eval_batch_size`: the inference batch."""

    def __init__(self, cfg, eval_batch_size: int = 64):
        from amess.training.data import make_loader
        from amess.training.distributed import make_accelerator, prepare_model
        from amess.training.loop import make_optimizer
        from amess.training.runner import setup_seed

        self.cfg = cfg
        self.acc = make_accelerator(cfg)
        dev = self.acc.device
        self.data, model, self.collator, _ = setup_seed(cfg, 0)
        opt, sched = make_optimizer(cfg, model, 10_000)
        loader = make_loader(self.data.train, cfg, self.collator, shuffle=True, seed=0, batch_size=cfg.train.batch_size,
                             device=dev)
        self.model = prepare_model(model, self.acc, compile=cfg.train.compile)
        self.opt, self.loader, self.sched = self.acc.prepare(opt, loader, sched)
        self.eval_loader = make_loader(self.data.train, cfg, self.collator, shuffle=False, seed=0,
                                       batch_size=eval_batch_size, device=dev)
        self.one_loader = make_loader(self.data.train, cfg, self.collator, shuffle=False, seed=0, batch_size=1,
                                      device=dev)
        self._it = iter(self.loader)

    def _sync(self) -> None:
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize(self.acc.device)

    def _next(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def train(self, steps: int) -> float:
        """Samples/s over `steps` whole steps (batch assembly included)."""
        from amess.training.loop import train_step

        self.model.train()
        self._sync()
        n, t = 0, time.perf_counter()
        for _ in range(steps):
            batch = self._next()
            train_step(self.cfg, self.model, batch, self.opt, self.sched, self.acc, len(self.data.label_names))
            n += len(batch)
        self._sync()
        return n / (time.perf_counter() - t)

    def train_flops(self, steps: int = 1) -> float:
        """Model FLOPs per training sample, counted by torch's `FlopCounterMode` over `steps`
        real training steps (forward and backward of the padded batches as run; the optimiser's
        elementwise update counts nothing). Not meaningful on a compiled model (its kernels
        bypass the counter): count on the eager one."""
        from torch.utils.flop_counter import FlopCounterMode

        from amess.training.loop import train_step

        self.model.train()
        n = 0
        with FlopCounterMode(display=False) as counter:
            for _ in range(steps):
                batch = self._next()
                train_step(self.cfg, self.model, batch, self.opt, self.sched, self.acc, len(self.data.label_names))
                n += len(batch)
        return counter.get_total_flops() / n

    @torch.no_grad()
    def infer(self, batches: int) -> float:
        """Steady-state inference samples/s over `batches` batches, after one untimed batch in
        eval mode: what is computed once per evaluation pass, not per batch (A-MESS's label
        descriptions, encoded once and cached while the weights stay fixed), is left out;
        `eval_once_ms` measures it."""
        self.model.eval()
        inner = self.acc.unwrap_model(self.model)
        loader = iter(self.eval_loader)
        self._infer_batch(inner, next(loader))  # warm-up: per-evaluation caches
        self._sync()
        n, t = 0, time.perf_counter()
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            self._infer_batch(inner, batch)
            n += len(batch)
        self._sync()
        return n / (time.perf_counter() - t)

    def _infer_batch(self, inner, batch) -> None:
        batch = batch.to(self.acc.device)
        with self.acc.autocast():
            inner.predict_scores(self.model(batch))

    @torch.no_grad()
    def eval_once_ms(self) -> float:
        """Milliseconds that an evaluation pass pays once (the first batch's extra time over a
        cached one): 0 for methods without per-evaluation caches."""
        self.model.eval()
        inner = self.acc.unwrap_model(self.model)
        batch = next(iter(self.one_loader))
        self.model.train()
        self.model.eval()  # a train/eval switch drops the caches, as between two evaluations
        self._sync()
        t = time.perf_counter()
        self._infer_batch(inner, batch)
        self._sync()
        first = time.perf_counter() - t
        t = time.perf_counter()
        self._infer_batch(inner, batch)
        self._sync()
        return 1000 * max(first - (time.perf_counter() - t), 0.0)

    @torch.no_grad()
    def latency_ms(self, count: int) -> float:
        self.model.eval()
        times = []
        for i, batch in enumerate(self.one_loader):
            if i >= count:
                break
            self._sync()
            t = time.perf_counter()
            with self.acc.autocast():
                self.model(batch.to(self.acc.device))
            self._sync()
            times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times)


def _runs_on(name: str, modalities: list[str]) -> bool:
    """Whether a method (or variant) accepts these modalities (its `requires`)."""
    from amess.models import method_class

    cls = method_class(VARIANTS.get(name, (name, {}))[0])
    return cls.modality_problem(modalities) is None


def _stats(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} (min {min(xs):.1f}, max {max(xs):.1f})"


def _paired(res: dict, other: str, key: str) -> str:
    """The time ratio other / text per repetition (the two ran back to back, so a change of
    the machine's speed between repetitions cancels): median (min-max)."""
    r = [t / o for t, o in zip(res["text"][key], res[other][key])]
    return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"


def throughput(data_dir: Path, methods: list[str], modalities: list[str], reps: int, steps: int,
               extra: dict | None = None) -> dict:
    benches = {m: Bench(_cfg(data_dir, m, modalities, 16, extra)) for m in methods}
    for b in benches.values():  # warm-up: model, allocator, first batches
        b.train(3)
        b.infer(1)
    res = {m: {"train": [], "infer": [], "latency": [], "once": []} for m in methods}
    for _ in range(reps):
        for m, b in benches.items():  # A B A B
            res[m]["train"].append(b.train(steps))
            res[m]["infer"].append(b.infer(4))
            res[m]["latency"].append(b.latency_ms(10))
            res[m]["once"].append(b.eval_once_ms())
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


def mintrec2_scale(tmp: Path, threads: int, steps: int, methods: list[str], workers: int,
                   size: int = 15040) -> list[str]:
    """MIntRec2.0 at full size (15,040 utterances, realistic frame counts) streamed into the
    memory-mapped store, then, per method, in a fresh process: training steps from the store
    with data-loading time and model-step time measured apart, and peak RSS."""
    from amess.data.store import convert_arrays
    from amess.data.synth import REAL_AUDIO_LEN, REAL_VIDEO_LEN, generate_mintrec2, iter_mintrec2_features

    root, store = tmp / "mintrec2_full", tmp / "mintrec2_store"
    t = time.perf_counter()
    info = generate_mintrec2(root, seed=0, size=size, video_len=REAL_VIDEO_LEN, audio_len=REAL_AUDIO_LEN,
                             write_pickles=False)
    for modality in ("video", "audio"):
        convert_arrays(iter_mintrec2_features(root, modality), store, modality, progress=False)
    build = time.perf_counter() - t
    gb = sum(f.stat().st_size for f in store.glob("*.bin")) / 1e9
    lines = ["", f"MIntRec2.0 scale: {sum(v['rows'] for v in info['splits'].values())} "
             f"synthetic utterances, video {REAL_VIDEO_LEN} and audio {REAL_AUDIO_LEN} frames (min, mean, max), "
             f"streamed into a float16 store of {gb:.2f} GB in {build:.0f} s (float32 pickles would be about "
             f"{2 * gb:.1f} GB). Training from the store, batch 16, {threads} threads, {workers} loader worker(s):", "",
             "| method | data loading ms/step | model step ms/step | loading / step | train samples/s | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    code = (
        "import json, resource, sys, time, torch\n"
        "from amess.config import Config\n"
        "from amess.training.data import make_loader\n"
        "from amess.training.distributed import make_accelerator, prepare_model\n"
        "from amess.training.loop import make_optimizer, train_step\n"
        "from amess.training.runner import setup_seed\n"
        "root, store, method, steps, threads, workers = sys.argv[1:7]\n"
        "torch.set_num_threads(int(threads))\n"
        "cfg = Config().override({'data.dataset': 'mintrec2', 'data.data_dir': root, 'data.feature_store': store,"
        " 'model.method': method, 'data.num_workers': int(workers), 'train.progress': False,"
        " 'amess.desc_encoder': 'frozen'})\n"
        "acc = make_accelerator(cfg); data, model, col, _ = setup_seed(cfg, 0)\n"
        "opt, sched = make_optimizer(cfg, model, 10000)\n"
        "loader = make_loader(data.train, cfg, col, shuffle=True, seed=0, batch_size=16)\n"
        "model = prepare_model(model, acc); opt, sched = acc.prepare(opt, sched)\n"
        "it = iter(loader); td = ts = 0.0; n = 0\n"
        "for i in range(int(steps) + 3):\n"
        "    t0 = time.perf_counter(); b = next(it); t1 = time.perf_counter()\n"
        "    train_step(cfg, model, b, opt, sched, acc, len(data.label_names)); t2 = time.perf_counter()\n"
        "    if i >= 3: td += t1 - t0; ts += t2 - t1; n += len(b)\n"
        "print('BENCH', json.dumps({'load_ms': 1000 * td / int(steps), 'step_ms': 1000 * ts / int(steps),"
        " 'sps': n / (td + ts), 'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n")
    for m in [m for m in methods if m not in VARIANTS]:
        out = subprocess.run([sys.executable, "-c", code, str(root), str(store), m, str(steps), str(threads),
                              str(workers)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        r = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("BENCH")][-1][6:])
        lines.append(f"| {m} | {r['load_ms']:.1f} | {r['step_ms']:.1f} | {r['load_ms'] / r['step_ms']:.2f} | "
                     f"{r['sps']:.1f} | {r['rss']:.0f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=15, help="training steps per repetition")
    p.add_argument("--methods", default="text,amess,amess-frozen",
                   help="methods, or amess-frozen (A-MESS with the description encoder frozen)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--memory-data", default=None,
                   help="reuse a dataset made by `generate(size=2224, video_len=(20, 226), audio_len=(60, 478))`")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-mintrec2", action="store_true", help="skip the MIntRec2.0-scale store benchmark")
    p.add_argument("--only-mintrec2", action="store_true", help="run only the MIntRec2.0-scale store benchmark")
    p.add_argument("--mintrec2-size", type=int, default=15040, help="utterances in the MIntRec2.0-scale benchmark")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers in the MIntRec2.0-scale benchmark")
    p.add_argument("--append", default=None, help="append the results block to this markdown file")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD[:KEY=VALUE,...]",
                   help="a named method + settings to bench beside the others, e.g. "
                        "amess-r4=amess:amess.desc_refresh=4 (then list NAME in --methods)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config setting for every run (e.g. train.mmap_threshold_kb=null to A/B the allocator)")
    args = p.parse_args()
    SETTINGS[:] = args.set
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from amess.config import parse_variant

    for v in args.variant:
        name, method, overrides = parse_variant(v)
        VARIANTS[name] = (method, overrides)
    methods = args.methods.split(",")
    from amess.data.synth import generate

    lines = []
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sets_flags = "".join(f" --set {x}" for x in args.set)
    lines += [f"### {now}: `make bench` (benchmarks/bench.py --threads {args.threads} --reps {args.reps} "
              f"--steps {args.steps}{sets_flags})", "",
              f"Machine: {os.cpu_count()} cores, {cpu}; torch {torch.__version__}, {args.threads} threads; "
              "encoder packaged all-MiniLM-L6-v2 (6 layers, hidden 384); batch 16 (train), 64 (inference), "
              "1 (latency); text max 30 tokens, padded per batch.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only_mintrec2:
            lines += mintrec2_scale(tmp, args.threads, args.steps, methods, args.workers, args.mintrec2_size)
            _emit(lines, args.append)
            return
        synth = tmp / "synth"
        generate(synth, seed=0, size=1000)
        sets = []
        if (SHARED_MINTREC / "train.tsv").is_file():
            sets.append(("MIntRec text (real train.tsv)", SHARED_MINTREC, ["text"]))
        sets.append(("synthetic, text+video+audio", synth, ["text", "video", "audio"]))
        lines += ["| data | method | train samples/s | inference samples/s | latency ms (batch 1) | "
                  "once per evaluation ms |",
                  "|---|---|---|---|---|---|"] if not args.skip_throughput else []
        ratios = []
        for name, d, mods in ([] if args.skip_throughput else sets):
            runnable = [m for m in methods if _runs_on(m, mods)]
            skipped = [m for m in methods if m not in runnable]
            res = throughput(d, runnable, mods, args.reps, args.steps)
            if skipped:
                ratios.append(f"{name}: not run for {', '.join(skipped)} (the method needs more than "
                              f"{'+'.join(mods)})")
            for m in runnable:
                r = res[m]
                lines.append(f"| {name} | {m} | {_stats(r['train'])} | {_stats(r['infer'])} | "
                             f"{_stats(r['latency'])} | {statistics.median(r['once']):.0f} |")
            for other in [m for m in runnable if m != "text" and "text" in res]:
                tr = statistics.median(res["text"]["train"]) / statistics.median(res[other]["train"])
                inf = statistics.median(res["text"]["infer"]) / statistics.median(res[other]["infer"])
                ratios.append(f"{name}: {other} step time = {tr:.2f}x text, inference time = {inf:.2f}x text "
                              f"(paired by repetition: step {_paired(res, other, 'train')}, inference "
                              f"{_paired(res, other, 'infer')})")
        lines += [""] + [f"- {r}" for r in ratios]
        if not args.skip_memory:
            big = Path(args.memory_data) if args.memory_data else tmp / "mintrec_size"
            if not args.memory_data:
                generate(big, seed=0, size=2224, video_len=(20, 226), audio_len=(60, 478))
            mem_rows = []
            common = ["--no-progress", "--max-steps", "20", "--epochs", "1", "--set", "train.plots=false",
                      "--threads", str(args.threads), *[a for x in args.set for a in ("--set", x)]]
            if (SHARED_MINTREC / "train.tsv").is_file():
                rss, sec = peak_rss(["train", "--data-dir", str(SHARED_MINTREC), "--modalities", "text",
                                     "--method", "text", "--dev-split", "train:0.1", "--test-splits", "dev",
                                     "--out", str(tmp / "m1"), *common])
                mem_rows.append(("text, real MIntRec text, text only", rss, sec))
            where = "synthetic MIntRec-size (2,224 utt., video 20-225 x 256, audio 60-477 x 768), all modalities"
            for m in [m for m in methods if m not in VARIANTS]:
                rss, sec = peak_rss(["train", "--data-dir", str(big), "--method", m, "--out", str(tmp / f"m_{m}"),
                                     *common])
                mem_rows.append((f"{m}, {where}, features in memory (float16)", rss, sec))
            store = tmp / "mintrec_size_store"
            rss, sec = peak_rss(["data", "convert", "--data-dir", str(big), "--out", str(store), "--no-progress"])
            mem_rows.append(("`amess data convert` of that dataset (one pickle at a time)", rss, sec))
            for m in [m for m in methods if m not in VARIANTS]:
                rss, sec = peak_rss(["train", "--data-dir", str(big), "--method", m, "--feature-store", str(store),
                                     "--out", str(tmp / f"ms_{m}"), *common])
                mem_rows.append((f"{m}, {where}, features from the store", rss, sec))
            lines += ["", "| peak memory: run (20 steps + evaluation, fresh process) | peak RSS MiB | wall s |",
                      "|---|---|---|"]
            lines += [f"| {n} | {r:.0f} | {s:.0f} |" for n, r, s in mem_rows]
        if not args.skip_mintrec2:
            lines += mintrec2_scale(tmp, args.threads, args.steps, methods, args.workers, args.mintrec2_size)
    _emit(lines, args.append)


def _emit(lines: list[str], append: str | None) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    if append:
        with open(append, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
