#!/usr/bin/env bash
# The GPU benchmark, one prepared script. From the repository root of a machine with a GPU:
#
#     bash benchmarks/gpu.sh                 # fp32+TF32 and bf16, batch 16 and 64, text and amess (~3-5 min)
#     bash benchmarks/gpu.sh --compile       # also with torch.compile, as far as the time budget allows
#     bash benchmarks/gpu.sh --peak-tflops 989 --budget-s 300 ...   # any flag of benchmarks/gpu_bench.py
#
# It needs a Python whose torch sees the GPU, with transformers and accelerate (the package's own
# dependencies); nothing else is downloaded (a random bert-base-sized encoder, synthetic data).
# The Python, in order: $AMESS_PYTHON; .venv (reused, or made by `make install` when pip can reach
# PyPI within a few minutes; AMESS_NO_INSTALL=1 skips that); python3 / python on the PATH. The
# package is read from src/ (PYTHONPATH), so it need not be installed.
# Results: a markdown block and JSON on stdout; with $OUT set, also $OUT/gpu_bench.md and .json.
# `bash benchmarks/gpu.sh --device cpu --tiny` runs the same code on a CPU in seconds.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

need_cuda=1
prev=""
for a in "$@"; do
    if [ "$a" = "--device=cpu" ] || { [ "$prev" = "--device" ] && [ "$a" = "cpu" ]; }; then need_cuda=0; fi
    prev="$a"
done

# usable PY: the imports the benchmark needs work, and (unless --device cpu) torch sees a GPU
usable() {
    [ -n "$1" ] && command -v "$1" >/dev/null 2>&1 || return 1
    "$1" - "$need_cuda" <<'EOF' 2>"${TMPDIR:-/tmp}/amess_gpu_sh_check.txt"
import sys
import torch, transformers, accelerate  # noqa: F401
import amess.training.runner  # noqa: F401  (the package's other dependencies)
if sys.argv[1] == "1" and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
EOF
}

PY=""
tried=()
for cand in "${AMESS_PYTHON:-}" .venv/bin/python; do
    [ -n "$cand" ] || continue
    tried+=("$cand")
    if usable "$cand"; then PY="$cand"; break; fi
done
if [ -z "$PY" ] && [ "${AMESS_NO_INSTALL:-0}" != "1" ] && command -v make >/dev/null 2>&1; then
    echo "gpu.sh: trying \`make install\` (a .venv from PyPI; gives up after 5 minutes)" >&2
    PIP_DEFAULT_TIMEOUT=20 PIP_RETRIES=1 timeout 300 make install >&2 || echo "gpu.sh: make install failed" >&2
    tried+=(".venv/bin/python after make install")
    if usable .venv/bin/python; then PY=.venv/bin/python; fi
fi
if [ -z "$PY" ]; then
    for cand in python3 python; do
        tried+=("$cand")
        if usable "$cand"; then PY="$(command -v "$cand")"; break; fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu.sh: no usable Python (tried: ${tried[*]}); last check said:" >&2
    tail -n 3 "${TMPDIR:-/tmp}/amess_gpu_sh_check.txt" >&2
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >&2
    echo "gpu.sh: set AMESS_PYTHON to a Python with a CUDA build of torch, transformers and accelerate" >&2
    exit 1
fi
echo "gpu.sh: using $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))" >&2
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >&2
exec "$PY" benchmarks/gpu_bench.py "$@"
