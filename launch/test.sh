#!/usr/bin/env bash
# The test command: installs dependencies, builds, runs every test with ctest.
# Exits non-zero when anything fails.
#
#   launch/test.sh [ctest options, e.g. -R Config or -L data]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install-deps.sh
bash launch/build.sh
echo "[test] running ctest"
ctest --test-dir "${DTRAIN_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)" --timeout 600 "$@"
