"""GPU benchmark (`bash benchmarks/gpu.sh`): training and inference throughput, peak GPU
memory and model FLOPs utilisation of `text` and `amess` on a bert-base-sized encoder.

What it runs, in one process (docs: benchmarking.md):

- an encoder of bert-base's shape with random weights (hidden 768, 12 layers, 12 heads,
  intermediate 3072; `BertConfig` / `BertModel` saved to a temporary folder with the
  packaged MiniLM's uncased WordPiece tokenizer, which is bert-base-uncased's), loaded
  through the toolkit's own encoder path like any local folder; no model hub;
- synthetic MIntRec-format data (the generator of `amess data synth`) with MIntRec's real
  frame counts (video 20-225 x 256, audio 60-477 x 768; text at most 30 tokens);
- per precision (fp32 with TF32, bf16 autocast), with and without `torch.compile`
  (`--compile`) and per batch size (16, 64): both methods side by side, each warmed up,
  then timed alternately A B A B with `benchmarks/bench.py`'s `Bench` (the same harness as
  `make bench`): training samples/s over whole steps (data loading included; median of
  `--reps` repetitions of `--steps` steps, min and max), inference samples/s at the same
  batch size, peak GPU memory (`torch.cuda.max_memory_allocated`, of the method's own weights,
  optimiser state and its steps' activations), FLOPs per training sample counted by
  `torch.utils.flop_counter.FlopCounterMode` over real forward+backward steps (the padded
  batches as run; not a formula), and MFU = FLOPs/sample x samples/s / the GPU's peak dense
  bf16 FLOP/s (`PEAK_BF16_TFLOPS`, by `torch.cuda.get_device_name()`, or `--peak-tflops`).
  MFU is quoted against the bf16 peak for the fp32 (TF32) rows too.

Time: no configuration starts after `--budget-s` (360 s) and one still running at `--deadline-s`
(450 s, e.g. a long compile) is interrupted and reported as failed, so that the whole script ends
within about 8 minutes with whatever it measured.

Output: a markdown block and the JSON of every figure on stdout, and both written to
`$OUT/gpu_bench.md` and `$OUT/gpu_bench.json` when `OUT` is set (`--json FILE` too).
`--device cpu --tiny` runs the same code on a CPU with a tiny encoder and a few steps
(tests); MFU and GPU memory are then null.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    # dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendor's data sheets;
    # matched in order against torch.cuda.get_device_name() (first match wins)
    (r"H200", 989.0),           # H200 SXM (and GH200)
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100|H800", 989.0),      # H100 SXM
    (r"B200", 2250.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
)
"""`(regex, TFLOP/s)`: the GPU's peak dense bf16 throughput, the denominator of MFU."""

BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
MINTREC_FRAMES = {"video_len": (20, 226), "audio_len": (60, 478)}
"""MIntRec's frame counts (as `make bench`'s memory runs): video 20-225, audio 60-477."""


def peak_tflops(name: str) -> float | None:
    """The peak dense bf16 TFLOP/s of a GPU named `name`, or None when it is not in the table."""
    for pattern, tf in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return tf
    return None


def _tokenizer(data_dir: Path):
    """The packaged MiniLM's tokenizer (bert-base-uncased's WordPiece vocabulary); without that
    package, a WordPiece vocabulary of the synthetic data's own words (random weights do not
    care which ids the words get)."""
    try:
        from transformers import AutoTokenizer

        from amess.models.encoders import resolve_encoder_path

        return AutoTokenizer.from_pretrained(resolve_encoder_path("packaged:minilm")), "packaged all-MiniLM-L6-v2"
    except (RuntimeError, OSError, ImportError, ValueError):
        from transformers import BertTokenizerFast

        words = set()
        for f in data_dir.glob("*.tsv"):
            words |= set(re.findall(r"\w+|[^\w\s]", f.read_text(encoding="utf-8").lower()))
        vocab = data_dir.parent / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]) + "\n")
        return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True), "WordPiece over the synthetic words"


def build_encoder(folder: Path, data_dir: Path, shape: dict) -> dict:
    """Save a randomly initialised `BertModel` of `shape` with a tokenizer into `folder`."""
    import torch
    from transformers import BertConfig, BertModel

    tok, tok_name = _tokenizer(data_dir)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=max(30522, len(tok)), max_position_embeddings=512, **shape)
    model = BertModel(cfg, add_pooling_layer=True)
    model.save_pretrained(folder)
    return {**shape, "vocab_size": cfg.vocab_size, "tokenizer": tok_name,
            "parameters": sum(p.numel() for p in model.parameters())}


def _machine(device: str) -> dict:
    import torch

    info = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), compute_capability=f"{p.major}.{p.minor}",
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


