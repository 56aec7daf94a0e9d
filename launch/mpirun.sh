#!/usr/bin/env bash
# Runs a dtrain program under Open MPI's mpirun with the flags a container and
# a small machine need. `dtrain run` uses it for jobs of several workers
# (launch.workers > 1, or launcher: MPIRUN); use it directly for cluster jobs:
#
#   launch/mpirun.sh -n 4 [--hostfile hosts.txt] [--oversubscribe] [--bind-to none|core] [--mpi-arg ARG]... -- \
#       build/bin/dtrain-worker --config configs/sync_arcface.textproto
#
# An async job adds its parameter-server shards as the first program of an
# MPMD line, with the workers' arguments:
#   launch/mpirun.sh -n 2 --ps 2 --ps-program build/bin/dtrain-ps -- build/bin/dtrain-worker --config JOB
# runs  mpirun ... -np 2 dtrain-ps --config JOB : -np 2 dtrain-worker --config JOB
#
# What it adds to mpirun:
#   --allow-run-as-root        when run as root (containers)
#   --bind-to none             ranks are not pinned to cores: each rank sizes
#                              its own thread pool (cores / ranks on the node),
#                              and a container's cgroup may not match the cores
#                              hwloc sees. Exception (unless --bind-to is
#                              given): without a hostfile and with exactly one
#                              rank per core (one thread each), each rank is
#                              bound to its core (--bind-to core), which kept
#                              the ranks' helper threads off each other's core
#                              and measured 5-10% faster on 2 cores
#                              (docs/benchmarks.md)
#   --host localhost:N         without a hostfile: N slots on this machine,
#                              whatever the core count (mpirun would otherwise
#                              count physical cores and refuse more ranks)
#   --oversubscribe            only when asked (more ranks than slots)
#   --mca mpi_yield_when_idle 1  without a hostfile, when N > cores: a rank
#                              waiting inside MPI yields its core
#   --mca btl_vader_single_copy_mechanism cma|none
#                              the shared-memory transport copies a large
#                              message once, straight from the sender's
#                              memory (cross-memory attach, CMA), where the
#                              kernel allows it; many containers forbid it
#                              (seccomp, Yama), and then it falls back to
#                              copying through shared buffers in 32 KiB
#                              pieces, each needing both sides to poll.
#                              Without a hostfile this script probes
#                              whether a process may read another's memory
#                              here (launch/cma_probe.py) and picks cma when
#                              it may (a 1 MB activation between pipeline
#                              stages: 2.3 ms with none, 0.6-0.9 ms with cma;
#                              docs/benchmarks.md); with a hostfile, none.
#                              DTRAIN_MPI_SINGLE_COPY=cma|none overrides.
#   -x VAR                     for PATH, LD_LIBRARY_PATH, OMP_NUM_THREADS when
#                              set, and every DTRAIN_* variable
#
#   DTRAIN_MPIRUN   the mpirun binary (default: mpirun on PATH)
#
# Exit status: mpirun's (non-zero when any rank fails or the job was aborted).
set -euo pipefail

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

np="" hostfile="" oversubscribe=0 bind="" extra=() ps=0 ps_program=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|-np) np="${2:?-n needs a number}"; shift 2 ;;
    --hostfile) hostfile="${2:?--hostfile needs a file}"; shift 2 ;;
    --oversubscribe) oversubscribe=1; shift ;;
    --bind-to) bind="${2:?--bind-to needs none or core}"; shift 2 ;;
    --mpi-arg) extra+=("${2:?--mpi-arg needs a value}"); shift 2 ;;
    --ps) ps="${2:?--ps needs a number}"; shift 2 ;;
    --ps-program) ps_program="${2:?--ps-program needs a path}"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch/mpirun.sh: unknown option '$1' (the program comes after --)" >&2; usage 2 ;;
  esac
done
[[ -n "$np" && "$np" =~ ^[1-9][0-9]*$ ]] || { echo "launch/mpirun.sh: -n N (ranks, >= 1) is required" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "launch/mpirun.sh: no program given after --" >&2; exit 2; }
[[ "$ps" =~ ^[0-9]+$ ]] || { echo "launch/mpirun.sh: --ps needs a number of shards" >&2; exit 2; }
if ((ps > 0)); then
  [[ -x "$ps_program" ]] || { echo "launch/mpirun.sh: --ps needs --ps-program (dtrain-ps), got '$ps_program'" >&2; exit 2; }
fi
total=$((np + ps))
MPIRUN="${DTRAIN_MPIRUN:-mpirun}"
command -v "$MPIRUN" >/dev/null || { echo "launch/mpirun.sh: $MPIRUN not found (launch/install-deps.sh installs openmpi-bin)" >&2; exit 2; }

if [[ -z "$bind" ]]; then
  bind=none
  [[ -z "$hostfile" && "$total" -gt 1 && "$total" -eq "$(nproc)" ]] && bind=core
fi
single_copy="${DTRAIN_MPI_SINGLE_COPY:-auto}"
case "$single_copy" in
  cma|none) ;;
  auto)
    single_copy=none
    if [[ -z "$hostfile" ]] && command -v python3 >/dev/null &&
      python3 "$(dirname "${BASH_SOURCE[0]}")/cma_probe.py" 2>/dev/null; then
      single_copy=cma
    fi
    ;;
  *) echo "launch/mpirun.sh: DTRAIN_MPI_SINGLE_COPY must be cma, none or auto, got '$single_copy'" >&2; exit 2 ;;
esac
args=(--bind-to "$bind" --mca btl_vader_single_copy_mechanism "$single_copy")
[[ $(id -u) -eq 0 ]] && args+=(--allow-run-as-root)
if [[ -n "$hostfile" ]]; then
  [[ -r "$hostfile" ]] || { echo "launch/mpirun.sh: hostfile $hostfile not readable" >&2; exit 2; }
  args+=(--hostfile "$hostfile")
else
  args+=(--host "localhost:$total")
  # More ranks than cores: ranks waiting inside MPI yield the core.
  ((total > $(nproc))) && args+=(--mca mpi_yield_when_idle 1)
fi
((oversubscribe)) && args+=(--oversubscribe)
for v in PATH LD_LIBRARY_PATH OMP_NUM_THREADS; do
  [[ -n "${!v:-}" ]] && args+=(-x "$v")
done
while IFS='=' read -r name _; do
  [[ "$name" == DTRAIN_* ]] && args+=(-x "$name")
done < <(env)
if ((ps > 0)); then
  # The shards get the workers' arguments (dtrain-ps accepts them).
  exec "$MPIRUN" "${args[@]}" "${extra[@]}" -np "$ps" "$ps_program" "${@:2}" : -np "$np" "$@"
fi
exec "$MPIRUN" "${args[@]}" "${extra[@]}" -np "$np" "$@"
