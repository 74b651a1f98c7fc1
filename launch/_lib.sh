# Shared by the launch scripts (sourced, not run). Assumes bash >= 4.
# DRY_RUN=1: every command is printed as `+ CMD ARGS...` (shell-quoted, one per line, on stdout) and
# nothing is run. Otherwise each command is echoed the same way on stderr, then run.
DRY_RUN=${DRY_RUN:-0}

# quote ARGS...: the arguments as one shell line; single quotes only where an argument needs them.
quote() {
  local a out=() q="'\\''"
  for a in "$@"; do
    if [[ -n "$a" && "$a" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ && "$a" != '~'* ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/$q}'")
    fi
  done
  echo "${out[*]}"
}

# run CMD...: runs it; while it exits with EXIT_PREEMPTED (a modassem run stopped by SIGTERM or Ctrl-C after
# saving a checkpoint), runs it again, which resumes the run (at most MAX_RERUNS times).
EXIT_PREEMPTED=75
MAX_RERUNS=${MAX_RERUNS:-20}
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote "$@")"
    return
  fi
  local rc reruns=0
  while true; do
    echo "+ $(quote "$@")" >&2
    rc=0
    "$@" || rc=$?
    if ((rc != EXIT_PREEMPTED || reruns >= MAX_RERUNS)); then
      return "$rc"
    fi
    reruns=$((reruns + 1))
    echo "$(basename "$0"): $1 was preempted (exit status $EXIT_PREEMPTED): running it again to resume" \
      "($reruns/$MAX_RERUNS)" >&2
  done
}

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# join_by SEP ITEMS...: the items joined by SEP (one character).
join_by() {
  local IFS=$1
  shift
  echo "$*"
}

# run_phases CONFIG RUNS [FLAGS...]: meta, the K incubations, assembly, evaluation, in that order, on this
# host, with FLAGS appended to every modassem command. MODE=each: one incubation run per module (RUNS/inc<i>),
# one after the other; MODE=all: one `--config.module=all` run (RUNS/inc) listed K times in the assembly.
run_phases() {
  local config=$1 runs=$2 i
  shift 2
  local modules=()
  run modassem train --config="$config:meta" --workdir="$runs/meta" "$@"
  case "$MODE" in
    each)
      for ((i = 0; i < K; i++)); do
        run modassem train --config="$config:incubate" --config.module="$i" --config.meta="$runs/meta" \
          --workdir="$runs/inc$i" "$@"
        modules+=("$runs/inc$i")
      done
      ;;
    all)
      run modassem train --config="$config:incubate" --config.module=all --config.meta="$runs/meta" \
        --workdir="$runs/inc" "$@"
      for ((i = 0; i < K; i++)); do modules+=("$runs/inc"); done
      ;;
    *) die "MODE=$MODE: use MODE=each (one run per module) or MODE=all (one module=all run)" ;;
  esac
  run modassem train --config="$config:assemble" --config.modules="$(join_by , "${modules[@]}")" \
    --workdir="$runs/assemble" "$@"
  run modassem eval --config="$config:assemble" --workdir="$runs/assemble" "$@"
}
