#!/usr/bin/env bash
# N local CPU processes training together, as the hosts of a pod would.
#
#   launch/local_multiprocess.sh [options] -- TRAIN_ARGS...
#
#   launch/local_multiprocess.sh -n 2 -d 2 -- \
#       --config configs/synthetic.py:stage1_quick --workdir runs/mp \
#       --config.data.data_dir=demo_out/data
#
# Reproduces tests/test_multiprocess.py by hand: every process gets
#   JAX_PLATFORMS=cpu
#   XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES  (simulated devices)
#   FPDM_COORDINATOR=localhost:$PORT  FPDM_NUM_PROCESSES=$N  FPDM_PROCESS_ID=i
#   FPDM_CPU_COLLECTIVES=gloo            (cross-process collectives on CPU)
# and runs `python -m fpdm_jax.train TRAIN_ARGS`. The global batch
# (config.train.batch_size) is split over the processes; the batches are the
# same as one process would train on. Rerunning the same command resumes
# from the newest checkpoint in the workdir, with any N.
#
# Options (or the environment variables in brackets):
#   -n N        processes                        [NUM_PROCESSES, default 2]
#   -d D        simulated CPU devices per process [DEVICES_PER_PROCESS, default 2]
#   -p PORT     coordinator port                 [PORT, default 12355]
#   -l DIR      per-process logs                 [LOGDIR, default logs/local_multiprocess]
#   PYTHON      interpreter                      [default .venv/bin/python]
# Process 0's log is also printed. If one process fails, the others are
# stopped. Keep D small on a loaded machine: XLA's CPU collectives abort
# after a 40 s rendezvous timeout.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
PORT=${PORT:-12355}
LOGDIR=${LOGDIR:-logs/local_multiprocess}
PYTHON=${PYTHON:-.venv/bin/python}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) NUM_PROCESSES=$2; shift 2 ;;
    -d) DEVICES_PER_PROCESS=$2; shift 2 ;;
    -p) PORT=$2; shift 2 ;;
    -l) LOGDIR=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (train arguments go after --)" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "error: no training arguments after --" >&2; usage >&2; exit 2
fi

cd "$(dirname "$0")/.."
mkdir -p "$LOGDIR"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do [[ -n "$pid" ]] && kill "$pid" 2>/dev/null; done; true
}
trap cleanup EXIT INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
  FPDM_COORDINATOR="localhost:${PORT}" \
  FPDM_NUM_PROCESSES="$NUM_PROCESSES" \
  FPDM_PROCESS_ID="$i" \
  FPDM_CPU_COLLECTIVES=gloo \
    "$PYTHON" -m fpdm_jax.train "$@" > "$LOGDIR/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started ${NUM_PROCESSES} processes x ${DEVICES_PER_PROCESS} devices; logs in $LOGDIR" >&2
tail -n +1 -f "$LOGDIR/process_0.log" --pid="${pids[0]}" &
tailer=$!

status=0
while true; do
  running=0
  for idx in "${!pids[@]}"; do
    pid=${pids[$idx]}
    [[ -z "$pid" ]] && continue
    if kill -0 "$pid" 2>/dev/null; then
      running=1
    else
      rc=0; wait "$pid" || rc=$?
      pids[$idx]=""
      if [[ $rc -ne 0 ]]; then
        echo "process $idx exited with $rc (log: $LOGDIR/process_$idx.log); stopping the others" >&2
        status=$rc
        break 2
      fi
    fi
  done
  [[ $running -eq 0 ]] && break
  sleep 1
done
[[ $status -ne 0 ]] && cleanup
wait "$tailer" 2>/dev/null || true
exit "$status"
