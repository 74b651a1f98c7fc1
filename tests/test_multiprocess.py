"""2 processes x 4 simulated devices on localhost (JAX's distributed runtime, CPU collectives)
against 1 process x 8 devices: the same losses, the same parameters, and a resume across the topology."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from conftest import REPO, TINY
from modassem import checkpoints

ARGS = [f"--config={TINY}:meta", "--config.total_steps=6", "--config.checkpoint_every_steps=3",
        "--config.log_every_steps=1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


def _start_one_process(workdir):
  return subprocess.Popen([sys.executable, "-m", "modassem", "train", *ARGS, f"--workdir={workdir}"], cwd=REPO,
                          env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_two_processes(workdir, alongside=()):
  """The two-process run; `alongside`: processes already started, waited for too (their outputs come first)."""
  port = _free_port()
  procs = list(alongside) + [
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


def test_two_processes_match_one_and_resume(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  # The reference run goes alongside: most of each run is start-up and compilation, one core each.
  outs = _train_two_processes(two, alongside=[_start_one_process(one)])[1:]
  # Process 0 reports; process 1 stays quiet.
  assert "meta done" in outs[0][0] and "meta done" not in outs[1][0]
  assert len(_losses(two)) == 6
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
  for a, b in zip(_modules(two), _modules(one)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  # Back to the state of a run stopped after its step-3 checkpoint, then the same two-process command.
  final = _modules(two)
  for d in ("modules", "checkpoints/6"):
    shutil.rmtree(os.path.join(two, d))
  os.remove(os.path.join(two, "results.json"))
  outs = _train_two_processes(two)
  assert "resuming meta from step 3" in outs[0][0]
  for a, b in zip(_modules(two), final):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
