"""Measure the memory-mapped feature store at MIntRec2.0's size (a measurement, not a test).

Writes N synthetic utterances (default 15,040) to a store through `convert_arrays`:
video 256-d with lengths averaging ~60 frames (max 180), audio 768-d averaging ~200
frames (max 400), i.e. about the shape of MIntRec2.0's features. Then reads every
sample once, in random order, in batches of 16 (video and audio, padded per batch as
the collator does), and reports write/read throughput and peak RSS (ru_maxrss).

    .venv/bin/python benchmarks/store_bench.py --n 15040 --out /tmp/amess_store_bench

The store is deleted afterwards unless --keep. Note that right after writing, the .bin
files are usually still in the OS page cache, so the read figures are warm-cache ones.
"""

from __future__ import annotations

import argparse
import logging
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from amess.data.batch import pad_frames
from amess.data.store import MemmapFeatures, convert_arrays

MODALITIES = {  # name: (dim, mean length, max length)
    "video": (256, 60, 180),
    "audio": (768, 200, 400),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def lengths(n: int, mean: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    shape = 4.0
    return np.clip(np.rint(rng.gamma(shape, mean / shape, size=n)), 1, cap).astype(int)


def synthetic(ids: list[str], lens: np.ndarray, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    for sid, t in zip(ids, lens):
        yield sid, rng.standard_normal((int(t), dim), dtype=np.float32)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=15040)
    ap.add_argument("--out", type=Path, default=None, help="store folder (default: a new temp dir under /tmp)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-release", action="store_true", help="keep touched mapping pages resident")
    ap.add_argument("--keep", action="store_true", help="do not delete the store afterwards")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for padding (1, as in a DataLoader worker; more oversubscribes small ops)")
    ap.add_argument("--reuse", action="store_true", help="read an existing store in --out (written with --keep)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    out = args.out or Path(tempfile.mkdtemp(prefix="amess_store_bench_", dir="/tmp"))
    rng = np.random.default_rng(args.seed)
    ids = [f"dia{i // 12}_utt{i % 12}" for i in range(args.n)]
    print(f"store: {out}  N={args.n}  dtype={args.dtype}")
    try:
        total_bytes = 0
        t0 = time.perf_counter()
        for k, (name, (dim, mean, cap)) in enumerate(MODALITIES.items() if not args.reuse else ()):
            lens = lengths(args.n, mean, cap, rng)
            t = time.perf_counter()
            info = convert_arrays(synthetic(ids, lens, dim, args.seed + k), out, name, dtype=args.dtype,
                                  max_len=cap, total=args.n)
            size = (out / f"{name}.bin").stat().st_size
            total_bytes += size
            print(f"write {name}: {args.n} samples, mean len {lens.mean():.1f} (max {lens.max()}), "
                  f"{size / 1e9:.2f} GB ({size * (4 // np.dtype(args.dtype).itemsize) / 1e9:.2f} GB as float32) "
                  f"in {time.perf_counter() - t:.1f}s incl. generating the data; {info['num_rows']} rows")
        write_s = time.perf_counter() - t0
        print(f"write total: {total_bytes / 1e9:.2f} GB in {write_s:.1f}s; peak RSS so far {peak_rss_mb():.0f} MB")

        stores = {name: MemmapFeatures(out, name, release_pages=not args.no_release) for name in MODALITIES}
        order = list(ids)
        random.Random(args.seed).shuffle(order)
        t0 = time.perf_counter()
        frames = 0
        get_s = 0.0
        for b in range(0, len(order), args.batch):
            batch_ids = order[b:b + args.batch]
            for name, store in stores.items():
                t = time.perf_counter()
                arrays = [store.get(sid) for sid in batch_ids]
                get_s += time.perf_counter() - t
                padded, mask = pad_frames(arrays, store.dim)
                frames += int(mask.sum())
        read_s = time.perf_counter() - t0
        print(f"read: {len(order)} samples (video+audio each, {frames} frames) in random order, batch "
              f"{args.batch}: {read_s:.1f}s = {len(order) / read_s:.0f} samples/s "
              f"({len(order) / args.batch / read_s:.1f} batches/s) including per-batch padding; "
              f"store.get alone {get_s:.1f}s = {len(order) / get_s:.0f} samples/s")
        print(f"peak RSS (ru_maxrss, whole run): {peak_rss_mb():.0f} MB; RSS now {current_rss_mb():.0f} MB; "
              f"release_pages={not args.no_release}")
    finally:
        if not args.keep and not args.reuse:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
