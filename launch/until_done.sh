#!/usr/bin/env bash
# Runs CMD...; while it exits with status 75 (a modassem run stopped by SIGTERM or Ctrl-C after saving a
# checkpoint: a preemption), runs it again, which resumes the run. Any other status ends it with that status.
# Used on the workers of a TPU VM (launch/tpu_pod.sh); the other scripts do the same through _lib.sh's `run`.
# Usage: launch/until_done.sh modassem train --config=... --workdir=...   Env: MAX_RERUNS=20
set -uo pipefail
MAX_RERUNS=${MAX_RERUNS:-20}
reruns=0
while true; do
  "$@"
  rc=$?
  if ((rc != 75 || reruns >= MAX_RERUNS)); then
    exit "$rc"
  fi
  reruns=$((reruns + 1))
  echo "$(basename "$0"): $1 was preempted (exit status 75): running it again to resume ($reruns/$MAX_RERUNS)" >&2
done
