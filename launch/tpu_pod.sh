#!/usr/bin/env bash
# Cloud TPU VM pod workflow: create the TPU VM, copy this repo to every worker, install, then run
# meta -> the K incubations -> assembly -> evaluation, each phase one `modassem` command started on all
# workers at once (`gcloud compute tpus tpu-vm ssh --worker=all`).
#   MODE=all (default): the incubations are one `--config.module=all` run on the same TPU VM.
#   MODE=slices: K more TPU VMs (slices) TPU_NAME-inc0..inc<K-1>, one per module, train module i each,
#                in parallel; they are deleted when done (KEEP_SLICES=1 keeps them). The main TPU VM idles
#                meanwhile and does the assembly.
# Assumes:
#   - gcloud installed and authenticated, a default project (or PROJECT=...), TPU quota for
#     ACCELERATOR_TYPE in ZONE (and K more of SLICE_ACCELERATOR_TYPE for MODE=slices);
#   - RUNS=gs://BUCKET/PATH in a bucket the TPU VMs' service account can write. modassem writes run
#     directories straight to the bucket (etils.epath and gcsfs for its files, Orbax and TensorStore for
#     checkpoints), so all workers and all slices see the same run directories with nothing mounted;
#   - multi-host TPU VMs (more than 8 cores/chips, e.g. v4-32) need jax.distributed.initialize() in every
#     process: modassem calls it when given --distributed (modassem/distributed.py; JAX then finds the
#     pod's workers from the TPU VM environment). This script adds --distributed to every modassem
#     command on a multi-host type (DISTRIBUTED=0/1 overrides that guess);
#   - the data readable from every worker, e.g. TFDS prepared in a bucket:
#     `--config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets` as an extra argument;
#   - K equal to the preset's number of modules (4 in every preset).
# Usage: RUNS=gs://BUCKET/modassem/vit_b launch/tpu_pod.sh [extra --config.* flags for every phase]
# Env (defaults): TPU_NAME=modassem ZONE=us-central2-b ACCELERATOR_TYPE=v4-32
#   RUNTIME_VERSION=tpu-ubuntu2204-base CONFIG=configs/vit_b.py MODE=all K=4 PROJECT= (gcloud's default)
#   SLICE_ACCELERATOR_TYPE=$ACCELERATOR_TYPE KEEP_SLICES=0 DELETE_TPU=0 (1: delete the TPU VM at the end)
#   DRY_RUN=1 prints every command (one per line, `+ ...`) and runs nothing.
# An ssh session that drops ends its run; rerunning the script resumes every unfinished run from its
# latest checkpoint, skips finished ones and reuses existing TPU VMs.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
source "$HERE/_lib.sh"

