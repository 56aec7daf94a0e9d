#!/usr/bin/env bash
# The main job on the embedded defaults, end to end, on a fresh machine:
# installs dependencies, builds, checks the job config and reads the data.
#
#   launch/quickstart.sh [CONFIG]      (default configs/sync_arcface.textproto)
#
# Training, checkpointing and indexing are added by the issues that build them;
# today the quickstart stops after the dataset summary.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/sync_arcface.textproto}"
bash launch/install-deps.sh
bash launch/build.sh
DTRAIN=build/bin/dtrain

echo
echo "== dtrain and its libraries"
"$DTRAIN" version
echo
echo "== job config $CONFIG"
"$DTRAIN" config check "$CONFIG"
mkdir -p runs
"$DTRAIN" config print "$CONFIG" --out runs/quickstart-config.textproto
echo "resolved config (every default spelled out): runs/quickstart-config.textproto"
echo
echo "== dataset"
"$DTRAIN" data summary
