"""`modassem train` as one job of several processes on localhost (JAX's distributed runtime, CPU collectives).

    python tests/processes.py PROCESSES DEVICES_EACH WORKDIR [modassem train flags ...]
    python tests/processes.py --preempt PROCESSES DEVICES_EACH WORKDIR [...]

Prints a JSON list with each process's stdout; exits non-zero with their
stderr if any process failed. With --preempt, the last process is sent
SIGTERM once process 0 has logged its first step (as when one host of a job
is preempted), then the same job runs again: prints the JSON object
{"stopped": [[returncode, stdout, stderr], ...], "rerun": [...]}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_with_devices(devices: int) -> dict:
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def train(processes: int, devices: int, workdir: str, args, timeout: float = 600, preempt: bool = False) -> list:
  """Runs the job; returns each process's (returncode, stdout, stderr)."""
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "modassem", "train", *args, f"--workdir={workdir}",
                             f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"],
                            cwd=REPO, env=env_with_devices(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for i in range(processes)]
  first_out = []
  if preempt:
    for line in procs[0].stdout:   # process 0 reports its steps; the last process is the one preempted
      first_out.append(line)
      if " step 1/" in line:
        procs[-1].send_signal(signal.SIGTERM)
        break
  outs = [None] * processes
  readers = [threading.Thread(target=lambda i=i: outs.__setitem__(i, procs[i].communicate(timeout=timeout)))
             for i in range(processes)]
  for r in readers:
    r.start()
  for r in readers:
    r.join()
  outs[0] = ("".join(first_out) + outs[0][0], outs[0][1])
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


if __name__ == "__main__":
  if sys.argv[1] == "--preempt":
    n, d, work, rest = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
    print(json.dumps({"stopped": train(n, d, work, rest, preempt=True), "rerun": train(n, d, work, rest)}))
    sys.exit(0)
  outs = train(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
  failed = [err for rc, _, err in outs if rc != 0]
  if failed:
    sys.exit("\n".join(e[-3000:] for e in failed))
  print(json.dumps([out for _, out, _ in outs]))
