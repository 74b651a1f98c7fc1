#!/usr/bin/env bash
# GPU launch: one host with all its GPUs, or several nodes.
# One process per node, and that process drives every local GPU (JAX sees them all: no per-GPU processes,
# no CUDA_VISIBLE_DEVICES splitting). On NNODES > 1 nodes, run this same script on every node with its
# NODE_RANK; each modassem command gets --coordinator/--num_processes/--process_id, so the nodes' GPUs form
# one device mesh (modassem/distributed.py calls jax.distributed.initialize with them).
# Assumes: CUDA 12 drivers on every node; Python >= 3.10 with pip; the repo checked out at the same
# commit on every node (this script installs it with `pip install -e '.[gpu]'`; INSTALL=0 skips that);
# for NNODES > 1, RUNS on a filesystem every node shares (NFS, Lustre, a FUSE-mounted bucket), the data
# readable from every node, and COORDINATOR=host:port of node 0 reachable from all nodes.
# Usage: [NNODES=2 NODE_RANK=0 COORDINATOR=10.0.0.1:1234] launch/gpu.sh configs/vit_b.py runs/vit_b [--config.*]
# Env: MODE=each|all (as in launch/local.sh, default each), K=4, INSTALL=1, DRY_RUN=1 prints the commands only.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
source "$HERE/_lib.sh"

CONFIG=${1:?config file, e.g. configs/vit_b.py}
RUNS=${2:?run root, e.g. runs/vit_b (shared by all nodes when NNODES > 1)}
shift 2
K=${K:-4}
MODE=${MODE:-each}
INSTALL=${INSTALL:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
COORDINATOR=${COORDINATOR:-}

DIST=()
if ((NNODES > 1)); then
  [[ -n "$COORDINATOR" ]] || die "NNODES=$NNODES needs COORDINATOR=host:port (node 0's address, the same on every node)"
  ((NODE_RANK >= 0 && NODE_RANK < NNODES)) || die "NODE_RANK=$NODE_RANK: use 0..$((NNODES - 1))"
  DIST=(--coordinator="$COORDINATOR" --num_processes="$NNODES" --process_id="$NODE_RANK")
fi

if [[ "$INSTALL" == 1 ]]; then
  run python3 -m pip install -e "$REPO[gpu]"
fi
run_phases "$CONFIG" "$RUNS" ${DIST[@]+"${DIST[@]}"} "$@"
