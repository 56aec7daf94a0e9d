#!/usr/bin/env bash
# A checkpoint crosses between pipeline and sync mode with its parameters
# intact: resuming a finished run in the other mode (no step left to train)
# evaluates a model with exactly the same retrieval figures.
#   pipeline_resume_intact.sh DTRAIN CONFIG WORK_DIR [--set k=v ...]
set -uo pipefail
DTRAIN=$1 CONFIG=$2 WORK=$3
shift 3
rm -rf "$WORK"
mkdir -p "$WORK"
fail() { echo "pipeline_resume_intact: $*" >&2; exit 1; }
figures() { python3 -c "import json; m = json.load(open('$1/eval.json'))['model']; print(m['precision_at_1'], m['map_at_r'])"; }
check() {  # RUN_DIR BEFORE WHAT
  local after
  after=$(figures "$1")
  echo "$3: before [$2], after [$after]"
  [[ "$after" == "$2" ]] || fail "$3 changed the model"
}
common=(--no-progress --set training.epochs=1 "$@")

"$DTRAIN" run "$CONFIG" "${common[@]}" --set launch.workers=2 --set "parallelism.pipeline={stages: 2 micro_batches: 4}" \
  --run-dir "$WORK/from_pipeline" || fail "pipeline run"
before=$(figures "$WORK/from_pipeline")
out=$("$DTRAIN" resume "$WORK/from_pipeline" --no-progress --set "parallelism.sync={}" 2>&1) || { echo "$out"; fail "sync resume"; }
grep -q "saved in pipeline mode" <<<"$out" || fail "the sync resume did not load the pipeline checkpoint"
check "$WORK/from_pipeline" "$before" "pipeline checkpoint resumed in sync mode"

"$DTRAIN" run "$CONFIG" "${common[@]}" --set launch.workers=2 --set "parallelism.sync={}" \
  --run-dir "$WORK/from_sync" || fail "sync run"
before=$(figures "$WORK/from_sync")
out=$("$DTRAIN" resume "$WORK/from_sync" --no-progress --set "parallelism.pipeline={stages: 2 micro_batches: 4 schedule: GPIPE}" 2>&1) ||
  { echo "$out"; fail "pipeline resume"; }
grep -q "saved in sync mode" <<<"$out" || fail "the pipeline resume did not load the sync checkpoint"
check "$WORK/from_sync" "$before" "sync checkpoint resumed as a pipeline"
echo "pipeline_resume_intact: ok"
