#!/usr/bin/env bash
# Runs the whole method for one preset on the machine at hand (one host, all its devices),
# phase by phase: meta, the K incubations (one after the other), assembly.
# Assumes: modassem installed, ImageNet prepared for TFDS (see README), and a shared
# filesystem path for RUNS. Usage: launch/local.sh configs/vit_b.py runs/vit_b [extra --config.* flags]
set -euo pipefail
CONFIG=${1:?config file, e.g. configs/vit_b.py}
RUNS=${2:?run root, e.g. runs/vit_b}
shift 2
K=${K:-4}
modassem train --config="$CONFIG:meta" --workdir="$RUNS/meta" "$@"
for i in $(seq 0 $((K - 1))); do
  modassem train --config="$CONFIG:incubate" --config.module="$i" --config.meta="$RUNS/meta" \
    --workdir="$RUNS/inc$i" "$@"
done
MODULES=$(seq -s, -f "$RUNS/inc%g" 0 $((K - 1)))
modassem train --config="$CONFIG:assemble" --config.modules="$MODULES" --workdir="$RUNS/assemble" "$@"
modassem eval --config="$CONFIG:assemble" --workdir="$RUNS/assemble" "$@"
