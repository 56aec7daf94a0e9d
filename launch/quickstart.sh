#!/usr/bin/env bash
# The main job on the embedded defaults, end to end, on a fresh machine:
# installs dependencies, builds, reads the data, trains the ArcFace embedder
# (about 4.5 minutes on 2 cores), prints its retrieval quality on the
# Fashion-MNIST test set beside the raw-pixel baseline, builds an HNSW index
# of the 60,000 training images with the model (about a minute) and prints
# the top-5 results for a few test images.
#
#   launch/quickstart.sh [CONFIG] [--set k=v ...]    (default configs/quickstart.textproto)
#
# The run directory is runs/<job name>/: config.textproto, metrics.jsonl,
# model.pt, eval.json, index/.
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
RESOLVED=$("$DTRAIN" config print "$CONFIG" "$@")
RUN_DIR=$(sed -n 's/^run_dir: "\(.*\)"$/\1/p' <<<"$RESOLVED")
INDEX_DIR=$(sed -n 's/^  output_dir: "\(.*\)"$/\1/p' <<<"$RESOLVED")
if grep -q "^  build_at_end: true" <<<"$RESOLVED"; then
  echo
  echo "== retrieval: the top-5 training images for four test images (* = same class as the query)"
  "$DTRAIN" index query "$INDEX_DIR" --dataset test:0,1,2,3 -k 5
fi
echo
echo "== the run"
"$DTRAIN" status "$RUN_DIR"
