#!/usr/bin/env bash
# One machine, several GPUs: ONE process drives all of them (JAX's single
# controller), so no coordinator, ranks or torchrun are needed.
#
#   launch/multi_gpu.sh [--install] -- TRAIN_ARGS...
#
#   launch/multi_gpu.sh --install -- --config configs/deepfashion.py:stage1 \
#       --workdir runs/s1 --config.data.data_dir=/data/tfds
#
# The config's mesh (("data", -1), ("fsdp", F)) spreads the global batch over
# every visible GPU (-1 = all that are left); config.train.batch_size is the
# GLOBAL batch and must divide by the number of GPUs.
#
# Environment:
#   GPUS                  which GPUs, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES;
#                         default: all)
#   PYTHON                interpreter (default .venv/bin/python)
#   JAX_CUDA_EXTRA        the jax extra --install adds (default cuda12)
#   XLA_PYTHON_CLIENT_MEM_FRACTION  share of GPU memory JAX preallocates
#                         (default 0.90)
# --install runs `make install`, then adds the CUDA build of the installed jax
# version (the project pins only the CPU wheels).
#
# Preemption / time limits: rerun the same command; training resumes from
# the newest checkpoint in WORKDIR/checkpoints (data position included).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

PYTHON=${PYTHON:-.venv/bin/python}
JAX_CUDA_EXTRA=${JAX_CUDA_EXTRA:-cuda12}
INSTALL=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --install) INSTALL=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "error: no training arguments" >&2; usage >&2; exit 2
fi

cd "$(dirname "$0")/.."
if [[ $INSTALL -eq 1 ]]; then
  make install
  JAX_VERSION=$("$PYTHON" -c 'import jax; print(jax.__version__)')
  "$PYTHON" -m pip install -q "jax[${JAX_CUDA_EXTRA}]==${JAX_VERSION}"
fi
if [[ -n "${GPUS:-}" ]]; then
  export CUDA_VISIBLE_DEVICES="$GPUS"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export FPDM_DISTRIBUTED=off   # one process: never wait for peers

"$PYTHON" -c 'import jax; print("devices:", jax.devices())' >&2
exec "$PYTHON" -m fpdm_jax.train "$@"
