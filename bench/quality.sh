#!/usr/bin/env bash
# bench/quality: trains the recommended ArcFace and triplet configs at the same
# time, one process and one intra-op thread each (on 2 cores this uses the
# machine as well as one 2-thread run after the other), then combines their
# figures into bench/results/quality.json and prints the table.
#
#   bench/quality.sh [--set k=v ...]     (applied to both configs)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=build/bin/bench_quality
[[ -x $BIN ]] || { echo "no $BIN: run launch/build.sh first" >&2; exit 1; }
mkdir -p bench/results runs
pids=()
for name in arcface triplet; do
  OMP_NUM_THREADS=1 DTRAIN_PROGRESS=0 "$BIN" "configs/quality_${name}.textproto" --set training.threads=1 "$@" \
    --out "bench/results/quality_${name}.json" > "runs/bench_quality_${name}.log" 2>&1 &
  pids+=($!)
  echo "started quality_${name} (log: runs/bench_quality_${name}.log)"
done
for p in "${pids[@]}"; do wait "$p"; done
"$BIN" --combine bench/results/quality_arcface.json bench/results/quality_triplet.json --out bench/results/quality.json
