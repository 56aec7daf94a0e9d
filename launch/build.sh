#!/usr/bin/env bash
# Configures (once) and builds dtrain incrementally in build/.
#
#   launch/build.sh [extra cmake -D options]
#
#   DTRAIN_BUILD_DIR   build directory (default: build)
#   DTRAIN_TORCH_DIR   torch venv (default: /opt/dtrain/torch-2.11.0)
#   DTRAIN_JOBS        parallel compile jobs (default: number of cores)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${DTRAIN_BUILD_DIR:-build}"
JOBS="${DTRAIN_JOBS:-$(nproc)}"
args=(-S . -B "$BUILD_DIR" -G Ninja -DDTRAIN_TORCH_DIR="${DTRAIN_TORCH_DIR:-/opt/dtrain/torch-2.11.0}")
if [[ ! -f "$BUILD_DIR/build.ninja" || $# -gt 0 ]]; then
  echo "[build] configuring $BUILD_DIR"
  cmake "${args[@]}" "$@" >"/tmp/dtrain-cmake-$$.log" 2>&1 || { cat "/tmp/dtrain-cmake-$$.log" >&2; exit 1; }
  grep -E "^-- dtrain:" "/tmp/dtrain-cmake-$$.log" | sed 's/^-- /[build] /' || true
  rm -f "/tmp/dtrain-cmake-$$.log"
fi
echo "[build] building in $BUILD_DIR with $JOBS job(s)"
start=$(date +%s)
cmake --build "$BUILD_DIR" -j "$JOBS"
echo "[build] done in $(( $(date +%s) - start )) s"
