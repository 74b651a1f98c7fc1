"""2 processes x 4 simulated devices on localhost (JAX's distributed runtime, CPU collectives) against the
session's one-process meta run of the same config: the same losses, the same parameters, and a resume on the
two processes."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from conftest import REPO, TINY, devices_env
from modassem import checkpoints

# The tiny preset's defaults: the config of the session's meta run (6 steps, a checkpoint every 3).
ARGS = [f"--config={TINY}:meta"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  return devices_env(devices)


def _train_two_processes(workdir):
  """The two-process run; returns each process's (stdout, stderr)."""
  port = _free_port()
  procs = [
      subprocess.Popen([sys.executable, "-m", "modassem", "train", *ARGS, f"--workdir={workdir}",
                        f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                       cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (stdout, stderr) in zip(procs, outs):
    assert p.returncode == 0, stderr[-3000:]
  return outs


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]


def _modules(workdir):
  """Every module's arrays, restored onto this (one-device) process whatever topology wrote them."""
  ckptr, device = ocp.StandardCheckpointer(), jax.sharding.SingleDeviceSharding(jax.devices()[0])
  out = []
  for k in range(4):
    path = checkpoints.module_dir(workdir, k)
    saved = ckptr.metadata(path).item_metadata.tree
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    out += [np.asarray(x) for x in jax.tree_util.tree_leaves(ckptr.restore(path, target))]
  return out


def test_two_processes_match_one_and_resume(runs, tmp_path):
  one, two = runs["meta"], str(tmp_path / "two")
  outs = _train_two_processes(two)
  # Process 0 reports; process 1 stays quiet.
  assert "meta done" in outs[0][0] and "meta done" not in outs[1][0]
  assert len(_losses(two)) == len(_losses(one)) == 3
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=2e-5)
  for a, b in zip(_modules(two), _modules(one), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  # Back to the state of a run stopped after its step-3 checkpoint, then the same two-process command.
  final = _modules(two)
  for d in ("modules", "checkpoints/6"):
    shutil.rmtree(os.path.join(two, d))
  os.remove(os.path.join(two, "results.json"))
  outs = _train_two_processes(two)
  assert "resuming meta from step 3" in outs[0][0]
  for a, b in zip(_modules(two), final, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=2e-5)
