#!/usr/bin/env bash
# dtrain-indexer as a real process on loopback: builds and serves an index for
# `dtrain index build|query --server`, refuses a wrong token, and stops on
# SIGTERM leaving no process behind.
#   tests/cli/indexer_service.sh DTRAIN_INDEXER DTRAIN RUN_DIR
set -euo pipefail
indexer=$1 dtrain=$2 run=$3
work=$(mktemp -d)
export DTRAIN_JOB_TOKEN=token-$RANDOM$RANDOM
"$indexer" --port 0 --port-file "$work/port" --threads 1 >"$work/indexer.log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 100); do [[ -s $work/port ]] && break; sleep 0.1; done
[[ -s $work/port ]] || { cat "$work/indexer.log"; echo "dtrain-indexer did not start" >&2; exit 1; }
addr=127.0.0.1:$(cat "$work/port")
echo "== dtrain-indexer at $addr"

"$dtrain" index build "$run" --server "$addr" --kind ivf --nlist 16 --limit 800 --out "$run/index_service" | tee "$work/build.out"
grep -q "IVF index of 800 images" "$work/build.out"
"$dtrain" index query --server "$addr" --dataset test:0,3 -k 4 | tee "$work/query.out"
grep -q "query fashion_mnist:test\[3\]" "$work/query.out"

# A wrong token: UNAUTHENTICATED, and the served index is unchanged.
if DTRAIN_JOB_TOKEN=wrong "$dtrain" index build "$run" --server "$addr" --kind flat --out "$run/index_service" \
    >"$work/bad.out" 2>&1; then
  echo "a build with the wrong token succeeded" >&2; exit 1
fi
cat "$work/bad.out"
grep -q "Unauthenticated.*wrong job token" "$work/bad.out"
grep -q "kind: IVF" "$run/index_service/manifest.textproto"

kill -TERM "$pid"
for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$pid" 2>/dev/null; then echo "dtrain-indexer did not stop on SIGTERM" >&2; exit 1; fi
grep -q "dtrain-indexer stopped" "$work/indexer.log"
echo "indexer_service: ok"
