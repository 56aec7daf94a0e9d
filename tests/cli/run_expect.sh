#!/usr/bin/env bash
# Runs a command and checks both its exit status and its output:
#   tests/cli/run_expect.sh RC REGEX [REGEX...] -- COMMAND [ARGS...]
# RC is the expected exit status ("nonzero" for any failure); every REGEX (an
# extended regular expression) must match some line of stdout+stderr.
set -uo pipefail
want_rc="$1"
shift
regexes=()
while [[ $# -gt 0 && "$1" != "--" ]]; do regexes+=("$1"); shift; done
[[ "${1:-}" == "--" ]] || { echo "run_expect: usage: run_expect.sh RC REGEX... -- COMMAND..." >&2; exit 2; }
shift
out=$("$@" 2>&1)
rc=$?
printf '%s\n' "$out"
if [[ "$want_rc" == nonzero ]]; then
  [[ $rc -ne 0 ]] || { echo "run_expect: expected a failure, the command exited 0" >&2; exit 1; }
else
  [[ $rc -eq $want_rc ]] || { echo "run_expect: exit status $rc, expected $want_rc" >&2; exit 1; }
fi
for re in "${regexes[@]}"; do
  grep -Eq -- "$re" <<<"$out" || { echo "run_expect: no line of the output matches /$re/" >&2; exit 1; }
done
echo "run_expect: ok (exit $rc; output matches ${regexes[*]})"
