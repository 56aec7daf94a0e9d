#!/usr/bin/env bash
# Runs two training commands and checks that their models' retrieval quality
# (eval.json of each run directory) agrees: Precision@1 and MAP@R within TOL.
#   compare_eval.sh TOL RUN_DIR_A RUN_DIR_B -- COMMAND_A... -- COMMAND_B...
set -uo pipefail
tol=$1 a=$2 b=$3
shift 3
[[ "${1:-}" == "--" ]] || { echo "compare_eval: usage: compare_eval.sh TOL DIR_A DIR_B -- CMD_A... -- CMD_B..." >&2; exit 2; }
shift
cmd_a=()
while [[ $# -gt 0 && "$1" != "--" ]]; do cmd_a+=("$1"); shift; done
shift
rm -rf "$a" "$b"
"${cmd_a[@]}" || { echo "compare_eval: the first command failed" >&2; exit 1; }
"$@" || { echo "compare_eval: the second command failed" >&2; exit 1; }
python3 - "$tol" "$a/eval.json" "$b/eval.json" <<'PY'
import json, sys
tol = float(sys.argv[1])
a = json.load(open(sys.argv[2]))["model"]
b = json.load(open(sys.argv[3]))["model"]
bad = False
for k in ("precision_at_1", "map_at_r"):
    d = abs(a[k] - b[k])
    print(f"{k}: {a[k]:.6f} vs {b[k]:.6f} (difference {d:.6f}, tolerance {tol})")
    bad |= d > tol
sys.exit(1 if bad else 0)
PY
