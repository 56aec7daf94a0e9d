#!/usr/bin/env bash
# bench/build_time: a from-scratch configure + build of everything (library,
# binaries, tests, benchmarks) in a temporary directory, timed.
# Goal (issue "Foundation"): under 10 minutes on 2 cores.
# Prints a table and writes bench/results/build_time.json.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${DTRAIN_JOBS:-$(nproc)}"
dir=$(mktemp -d /tmp/dtrain-buildtime.XXXXXX)
trap 'rm -rf "$dir"' EXIT
t0=$(date +%s.%N)
cmake -S . -B "$dir" -G Ninja -DDTRAIN_TORCH_DIR="${DTRAIN_TORCH_DIR:-/opt/dtrain/torch-2.11.0}" >"$dir/configure.log" 2>&1
t1=$(date +%s.%N)
cmake --build "$dir" -j "$JOBS" >"$dir/build.log" 2>&1
t2=$(date +%s.%N)
targets=$(grep -c "Linking" "$dir/build.log" || true)
units=$(grep -c "Building CXX" "$dir/build.log" || true)
configure=$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")
build=$(awk "BEGIN{printf \"%.1f\", $t2 - $t1}")
total=$(awk "BEGIN{printf \"%.1f\", $t2 - $t0}")
printf "%-28s %10s\n" "phase" "seconds"
printf "%-28s %10.1f\n" "configure" "$configure" "build ($units TUs, $targets links)" "$build" "total" "$total"
printf "%-28s %10s\n" "cores / jobs" "$(nproc) / $JOBS"
mkdir -p bench/results
cat > bench/results/build_time.json <<JSON
{"benchmark": "build_time", "cores": $(nproc), "jobs": $JOBS, "configure_s": $configure, "build_s": $build,
 "total_s": $total, "translation_units": $units, "links": $targets, "goal_total_s": 600,
 "host": "$(hostname)", "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
JSON
echo "wrote bench/results/build_time.json"
