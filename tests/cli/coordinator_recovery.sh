#!/usr/bin/env bash
# dtrain run (embedded coordinator, 2 sync workers under mpirun) recovers
# from a worker killed with SIGKILL and from a hung one (SIGSTOP: alive but
# silent, caught by the heartbeat timeout; before that, the job is reported
# stalled, since its other worker heartbeats without progress): each time it stops what is left
# of the job, restarts it from the newest checkpoint, and the job completes
# with the Precision@1 of an uninterrupted run (within 0.01), its checkpoints
# intact and no process left behind.
#   coordinator_recovery.sh DTRAIN CONFIG WORK_DIR [--set k=v ...]
set -uo pipefail
DTRAIN=$1 CONFIG=$2 WORK=$3
shift 3
rm -rf "$WORK"
mkdir -p "$WORK"
REF=$WORK/reference RUN=$WORK/recovered
common=(--set launch.workers=2 --set launch.heartbeat_interval_s=0.5 --set launch.heartbeat_timeout_s=6
        --set launch.stall_timeout_s=2
        --set launch.restart_backoff_s=0.5 --no-progress "$@")
fail() { echo "coordinator_recovery: $*" >&2; cat "$WORK/run.log" >&2 2>/dev/null; exit 1; }

"$DTRAIN" run "$CONFIG" "${common[@]}" --run-dir "$REF" > "$WORK/reference.log" 2>&1 ||
  { cat "$WORK/reference.log"; fail "the uninterrupted run failed"; }

"$DTRAIN" run "$CONFIG" "${common[@]}" --run-dir "$RUN" > "$WORK/run.log" 2>&1 &
RUN_PID=$!

# "PID STEP" of a worker from one `dtrain status RUN` snapshot (its row reads
# "worker R  HOST  PID  STEP ...", "-" for what is not known yet).
worker_row() {  # RANK
  "$DTRAIN" status "$RUN" 2>/dev/null | awk -v r="$1" '$1 == "worker" && $2 == r { print $4, $5; exit }'
}
# Waits until worker RANK of the attempt whose start ATTEMPT_MARKER logs has
# registered (its pid is known) and reached MIN_STEP; sets `pid`. The marker
# is looked for first: the coordinator saves the new attempt's empty process
# rows before it logs the marker, so a row read after it is of that attempt.
wait_step() {  # RANK MIN_STEP ATTEMPT_MARKER
  for _ in $(seq 1 600); do
    kill -0 $RUN_PID 2>/dev/null || fail "dtrain run ended before worker $1 reached step $2"
    if grep -q "$3" "$WORK/run.log"; then
      local p s
      read -r p s <<< "$(worker_row "$1")"
      if [[ "$p" =~ ^[0-9]+$ && "$s" =~ ^[0-9]+$ ]] && ((s >= $2)); then
        pid=$p
        return 0
      fi
    fi
    sleep 0.2
  done
  fail "worker $1 never reached step $2"
}

wait_step 1 24 "attempt 1: starting launcher"
echo "killing worker 1 (pid $pid) with SIGKILL"
kill -9 "$pid" || fail "cannot kill $pid"

wait_step 0 60 "attempt 2: starting launcher"
echo "stopping worker 0 (pid $pid) with SIGSTOP: it hangs"
kill -STOP "$pid" || fail "cannot stop $pid"

wait $RUN_PID
rc=$?
cat "$WORK/run.log"
[[ $rc -eq 0 ]] || fail "dtrain run exited $rc"
grep -q "restart 1 of 3" "$WORK/run.log" || fail "no first restart"
grep -Eq "exited on signal 9|killed by signal 9|was killed" "$WORK/run.log" || fail "the SIGKILL is not named"
grep -q "restart 2 of 3" "$WORK/run.log" || fail "no second restart"
grep -q "sent no heartbeat for" "$WORK/run.log" || fail "the hang was not caught by the heartbeat timeout"
grep -q "stalled: no progress for [0-9]* s at step" "$WORK/run.log" || fail "the hang was not reported as a stall first"
grep -q "resuming quickstart from checkpoint" "$WORK/run.log" || fail "the restarts did not resume from a checkpoint"
grep -q "completed after 2 restart(s)" "$WORK/run.log" || fail "the job did not complete after 2 restarts"

# No process of the job left.
sleep 0.5
if pgrep -f "$RUN/coordinator/jobs" >/dev/null; then
  pgrep -af "$RUN/coordinator/jobs" >&2
  fail "processes of the job are left behind"
fi
# Checkpoints: the newest is the final step, every one verifies.
"$DTRAIN" ckpt inspect "$RUN" > "$WORK/inspect.log" 2>&1 || { cat "$WORK/inspect.log"; fail "the newest checkpoint does not verify"; }
# The same checkpoints as the uninterrupted run (the store keeps the newest
# checkpoint.keep_last): none lost, none extra.
steps() { "$DTRAIN" ckpt list "$1" | awk '$1 ~ /^[0-9]+$/ { print $1 }' | sort -n | tr '\n' ' '; }
ref_steps=$(steps "$REF")
run_steps=$(steps "$RUN")
echo "checkpoints: uninterrupted [$ref_steps], recovered [$run_steps]"
[[ -n "$ref_steps" && "$ref_steps" == "$run_steps" ]] || fail "checkpoints [$run_steps], uninterrupted [$ref_steps]"

ref=$(python3 -c "import json;print(json.load(open('$REF/eval.json'))['model']['precision_at_1'])")
got=$(python3 -c "import json;print(json.load(open('$RUN/eval.json'))['model']['precision_at_1'])")
echo "Precision@1: uninterrupted $ref, recovered twice $got"
python3 -c "import sys; sys.exit(0 if abs($ref - $got) <= 0.01 else 1)" || fail "Precision@1 $got is not within 0.01 of $ref"
echo "coordinator_recovery: ok"