TPU_NAME=${TPU_NAME:-modassem}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
SLICE_ACCELERATOR_TYPE=${SLICE_ACCELERATOR_TYPE:-$ACCELERATOR_TYPE}
PROJECT=${PROJECT:-}
CONFIG=${CONFIG:-configs/vit_b.py}
MODE=${MODE:-all}
K=${K:-4}
KEEP_SLICES=${KEEP_SLICES:-0}
DELETE_TPU=${DELETE_TPU:-0}
RUNS=${RUNS:?RUNS=gs://BUCKET/PATH: the bucket path that holds the run directories}

[[ "$RUNS" == gs://?* ]] || die "RUNS=$RUNS: use a bucket path, gs://BUCKET/PATH (every worker must see it)"
[[ "$MODE" == all || "$MODE" == slices ]] || die "MODE=$MODE: use MODE=all (one module=all run) or MODE=slices"
WORK=${RUNS%/}
REMOTE_DIR=$(basename "$REPO")            # scp --recurse REPO puts it at ~/REMOTE_DIR

GFLAGS=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GFLAGS+=(--project="$PROJECT")

# dist_flag TYPE: --distributed for a multi-host accelerator type (more than 8 cores/chips).
dist_flag() {
  local n=${1##*-}
  if [[ "${DISTRIBUTED:-}" == 1 ]] || { [[ -z "${DISTRIBUTED:-}" && "$n" =~ ^[0-9]+$ ]] && ((n > 8)); }; then
    echo --distributed
  fi
}

tpu() { run gcloud compute tpus tpu-vm "$@" "${GFLAGS[@]}"; }

# on NAME REMOTE_COMMAND: run a shell command line on every worker of TPU VM NAME.
on() { tpu ssh "$1" --worker=all --command="$2"; }

# create NAME TYPE: create the TPU VM unless it exists (the check is skipped under DRY_RUN).
create() {
  if [[ "$DRY_RUN" != 1 ]] && gcloud compute tpus tpu-vm describe "$1" "${GFLAGS[@]}" >/dev/null 2>&1; then
    echo "TPU VM $1 exists: reusing it" >&2
    return
  fi
  tpu create "$1" --accelerator-type="$2" --version="$RUNTIME_VERSION" \
    --scopes=https://www.googleapis.com/auth/cloud-platform
}

# setup NAME: copy the repo to every worker and install modassem for TPU.
setup() {
  tpu scp --recurse "$REPO" "$1:~/" --worker=all
  on "$1" "cd ~/$REMOTE_DIR && python3 -m pip install -e '.[tpu]'"
}

# modassem_on NAME TYPE ARGS...: `modassem ARGS...` on every worker of NAME, plus --distributed when
# TYPE is multi-host, plus this script's extra arguments.
modassem_on() {
  local name=$1 type=$2
  shift 2
  local dist
  dist=$(dist_flag "$type")
  # until_done.sh: a worker whose run was preempted (exit status 75) runs it again, resuming it.
  on "$name" "cd ~/$REMOTE_DIR && export PATH=\"\$HOME/.local/bin:\$PATH\" && $(quote launch/until_done.sh modassem "$@" $dist ${EXTRA[@]+"${EXTRA[@]}"})"
}

EXTRA=("$@")
MODULES=()

create "$TPU_NAME" "$ACCELERATOR_TYPE"
setup "$TPU_NAME"
modassem_on "$TPU_NAME" "$ACCELERATOR_TYPE" train --config="$CONFIG:meta" --workdir="$WORK/meta"

if [[ "$MODE" == all ]]; then
  modassem_on "$TPU_NAME" "$ACCELERATOR_TYPE" train --config="$CONFIG:incubate" --config.module=all \
    --config.meta="$WORK/meta" --workdir="$WORK/inc"
  for ((i = 0; i < K; i++)); do MODULES+=("$WORK/inc"); done
else
  for ((i = 0; i < K; i++)); do
    create "$TPU_NAME-inc$i" "$SLICE_ACCELERATOR_TYPE"
    setup "$TPU_NAME-inc$i"
    MODULES+=("$WORK/inc$i")
  done
  # The K incubations are independent: one per slice, all at once.
  pids=()
  for ((i = 0; i < K; i++)); do
    if [[ "$DRY_RUN" == 1 ]]; then
      modassem_on "$TPU_NAME-inc$i" "$SLICE_ACCELERATOR_TYPE" train --config="$CONFIG:incubate" \
        --config.module="$i" --config.meta="$WORK/meta" --workdir="$WORK/inc$i"
    else
      modassem_on "$TPU_NAME-inc$i" "$SLICE_ACCELERATOR_TYPE" train --config="$CONFIG:incubate" \
        --config.module="$i" --config.meta="$WORK/meta" --workdir="$WORK/inc$i" &
      pids+=($!)
    fi
  done
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ wait"
  else
    failed=0
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    ((failed == 0)) || die "an incubation failed (see above); rerun the script to resume"
  fi
  if [[ "$KEEP_SLICES" != 1 ]]; then
    for ((i = 0; i < K; i++)); do tpu delete "$TPU_NAME-inc$i" --quiet; done
  fi
fi

modassem_on "$TPU_NAME" "$ACCELERATOR_TYPE" train --config="$CONFIG:assemble" \
  --config.modules="$(join_by , "${MODULES[@]}")" --workdir="$WORK/assemble"
modassem_on "$TPU_NAME" "$ACCELERATOR_TYPE" eval --config="$CONFIG:assemble" --workdir="$WORK/assemble"

if [[ "$DELETE_TPU" == 1 ]]; then
  tpu delete "$TPU_NAME" --quiet
elif [[ "$DRY_RUN" != 1 ]]; then
  echo "done; the TPU VM is still up: gcloud compute tpus tpu-vm delete $TPU_NAME --zone=$ZONE" >&2
fi
