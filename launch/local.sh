#!/usr/bin/env bash
# Runs the whole method for one preset on the machine at hand (one host, one process that sees all
# its devices), phase by phase: meta, the K incubations, assembly, then evaluation of the assembled model.
# Assumes: modassem installed (`pip install -e '.[cpu]'`, or `.[gpu]` / `.[tpu]`); the preset's data prepared
# (ImageNet for TFDS, see README); RUNS on a disk with room for the checkpoints; K equal to the preset's
# number of modules (4 in every preset).
# Usage: launch/local.sh configs/vit_b.py runs/vit_b [extra --config.* flags]
# Env: MODE=each (default: one incubation run per module, one after the other) or MODE=all (one
#      `--config.module=all` run training the K modules together); K=4; DRY_RUN=1 prints the commands only.
# Rerunning resumes every unfinished run from its latest checkpoint and skips the finished ones.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/_lib.sh"

CONFIG=${1:?config file, e.g. configs/vit_b.py}
RUNS=${2:?run root, e.g. runs/vit_b}
shift 2
K=${K:-4}
MODE=${MODE:-each}

run_phases "$CONFIG" "$RUNS" "$@"
