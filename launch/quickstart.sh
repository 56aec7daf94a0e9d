#!/usr/bin/env bash
# The main job on the embedded defaults, end to end, on a fresh machine:
# installs dependencies, builds, reads the data, trains the ArcFace embedder
# (about 3.5 minutes on 2 cores) and prints its retrieval quality on the
# Fashion-MNIST test set beside the raw-pixel baseline.
#
#   launch/quickstart.sh [CONFIG] [--set k=v ...]    (default configs/quickstart.textproto)
#
# The run directory is runs/<job name>/: config.textproto, metrics.jsonl,
# model.pt, eval.json.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/quickstart.textproto
if [[ $# -gt 0 && $1 != --* ]]; then CONFIG=$1; shift; fi
bash launch/install-deps.sh
bash launch/build.sh
DTRAIN=build/bin/dtrain

echo
echo "== dtrain and its libraries"
"$DTRAIN" version
echo
echo "== dataset"
"$DTRAIN" data summary
echo
echo "== job config $CONFIG"
"$DTRAIN" config check "$CONFIG" "$@"
echo
echo "== training"
"$DTRAIN" run "$CONFIG" "$@"
