"""`modassem train` as one job of several processes on localhost (JAX's distributed runtime, CPU collectives).

    python tests/processes.py PROCESSES DEVICES_EACH WORKDIR [modassem train flags ...]

Prints a JSON list with each process's stdout; exits non-zero with their
stderr if any process failed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_with_devices(devices: int) -> dict:
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def train(processes: int, devices: int, workdir: str, args, timeout: float = 600) -> list:
  """Runs the job; returns each process's (returncode, stdout, stderr)."""
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "modassem", "train", *args, f"--workdir={workdir}",
                             f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"],
                            cwd=REPO, env=env_with_devices(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for i in range(processes)]
  outs = [p.communicate(timeout=timeout) for p in procs]
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


if __name__ == "__main__":
  outs = train(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
  failed = [err for rc, _, err in outs if rc != 0]
  if failed:
    sys.exit("\n".join(e[-3000:] for e in failed))
  print(json.dumps([out for _, out, _ in outs]))
