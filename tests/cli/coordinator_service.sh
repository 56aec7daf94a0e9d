#!/usr/bin/env bash
# dtrain-coordinator as a service, with the users' commands:
#   submit, status, logs; calls without the token and to no coordinator fail
#   clearly; kill -9 of the coordinator takes its job's processes with it,
#   and a coordinator started again on the same state directory recovers its
#   job table and finishes the job from its newest checkpoint; dtrain stop
#   leaves no process behind.
#   coordinator_service.sh DTRAIN DTRAIN_COORDINATOR CONFIG WORK_DIR [--set k=v ...]
set -uo pipefail
DTRAIN=$1 COORD=$2 CONFIG=$3 WORK=$4
shift 4
rm -rf "$WORK"
mkdir -p "$WORK"
STATE=$WORK/state
COORD_PID=""
cleanup() { [[ -n "$COORD_PID" ]] && kill "$COORD_PID" 2>/dev/null; wait 2>/dev/null; }
trap cleanup EXIT
fail() { echo "coordinator_service: $*" >&2; cat "$WORK"/coordinator*.log >&2 2>/dev/null; exit 1; }
# True once PID has ended (a zombie waiting for init to reap it counts), within 5 s.
gone() {
  for _ in $(seq 1 50); do
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null)
    [[ -z "$st" || "$st" == Z* ]] && return 0
    sleep 0.1
  done
  return 1
}

start_coordinator() {
  rm -f "$STATE/port"
  "$COORD" --state-dir "$STATE" --port-file "$STATE/port" >> "$WORK/coordinator.log" 2>&1 &
  COORD_PID=$!
  for _ in $(seq 1 100); do [[ -s "$STATE/port" ]] && break; sleep 0.1; done
  [[ -s "$STATE/port" ]] || fail "dtrain-coordinator did not start"
  ADDR=127.0.0.1:$(cat "$STATE/port")
}
dt() { "$DTRAIN" "$@" --coordinator "$ADDR" --token-file "$STATE/token"; }
field() {  # JOB ROW-PREFIX FIELD: from the status table
  dt status --job "$1" 2>/dev/null | awk -v p="$2" -v f="$3" '$1 " " $2 == p { print $(f); exit }'
}
job_state() { dt status --job "$1" 2>/dev/null | awk -v j="$1" '$1 == j { print $2; exit }'; }

start_coordinator
job=(--set launch.workers=1 --set launch.heartbeat_interval_s=0.5 "$@")
out=$(dt submit "$CONFIG" "${job[@]}" --set training.epochs=4 --run-dir "$WORK/run1") || fail "submit: $out"
echo "$out"
[[ "$out" == "submitted job quickstart-1 (run directory $WORK/run1)" ]] || fail "unexpected: $out"

# Unauthenticated and unreachable calls fail clearly.
out=$(DTRAIN_JOB_TOKEN=wrong "$DTRAIN" status --coordinator "$ADDR" 2>&1) && fail "a wrong token was accepted"
grep -q "wrong job token" <<<"$out" || fail "wrong token: $out"
out=$("$DTRAIN" status --coordinator 127.0.0.1:1 --token-file "$STATE/token" 2>&1) && fail "no coordinator, yet OK"
grep -q "cannot reach the coordinator at 127.0.0.1:1" <<<"$out" || fail "unreachable: $out"

# The job runs; status shows it and its worker.
for _ in $(seq 1 600); do
  step=$(field quickstart-1 "worker 0" 5)
  [[ "$step" =~ ^[0-9]+$ ]] && ((step >= 20)) && break
  sleep 0.2
done
dt status
pid=$(field quickstart-1 "worker 0" 4)
[[ "$pid" =~ ^[0-9]+$ ]] || fail "no worker pid in the status"
[[ "$(job_state quickstart-1)" == running || "$(job_state quickstart-1)" == checkpointing ]] || fail "job not running"

echo "kill -9 the coordinator (pid $COORD_PID)"
kill -9 "$COORD_PID"
wait "$COORD_PID" 2>/dev/null
gone "$pid" || fail "the worker $pid outlived its coordinator"

start_coordinator
for _ in $(seq 1 900); do
  s=$(job_state quickstart-1)
  [[ "$s" == completed || "$s" == failed ]] && break
  sleep 0.2
done
dt status
[[ "$(job_state quickstart-1)" == completed ]] || fail "the recovered job did not complete"
dt status --job quickstart-1 | grep -q "recovered by a restarted coordinator" || fail "no recovery reason"
logs=$(dt logs quickstart-1)
grep -q "worker-0" <<<"$logs" || fail "logs: $logs"
log=$(dt logs quickstart-1 -p worker-0)
grep -q "attempt 2" <<<"$log" || fail "worker-0 log has no second attempt"
grep -q "resuming quickstart from checkpoint" <<<"$log" || fail "the recovered job did not resume from a checkpoint"
grep -q "Precision@1" <<<"$log" || fail "the recovered job did not evaluate"

# dtrain stop ends every process of a job.
dt submit "$CONFIG" "${job[@]}" --set training.epochs=50 --run-dir "$WORK/run2" || fail "second submit"
for _ in $(seq 1 600); do
  step=$(field quickstart-2 "worker 0" 5)
  [[ "$step" =~ ^[0-9]+$ ]] && ((step >= 2)) && break
  sleep 0.2
done
pid=$(field quickstart-2 "worker 0" 4)
[[ "$pid" =~ ^[0-9]+$ ]] || fail "no pid for the second job's worker"
out=$(dt stop quickstart-2) || fail "stop: $out"
echo "$out"
[[ "$out" == "job quickstart-2: stopped" ]] || fail "stop said: $out"
gone "$pid" || fail "worker $pid is still there after dtrain stop"
pgrep -f "$STATE/jobs/quickstart-2" && fail "processes of quickstart-2 are left"
echo "coordinator_service: ok"