DEADLINE_MESSAGE = "--deadline-s reached: configuration interrupted"


class _DeadlineHit(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception`/`except OSError` on the way swallows it."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (SIGALRM; a no-op where there is none).

    A configuration that would start at or past the deadline fails at once. The alarm raises a
    BaseException that is turned into TimeoutError here: a TimeoutError is an OSError, and a
    library's `except OSError` fallback (file probing, tokenizer loading) would otherwise swallow it
    and let the configuration finish as if no deadline had been set.
    """
    if seconds <= 0:
        raise TimeoutError(DEADLINE_MESSAGE)
    if not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise _DeadlineHit()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _DeadlineHit:
        raise TimeoutError(DEADLINE_MESSAGE) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def run_group(data_dir: Path, enc_dir: Path, methods: list[str], *, precision: str, compile: bool, batch: int,
              args, flops_cache: dict, cuda: bool) -> list[dict]:
    """One (precision, compile, batch) configuration for every method, alternated A B A B."""
    import torch
    from bench import Bench, _cfg

    def alloc() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    extra = {"model.text_encoder": str(enc_dir), "train.precision": precision, "train.compile": compile,
             "data.num_workers": args.workers, "train.plots": False}
    benches, persistent, flops = {}, {}, {}
    for m in methods:
        base = alloc()
        b = Bench(_cfg(data_dir, m, ["text", "video", "audio"], batch, extra), eval_batch_size=batch)
        b.train(args.warmup * (2 if compile else 1))  # compiling (and recompiling for new shapes) happens here
        b.infer(min(2, args.infer_batches))
        key = (m, batch, precision)
        if not compile:  # the counter does not see inside compiled kernels: the eager model's count
            flops_cache[key] = b.train_flops(args.flop_steps)
        flops[m] = flops_cache.get(key)
        gc.collect()
        persistent[m] = alloc() - base  # weights, optimiser state (and whatever the method keeps)
        benches[m] = b
    res = {m: {"train": [], "infer": [], "peak_train": 0, "peak_infer": 0} for m in methods}
    for _ in range(args.reps):
        for m, b in benches.items():  # A B A B
            for phase, fn in (("train", lambda: b.train(args.steps)), ("infer", lambda: b.infer(args.infer_batches))):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                base = alloc()
                res[m][phase].append(fn())
                if cuda:  # this method's own peak: its persistent memory + what its steps added
                    peak = persistent[m] + torch.cuda.max_memory_allocated() - base
                    res[m][f"peak_{phase}"] = max(res[m][f"peak_{phase}"], peak)
    rows = []
    for m in methods:
        tr, inf = _stats(res[m]["train"]), _stats(res[m]["infer"])
        fl = flops[m]
        achieved = fl * tr["median"] if fl is not None else None
        rows.append({
            "method": m, "precision": precision, "tf32": precision == "fp32" and cuda, "compile": compile,
            "batch_size": batch,
            "train_samples_per_s": tr["median"], "train_samples_per_s_min": tr["min"],
            "train_samples_per_s_max": tr["max"],
            "infer_samples_per_s": inf["median"], "infer_samples_per_s_min": inf["min"],
            "infer_samples_per_s_max": inf["max"],
            "peak_gpu_mib_train": res[m]["peak_train"] / 2**20 if cuda else None,
            "peak_gpu_mib_infer": res[m]["peak_infer"] / 2**20 if cuda else None,
            "flops_per_sample": fl,
            "train_tflops_per_s": achieved / 1e12 if achieved is not None else None,
            "mfu": achieved / (args.peak_tflops * 1e12) if (cuda and achieved is not None and args.peak_tflops)
            else None,
        })
    del benches, b
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def _fmt(x, spec: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def markdown(meta: dict, rows: list[dict], skipped: list[str], failed: list[str] = ()) -> str:
    m, e, a = meta["machine"], meta["encoder"], meta["args"]
    gpu = (f"{m['gpu']} x{m['gpu_count']} ({m['gpu_memory_gib']} GiB, sm {m['compute_capability']}), CUDA "
           f"{m['cuda']}, cuDNN {m['cudnn']}, driver {m.get('driver')}" if "gpu" in m else "no GPU (CPU run)")
    cuda = meta["device"] == "cuda"
    if not cuda:
        peak = "MFU: none on a CPU."
    elif a["peak_tflops"]:
        peak = (f"MFU against a peak of {a['peak_tflops']:g} TFLOP/s dense bf16 ({meta['peak_source']}), for the "
                "fp32 (TF32) rows too.")
    else:
        peak = "MFU: not computed, the GPU is not in the table of peaks (give --peak-tflops)."
    lines = [
        f"### {m['date']}: GPU benchmark (`bash benchmarks/gpu.sh{meta['flags']}`)", "",
        f"Machine: {gpu}; {m['cpu_cores']} CPU cores, {m['cpu']}, {m['torch_threads']} torch threads; "
        f"torch {m['torch']}, transformers "
        f"{m.get('transformers')}, Python {m['python']}.",
        f"Encoder: random BERT, hidden {e['hidden_size']}, {e['num_hidden_layers']} layers, "
        f"{e['num_attention_heads']} heads, intermediate {e['intermediate_size']} ({e['parameters'] / 1e6:.1f}M "
        f"parameters; tokenizer: {e['tokenizer']}). Data: synthetic MIntRec-format, {meta['data']['train_rows']} "
        f"training rows, text <= 30 tokens, video {meta['data']['video_len']} x 256 and audio "
        f"{meta['data']['audio_len']} x 768 frames, padded per batch; {a['workers']} loader worker(s).",
        f"Timing: {a['warmup']} warm-up steps ({2 * a['warmup']} with compile), then {a['reps']} x {a['steps']} "
        f"training steps and {a['reps']} x {a['infer_batches']} inference batches per row, methods alternated; "
        f"median (min-max). FLOPs: `FlopCounterMode` over {a['flop_steps']} real training step(s) "
        f"(forward + backward), per sample of the padded batches. {peak}", "",
        "| method | precision | compile | batch | train samples/s | inference samples/s | peak GPU MiB train / infer "
        "| GFLOP/sample (train) | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        prec = r["precision"] + ("+tf32" if r["tf32"] else "")
        lines.append(
            f"| {r['method']} | {prec} | {'yes' if r['compile'] else 'no'} | {r['batch_size']} | "
            f"{r['train_samples_per_s']:.1f} ({r['train_samples_per_s_min']:.1f}-{r['train_samples_per_s_max']:.1f}) | "
            f"{r['infer_samples_per_s']:.1f} ({r['infer_samples_per_s_min']:.1f}-{r['infer_samples_per_s_max']:.1f}) | "
            f"{_fmt(r['peak_gpu_mib_train'], '.0f')} / {_fmt(r['peak_gpu_mib_infer'], '.0f')} | "
            f"{_fmt(r['flops_per_sample'] and r['flops_per_sample'] / 1e9, '.3g')} | "
            f"{_fmt(r['train_tflops_per_s'], '.3g')} | "
            f"{'-' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%'} |")
    by = {(r["precision"], r["compile"], r["batch_size"], r["method"]): r for r in rows}
    ratios = []
    for (p, c, b, meth), r in by.items():
        t = by.get((p, c, b, "text"))
        if meth != "text" and t:
            ratios.append(f"- {p}{' compiled' if c else ''}, batch {b}: {meth} step time = "
                          f"{t['train_samples_per_s'] / r['train_samples_per_s']:.2f}x text, inference time = "
                          f"{t['infer_samples_per_s'] / r['infer_samples_per_s']:.2f}x text")
    for (p, c, b, meth), r in by.items():
        f = by.get(("fp32", c, b, meth))
        if p == "bf16" and f:
            ratios.append(f"- {meth}{' compiled' if c else ''}, batch {b}: bf16 trains "
                          f"{r['train_samples_per_s'] / f['train_samples_per_s']:.2f}x as fast as "
                          f"{'fp32+TF32' if cuda else 'fp32'}")
        e_ = by.get((p, False, b, meth))
        if c and e_:
            ratios.append(f"- {meth} {p}, batch {b}: compiled trains "
                          f"{r['train_samples_per_s'] / e_['train_samples_per_s']:.2f}x as fast as eager")
    lines += [""] + ratios
    if skipped:
        lines += ["", f"Skipped (time budget of {a['budget_s']:g} s spent): " + "; ".join(skipped)]
    if failed:
        lines += ["", "Failed: " + "; ".join(failed)]
    lines.append(f"\nTotal wall time {meta['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="cuda: fail without a GPU; cpu: hide any GPU (the --tiny test mode)")
    p.add_argument("--tiny", action="store_true", help="a tiny encoder, little data and a few steps (CPU tests)")
    p.add_argument("--methods", default="text,amess")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 16,64; tiny: 4,8)")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32 (with TF32 on CUDA), bf16 (autocast)")
    p.add_argument("--compile", action="store_true", help="also time every configuration with torch.compile")
    p.add_argument("--warmup", type=int, default=None, help="warm-up training steps (default 10; tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per repetition (default 10; tiny 2)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; tiny: 1)")
    p.add_argument("--infer-batches", type=int, default=None, help="inference batches per repetition (default 10)")
    p.add_argument("--flop-steps", type=int, default=None, help="steps the FLOPs are counted over (default 2; tiny 1)")
    p.add_argument("--size", type=int, default=None, help="synthetic utterances (default 1200; tiny: 100)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4 on CUDA, 0 on a CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's on CUDA; 1 on a CPU, where a tiny model gains nothing "
                        "from more and shared cores make several threads spin)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's peak dense bf16 TFLOP/s (default: from PEAK_BF16_TFLOPS by device name)")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="start no new configuration after this many seconds (the script must end in ~8 minutes)")
    p.add_argument("--deadline-s", type=float, default=450.0,
                   help="interrupt a configuration still running after this many seconds (a long compile) and "
                        "report what was measured")
    p.add_argument("--json", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is first touched
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    cuda = args.device != "cpu" and torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("gpu_bench: --device cuda but torch sees no CUDA GPU (torch "
                         f"{torch.__version__}, built for CUDA {torch.version.cuda}); for a CPU check run "
                         "--device cpu --tiny")
    device = "cuda" if cuda else "cpu"
    tiny = args.tiny
    defaults = dict(warmup=1 if tiny else 10, steps=2 if tiny else 10, reps=1 if tiny else 3,
                    infer_batches=1 if tiny else 10, flop_steps=1 if tiny else 2, size=100 if tiny else 1200,
                    workers=4 if cuda and not tiny else 0)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("4,8" if tiny else "16,64")).split(",")]
    precisions = args.precisions.split(",")
    bad = [x for x in precisions if x not in ("fp32", "bf16")]
    if bad:
        raise SystemExit(f"gpu_bench: --precisions takes fp32 and bf16, got {bad}")
    methods = args.methods.split(",")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    peak_source = "--peak-tflops"
    if args.peak_tflops is None and cuda:
        args.peak_tflops = peak_tflops(torch.cuda.get_device_name(0))
        peak_source = f"table entry for {torch.cuda.get_device_name(0)}"
    if not cuda:
        args.peak_tflops = None
    from amess.data.synth import generate

    rows, skipped, failed, flops_cache = [], [], [], {}
    with tempfile.TemporaryDirectory(prefix="amess_gpu_bench_") as tmp:
        tmp = Path(tmp)
        data_dir, enc_dir = tmp / "synth", tmp / "encoder"
        frames = {} if tiny else MINTREC_FRAMES
        info = generate(data_dir, seed=0, size=args.size, **frames)
        encoder = build_encoder(enc_dir, data_dir, TINY if tiny else BERT_BASE)
        print(f"gpu_bench: {device}, data and encoder ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        # eager first (its FLOP counts serve the compiled rows), then compiled, bf16 first: the
        # time budget cuts the least wanted configurations
        compiled = sorted(precisions, key=lambda x: x != "bf16") if args.compile else []
        groups = ([(False, pr, b) for pr in precisions for b in batch_sizes]
                  + [(True, pr, b) for pr in compiled for b in batch_sizes])
        for c, pr, b in groups:
            name = f"{pr}{' compiled' if c else ''} batch {b}"
            if time.perf_counter() - t0 > args.budget_s:
                skipped.append(name)
                continue
            t = time.perf_counter()
            try:
                with _deadline(args.deadline_s - (t - t0)):
                    rows += run_group(data_dir, enc_dir, methods, precision=pr, compile=c, batch=b, args=args,
                                      flops_cache=flops_cache, cuda=cuda)
            except (Exception, _DeadlineHit) as e:  # noqa: BLE001 - one failed configuration (a compile error, OOM) keeps the rest
                import traceback

                if isinstance(e, _DeadlineHit):  # the alarm rang between the block's end and its reset
                    e = TimeoutError(DEADLINE_MESSAGE)

                traceback.print_exc()
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                failed.append(f"{name}: {type(e).__name__}: {first}")
                if c:
                    torch._dynamo.reset()
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            print(f"gpu_bench: {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    train_rows = info["splits"]["train"]
    flags = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    meta = {"machine": _machine(device), "device": device, "encoder": encoder, "flags": flags,
            "data": {"size": args.size, "train_rows": train_rows,
                     "video_len": "-".join(map(str, frames.get("video_len", (8, 48)))),
                     "audio_len": "-".join(map(str, frames.get("audio_len", (20, 100))))},
            "args": {k: v for k, v in vars(args).items() if k != "json"}, "peak_source": peak_source,
            "skipped": skipped, "failed": failed, "wall_s": time.perf_counter() - t0}
    result = {"meta": meta, "rows": rows}
    md = markdown(meta, rows, skipped, failed)
    text = json.dumps(result, indent=1)
    print(md)
    print("```json\n" + text + "\n```")
    outs = [Path(args.json)] if args.json else []
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_bench.md").write_text(md)
        outs.append(out / "gpu_bench.json")
    for f in outs:
        f.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
