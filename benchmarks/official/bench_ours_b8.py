"""amess inference at batch 8, the official eval batch (benchmarks/bench.py measures batch 64).

    python benchmarks/official/bench_ours_b8.py [--data SYNTH] [--threads 2] [--reps 3] [--batches 20]

Models, loaders and timing are benchmarks/bench.py's own (its Bench class and _cfg, imported from
it; Bench.infer: steady-state samples/s after one untimed batch, on the train split, all
modalities). --data: a folder made by `amess data synth --size 1000` (the same data as bench.py's
generate(seed=0, size=1000)); without it one is generated in a temporary folder.
AMESS_BENCH_PAUSE_CMD (optional): run as `CMD stop` / `CMD cont` around the timed part.
Prints one line `RESULT {json}` per method.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", type=Path, default=None, help="folder made by `amess data synth --size 1000`")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--methods", default="text,mag_bert,tcl_map")
p.add_argument("--reps", type=int, default=3)
p.add_argument("--batches", type=int, default=20)
a = p.parse_args()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

torch.set_num_threads(a.threads)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
import bench  # noqa: E402

PAUSE_CMD = os.environ.get("AMESS_BENCH_PAUSE_CMD", "").strip()


def pause(sig):
    if PAUSE_CMD:
        subprocess.run([*shlex.split(PAUSE_CMD), sig], check=False, stdout=subprocess.DEVNULL)


with tempfile.TemporaryDirectory() as tmp:
    data = a.data
    if data is None:
        from amess.data.synth import generate

        data = Path(tmp) / "synth"
        generate(data, seed=0, size=1000)
    mods = ["text", "video", "audio"]
    benches = {m: bench.Bench(bench._cfg(data, m, mods, 16), eval_batch_size=8) for m in a.methods.split(",")}
    for b in benches.values():
        b.infer(3)  # warm-up (1 untimed + 3 batches)
    res = {m: [] for m in benches}
    pause("stop")
    try:
        for _ in range(a.reps):
            for m, b in benches.items():  # methods alternated A B A B, as in bench.py
                res[m].append(b.infer(a.batches))
    finally:
        pause("cont")
for m, r in res.items():
    print("RESULT " + json.dumps({"method": m, "batch": 8, "batches": a.batches, "threads": torch.get_num_threads(),
                                  "rates": [round(x, 2) for x in r], "median": round(statistics.median(r), 2),
                                  "min": round(min(r), 2), "max": round(max(r), 2)}))
