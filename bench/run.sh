#!/usr/bin/env bash
# Runs the benchmarks named on the command line (default: all), each printing
# its table and writing bench/results/<name>.json. Build first (launch/build.sh).
#
#   bench/run.sh [data_pipeline] [build_time] [allreduce] [scaling] [async_vs_sync] [pipeline] [pipeline_uniform] [snaps] ...
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(data_pipeline trainer_overhead checkpoint build_time)
for n in "${names[@]}"; do
  echo "== bench/$n"
  case "$n" in
    build_time) bash bench/build_time.sh ;;
    quality) bash bench/quality.sh ;;
    scaling) bash bench/scaling.sh ;;
    async_vs_sync) bash bench/async_vs_sync.sh ;;
    allreduce)
      for np in 2 4; do
        OMP_NUM_THREADS=1 bash launch/mpirun.sh -n "$np" -- build/bin/bench_allreduce --out "bench/results/allreduce_np$np.json"
      done
      ;;
    pipeline) OMP_NUM_THREADS=1 bash launch/mpirun.sh -n 2 -- build/bin/bench_pipeline --out bench/results/pipeline.json --svg docs/pipeline_timeline.svg ;;
    pipeline_uniform)
      OMP_NUM_THREADS=1 bash launch/mpirun.sh -n 2 -- build/bin/bench_pipeline --model uniform \
        --out bench/results/pipeline_uniform.json --svg docs/pipeline_timeline_uniform.svg ;;
    trainer_overhead | checkpoint | index | paramserver) "build/bin/bench_$n" --out "bench/results/$n.json" ;;
    snaps)
      # Needs a trained detector and embedder: the runs of
      # configs/detector_snaps.textproto and configs/quickstart.textproto.
      build/bin/bench_snaps --detector "${DETECTOR_RUN:-runs/detector_snaps}" --embedder "${EMBEDDER_RUN:-runs/quickstart}" \
        --snaps 1000 --queries 2000 --out bench/results/snaps.json
      ;;
    *)
      bin="build/bin/bench_$n"
      [[ -x "$bin" ]] || { echo "no $bin: run launch/build.sh first" >&2; exit 1; }
      OMP_NUM_THREADS=1 "$bin" --benchmark_out="bench/results/$n.json" --benchmark_out_format=json
      ;;
  esac
done
