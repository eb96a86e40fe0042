#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: one JAX process per TPU host (worker),
# all running the same command; they find each other through the TPU
# metadata (jax.distributed.initialize() with no arguments).
#
#   launch/tpu_pod.sh STEP [-- TRAIN_ARGS...]
#
#   export TPU_NAME=fpdm-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 BUCKET=my-bucket
#   launch/tpu_pod.sh all -- --config configs/deepfashion.py:stage1 \
#       --workdir /mnt/gcs/runs/s1 --config.data.data_dir=/mnt/gcs/tfds
#
# STEP is one of
#   create   gcloud compute tpus tpu-vm create (a --spot slice if SPOT=1)
#   setup    on every worker: copy this checkout (git archive HEAD, i.e. the
#            committed tree; or git clone REPO_URL), python3.11, `make install`,
#            the TPU jax build, and mount gs://$BUCKET at $MOUNT with gcsfuse
#   train    python -m fpdm_jax.train TRAIN_ARGS on all workers (--worker=all);
#            each worker's output also goes to ~/fpdm_logs/train.log
#   fetch    copy every worker's ~/fpdm_logs to logs/tpu/$TPU_NAME/worker_N/
#   delete   delete the slice (the bucket, hence the workdir, stays)
#   all      create, setup, train, fetch, delete (delete also on failure
#            when KEEP=0)
#
# Variables (environment):
#   TPU_NAME          slice name                      (default fpdm-jax)
#   ZONE              zone with quota for the type    (default us-central2-b)
#   ACCELERATOR_TYPE  e.g. v4-32 (4 hosts), v5litepod-16, v6e-16 (default v4-32)
#   RUNTIME_VERSION   TPU VM image (default tpu-ubuntu2204-base; v5e:
#                     v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
#   PROJECT           gcloud project (default: gcloud's configured one)
#   SPOT              1 for a Spot slice (cheaper, preemptible)  (default 0)
#   BUCKET            GCS bucket for the workdir and data (required for setup)
#   MOUNT             where it is mounted on every worker (default /mnt/gcs)
#   REPO_URL          git URL to clone instead of copying this checkout
#   REMOTE_DIR        checkout on the workers (default fpdm-jax, in ~)
#   KEEP              1: `all` keeps the slice at the end (default 0)
#
# The workdir must be a path every host sees: the gcsfuse mount of the bucket
# (gs:// URLs are not accepted as --workdir yet). The global batch
# (config.train.batch_size) is split over all chips of the slice.
#
# Preemption (Spot slices are reclaimed; the bucket keeps the checkpoints):
# run `launch/tpu_pod.sh all -- SAME TRAIN_ARGS` again. The new slice resumes
# from the newest checkpoint in the workdir, data position included, even
# with a different ACCELERATOR_TYPE.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

TPU_NAME=${TPU_NAME:-fpdm-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
SPOT=${SPOT:-0}
MOUNT=${MOUNT:-/mnt/gcs}
REMOTE_DIR=${REMOTE_DIR:-fpdm-jax}
KEEP=${KEEP:-0}

[[ $# -eq 0 ]] && { usage >&2; exit 2; }
STEP=$1; shift
case "$STEP" in -h|--help) usage; exit 0 ;; esac
[[ "${1:-}" == "--" ]] && shift
TRAIN_ARGS=("$@")

cd "$(dirname "$0")/.."
GC=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && LOC+=(--project="$PROJECT")

on_all() {  # run a bash command on every worker
  "${GC[@]}" ssh "$TPU_NAME" "${LOC[@]}" --worker=all --command="$1"
}

num_workers() {
  "${GC[@]}" describe "$TPU_NAME" "${LOC[@]}" --format=json \
    | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["networkEndpoints"]))'
}

do_create() {
  local extra=()
  [[ "$SPOT" == 1 ]] && extra+=(--spot)
  "${GC[@]}" create "$TPU_NAME" "${LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${extra[@]}"
}

do_setup() {
  : "${BUCKET:?set BUCKET (the GCS bucket holding the workdir and data)}"
  if [[ -n "${REPO_URL:-}" ]]; then
    on_all "rm -rf ~/$REMOTE_DIR && git clone --depth 1 $REPO_URL ~/$REMOTE_DIR"
  else
    local tarball
    tarball=$(mktemp --suffix=.tar.gz)
    git archive --format=tar.gz -o "$tarball" HEAD
    "${GC[@]}" scp "$tarball" "$TPU_NAME:~/fpdm-src.tar.gz" "${LOC[@]}" --worker=all
    rm -f "$tarball"
    on_all "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/fpdm-src.tar.gz -C ~/$REMOTE_DIR"
  fi
  # Python 3.11 (the image has 3.10), the project, the TPU jax build, gcsfuse.
  on_all "set -e
    sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv make curl lsb-release
    cd ~/$REMOTE_DIR && make install PYTHON=python3.11
    .venv/bin/pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\"
    if ! command -v gcsfuse >/dev/null; then
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
      curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
    fi
    sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
    mountpoint -q $MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $BUCKET $MOUNT"
}

do_train() {
  [[ ${#TRAIN_ARGS[@]} -eq 0 ]] && { echo "error: train needs -- TRAIN_ARGS" >&2; exit 2; }
  local args
  args=$(printf '%q ' "${TRAIN_ARGS[@]}")
  # FPDM_DISTRIBUTED=on: every worker must join (fail, never train alone).
  on_all "set -o pipefail; mkdir -p ~/fpdm_logs && cd ~/$REMOTE_DIR &&
    FPDM_DISTRIBUTED=on .venv/bin/python -m fpdm_jax.train $args 2>&1 | tee ~/fpdm_logs/train.log"
}

do_fetch() {
  local n w
  n=$(num_workers)
  for ((w = 0; w < n; w++)); do
    mkdir -p "logs/tpu/$TPU_NAME/worker_$w"
    "${GC[@]}" scp --recurse "$TPU_NAME:~/fpdm_logs/*" "logs/tpu/$TPU_NAME/worker_$w/" \
      "${LOC[@]}" --worker="$w" || echo "worker $w: no logs copied" >&2
  done
}

do_delete() {
  "${GC[@]}" delete "$TPU_NAME" "${LOC[@]}" --quiet
}

case "$STEP" in
  create) do_create ;;
  setup) do_setup ;;
  train) do_train ;;
  fetch) do_fetch ;;
  delete) do_delete ;;
  all)
    do_create
    if [[ "$KEEP" != 1 ]]; then
      trap 'do_fetch || true; do_delete' EXIT
    fi
    do_setup
    do_train
    ;;
  *) echo "unknown step $STEP" >&2; usage >&2; exit 2 ;;
esac
