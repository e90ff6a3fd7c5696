#!/bin/bash
# Official code vs amess, same machine, same day: interleaved timed rounds (README.md here).
#
#   benchmarks/official/run.sh OFFICIAL_ROOT WORKDIR [PYLIB]
#
# OFFICIAL_ROOT: holds the patched clones MIntRec/ and TCL-MAP/; WORKDIR: made by prepare.py;
# PYLIB: the `pip install --target` folder with easydict and pandas. Each may instead come from
# AMESS_OFFICIAL_ROOT / AMESS_OFFICIAL_WORKDIR / AMESS_OFFICIAL_PYLIB.
# Other environment variables (defaults in brackets):
#   PY          python of the amess environment [.venv/bin/python, else python]
#   ROUNDS      round labels [1 2]; THREADS [2]; LOGS: where the logs go [WORKDIR/logs]
#   SYNTH       the `amess data synth` folder for bench_ours_b8.py [the one WORKDIR links to]
#   AMESS_BENCH_PAUSE_CMD  optional command, run as `CMD stop` / `CMD cont` around each timed
#               part (inside the Python drivers, and around the whole bench.py run) [unset: none]
# Per round: official train (MAG-BERT, TCL-MAP), official inference at batch 8, then amess's
# benchmarks/bench.py (train b16, inference b64) and bench_ours_b8.py (inference b8).
set -u
ROOT=$(realpath "${1:-${AMESS_OFFICIAL_ROOT:?give OFFICIAL_ROOT}}")
WORK=$(realpath "${2:-${AMESS_OFFICIAL_WORKDIR:?give WORKDIR}}")
PYLIB=${3:-${AMESS_OFFICIAL_PYLIB:-}}
[[ -n "$PYLIB" ]] && PYLIB=$(realpath "$PYLIB")
PY=${PY:-}
[[ "$PY" == */* ]] && PY=$(realpath "$PY") # a path given relative to the caller's folder
cd "$(dirname "$0")/../.." || exit 1 # the repository root
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
LOGS=${LOGS:-$WORK/logs}
SYNTH=${SYNTH:-$(dirname "$(readlink -f "$WORK/data/MIntRec/train.tsv")")}
T=${THREADS:-2}
mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES= # CPU: the official driver never synchronizes a GPU
pause() { [[ -z "${AMESS_BENCH_PAUSE_CMD:-}" ]] || $AMESS_BENCH_PAUSE_CMD "$1" >/dev/null; }
trap 'pause cont' EXIT
off() { # repo mode round
  local log="$LOGS/r$3_off_$1_$2.log"
  "$PY" benchmarks/official/bench_official.py --repo "$1" --mode "$2" --threads "$T" --reps 3 --steps 20 \
    --official-root "$ROOT" --workdir "$WORK" ${PYLIB:+--pylib "$PYLIB"} >"$log" 2>&1
  grep RESULT "$log" || echo "FAILED: see $log"
}
for round in ${ROUNDS:-1 2}; do
  for mode in train infer; do
    for repo in mintrec tclmap; do off "$repo" "$mode" "$round"; done
  done
  date
  pause stop
  timeout 900 "$PY" benchmarks/bench.py --threads "$T" --reps 3 --steps 8 --skip-memory --skip-mintrec2 \
    --methods text,mag_bert,tcl_map >"$LOGS/ours_r$round.md" 2>"$LOGS/ours_r$round.err"
  pause cont
  cat "$LOGS/ours_r$round.md"
  "$PY" benchmarks/official/bench_ours_b8.py --data "$SYNTH" --threads "$T" --reps 3 --batches 20 \
    >"$LOGS/r${round}_ours_b8.log" 2>&1
  grep RESULT "$LOGS/r${round}_ours_b8.log" || echo "FAILED: see $LOGS/r${round}_ours_b8.log"
  date
done
