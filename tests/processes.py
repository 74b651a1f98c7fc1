"""Jobs of several processes on localhost (JAX's distributed runtime, CPU collectives), the way hosts run them.

    python tests/processes.py SPEC_JSON

SPEC is {"processes": N, "devices": D, "parts": [[NAME, KIND, ARGS], ...],
"preempt": NAME or null, "rerun": {"workdir": DIR, "args": [FLAGS ...]} or
null}. N processes of D devices each join one distributed runtime, then run
the parts in order, each in the same processes (as a host runs one command
after another, without N new interpreters per command):
- "train": `modassem train ARGS` through the command line's own code;
- "reads": the records each process reads (reads.py) from the TFDS dataset
  in ARGS[0] (written there by process 0 unless it exists), for each
  START:STEPS of ARGS[1:];
- "agreed": each process's view of a finished run, the views differing, and
  what the processes agree on (`train._agreed`).
The part named by "preempt" has its last process sent SIGTERM once process 0
has logged its first step (as when one host of a job is preempted); it must be
the last part. "rerun" then runs `modassem train FLAGS --workdir=DIR` as a new
job of N new processes, with the coordinator flags a user passes.

Prints {"parts": {NAME: [[returncode, stdout, stderr] per process]},
"rerun": [[returncode, stdout, stderr] per process]} as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "@@part"   # a line each process writes to its stdout and stderr where a part starts, and where it ends


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_with_devices(devices: int) -> dict:
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def _communicate(procs, timeout: float, watch=None) -> list:
  """Each process's (returncode, stdout, stderr), every stream read in a thread of its own from the start: a pipe
  left unread fills, and a process writing to it stops (and with it the others, at their next collective).
  `watch(line)`, where given, sees process 0's stdout as it comes, line by line."""
  outs = [[[], []] for _ in procs]

  def read(i, k, stream):
    for line in stream:
      outs[i][k].append(line)
      if watch is not None and i == k == 0:
        watch(line)

  readers = [threading.Thread(target=read, args=(i, k, stream), daemon=True)
             for i, p in enumerate(procs) for k, stream in enumerate((p.stdout, p.stderr))]
  for r in readers:
    r.start()
  deadline = time.monotonic() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for r in readers:
    r.join()
  return [(p.returncode, "".join(out), "".join(err)) for p, (out, err) in zip(procs, outs)]


def train(processes: int, devices: int, workdir: str, args, timeout: float = 600) -> list:
  """`modassem train ARGS` as a job of new processes; returns each process's (returncode, stdout, stderr)."""
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "modassem", "train", *args, f"--workdir={workdir}",
                             f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"],
                            cwd=REPO, env=env_with_devices(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for i in range(processes)]
  return _communicate(procs, timeout)


def _member(coordinator: str, processes: int, process_id: int, spec: dict) -> None:
  """One process of the job: every part in turn, each between two marks."""
  import jax  # pylint: disable=g-import-not-at-top
  from modassem import cli, distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(coordinator, processes, process_id)
  for name, kind, args in spec["parts"]:
    for stream in (sys.stdout, sys.stderr):
      print(f"{MARK} {name}", file=stream, flush=True)
    rc = 0
    if kind == "train":
      rc = cli.main(["train", *args])
    elif kind == "reads":
      import reads  # pylint: disable=g-import-not-at-top
      print(json.dumps(reads.member(args[0], args[1:])), flush=True)
    elif kind == "agreed":
      from modassem import train as train_lib  # pylint: disable=g-import-not-at-top
      views = {0: (True, [1, 3]), 1: (False, [])}
      agreed = train_lib._agreed(*views[jax.process_index()], num_modules=4)  # pylint: disable=protected-access
      print(json.dumps(agreed), flush=True)
    else:
      raise ValueError(kind)
    for stream in (sys.stdout, sys.stderr):
      print(f"{MARK} {name} exit {rc}", file=stream, flush=True)


def _split(text: str) -> dict:
  """{part: [its text, its exit status, or None where the process did not end it]} of one process's stdout or
  stderr."""
  parts, name = {}, None
  for line in text.splitlines(keepends=True):
    if line.startswith(MARK + " "):
      words = line.split()
      if len(words) == 2:
        name = words[1]
        parts[name] = ["", None]
      else:
        parts[words[1]][1] = int(words[3])
        name = None
    elif name is not None:
      parts[name][0] += line
  return parts


def run(spec: dict, timeout: float = 900) -> dict:
  n, port = spec["processes"], free_port()
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--member", f"127.0.0.1:{port}", str(n),
                             str(i), json.dumps(spec)],
                            cwd=REPO, env=env_with_devices(spec["devices"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(n)]
  watch = None
  if spec.get("preempt"):
    assert spec["parts"][-1][0] == spec["preempt"], "the preempted part must be the last one"
    state = {"started": False, "sent": False}

    def watch(line):   # process 0 reports its steps; the last process is the one preempted
      state["started"] = state["started"] or line.strip() == f"{MARK} {spec['preempt']}"
      if state["started"] and not state["sent"] and " step 1/" in line:
        procs[-1].send_signal(signal.SIGTERM)
        state["sent"] = True
  outs = _communicate(procs, timeout, watch)
  parts = {name: [] for name, _, _ in spec["parts"]}
  for rc, out, err in outs:
    out_parts, err_parts = _split(out), _split(err)
    for name in parts:
      text, status = out_parts.get(name, ("", None))
      # A part a process did not end (it exited, or was stopped) takes the process's exit status; one it never
      # started, the tail of its stderr.
      part_err = err_parts[name][0] if name in err_parts else err[-3000:]
      parts[name].append([rc if status is None else status, text, part_err])
  result = {"parts": parts, "rerun": None}
  if spec.get("rerun"):
    result["rerun"] = train(n, spec["devices"], spec["rerun"]["workdir"], spec["rerun"]["args"])
  return result


if __name__ == "__main__":
  from modassem.cli import collect_less  # pylint: disable=g-import-not-at-top
  collect_less()   # as the command line does
  if sys.argv[1] == "--member":
    _member(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]))
    sys.exit(0)
  print(json.dumps(run(json.loads(sys.argv[1]))))
