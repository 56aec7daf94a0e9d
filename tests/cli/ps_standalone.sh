#!/usr/bin/env bash
# dtrain-ps as a standalone process (no mpirun): one worker trains against it
# through DTRAIN_PS_ADDRESSES; a worker with the wrong token is refused
# (UNAUTHENTICATED) and the shard is left untouched; SIGTERM stops the shard.
#   tests/cli/ps_standalone.sh DTRAIN_PS DTRAIN_WORKER CONFIG WORK_DIR [--set k=v]...
set -euo pipefail
ps=$1 worker=$2 config=$3 work=$4
shift 4
rm -rf "$work" && mkdir -p "$work"
export DTRAIN_JOB_TOKEN=token-$RANDOM$RANDOM
"$ps" --config "$config" "$@" --set 'parallelism.async={shards: 1}' --shard 0 --port-file "$work/port" \
  >"$work/ps.log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do [[ -s $work/port ]] && break; sleep 0.1; done
[[ -s $work/port ]] || { cat "$work/ps.log"; echo "dtrain-ps did not start" >&2; exit 1; }
export DTRAIN_PS_ADDRESSES=127.0.0.1:$(cat "$work/port")
echo "== dtrain-ps at $DTRAIN_PS_ADDRESSES"

# The wrong token: refused before anything is read.
if DTRAIN_JOB_TOKEN=wrong "$worker" --config "$config" "$@" --set 'parallelism.async={shards: 1}' \
    --run-dir "$work/bad" --no-progress >"$work/bad.out" 2>&1; then
  echo "a worker with the wrong token trained" >&2; exit 1
fi
grep -i "unauthenticated" "$work/bad.out"

"$worker" --config "$config" "$@" --set 'parallelism.async={shards: 1}' --run-dir "$work/run" --no-progress \
  | tee "$work/run.out"
grep -q "Precision@1" "$work/run.out"
grep -q '"applied"' "$work/run/paramserver.json"

kill -TERM "$pid"
for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$pid" 2>/dev/null; then echo "dtrain-ps did not stop on SIGTERM" >&2; exit 1; fi
cat "$work/ps.log"
# Only the good worker's pushes were applied (the bad one never initialised it).
grep -E "shard 0: version [1-9][0-9]*, applied [1-9][0-9]*, rejected stale 0, invalid 0" "$work/ps.log"
echo "ps_standalone: ok"
