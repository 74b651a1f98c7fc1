"""A run killed with SIGKILL resumes, from the same command, to the parameters of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from conftest import REPO, TINY, run_cli, tiny
from modassem import checkpoints, train

STEPS, EVERY = 400, 40
ARGS = [f"--config.total_steps={STEPS}", f"--config.checkpoint_every_steps={EVERY}", "--config.log_every_steps=20",
        "--config.keep_checkpoints=2"]


def _module(run_dir, k):
  tree = ocp.StandardCheckpointer().restore(checkpoints.module_dir(run_dir, k))
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_kill_9_then_rerun_resumes_to_the_same_parameters(tmp_path):
  ref = str(tmp_path / "ref")
  train.train(tiny("meta", total_steps=STEPS, checkpoint_every_steps=EVERY, log_every_steps=20), ref)

  work = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "modassem", "train", f"--config={TINY}:meta", f"--workdir={work}", *ARGS]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(work, "checkpoints")
  deadline = time.time() + 300
  try:
    # Kill as soon as the first checkpoint is committed: mid-run, mid-epoch.
    while time.time() < deadline and proc.poll() is None:
      if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
        break
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(work, "results.json")), "the run ended before it could be killed"

  resumed = run_cli("train", f"--config={TINY}:meta", f"--workdir={work}", *ARGS)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming meta from step" in resumed.stdout
  for k in range(4):
    for a, b in zip(_module(work, k), _module(ref, k)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  again = run_cli("train", f"--config={TINY}:meta", f"--workdir={work}", *ARGS)
  assert again.returncode == 0 and "already finished" in again.stdout
