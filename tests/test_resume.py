"""A run killed with SIGKILL resumes, from the same command, to the parameters of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from conftest import REPO, TINY, tiny
from modassem import checkpoints, cli, train

# The tiny preset's epoch is 1437 // 32 = 44 steps. A kill after one of the first checkpoints (10, 20, 30, 40)
# interrupts mid-epoch, and the resumed run then crosses the epoch boundary, where the data order reshuffles.
STEPS, EVERY, EPOCH = 50, 10, 44
ARGS = [f"--config.total_steps={STEPS}", f"--config.checkpoint_every_steps={EVERY}", "--config.log_every_steps=1",
        "--config.keep_checkpoints=2"]


def _module(run_dir, k):
  tree = ocp.StandardCheckpointer().restore(checkpoints.module_dir(run_dir, k))
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _kill_after_first_checkpoint(proc, ckpt_dir, timeout=300):
  """SIGKILL as soon as `proc` has committed its first checkpoint: mid-run, mid-epoch."""
  deadline = time.time() + timeout
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
        break
      time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait()


def test_kill_9_then_rerun_resumes_to_the_same_parameters(tmp_path, capsys):
  work = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "modassem", "train", f"--config={TINY}:meta", f"--workdir={work}", *ARGS]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killer = threading.Thread(target=_kill_after_first_checkpoint, args=(proc, os.path.join(work, "checkpoints")))
  killer.start()
  # The uninterrupted reference, here, while the other run starts and is killed.
  ref = str(tmp_path / "ref")
  try:
    train.train(tiny("meta", total_steps=STEPS, checkpoint_every_steps=EVERY, log_every_steps=1), ref)
  finally:
    killer.join()
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(work, "results.json")), "the run ended before it could be killed"

  # The same command again (here, in this process: its programs are compiled already).
  capsys.readouterr()
  assert cli.main(["train", f"--config={TINY}:meta", f"--workdir={work}", *ARGS]) == 0
  resumed = capsys.readouterr().out
  start = int(resumed.split("resuming meta from step ")[1].split("/")[0])
  assert 0 < start < EPOCH and start % EVERY == 0, resumed   # mid-epoch, with the boundary still ahead
  for k in range(4):
    for a, b in zip(_module(work, k), _module(ref, k), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  assert cli.main(["train", f"--config={TINY}:meta", f"--workdir={work}", *ARGS]) == 0
  assert "already finished" in capsys.readouterr().out
