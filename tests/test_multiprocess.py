"""2 processes x 4 simulated devices on localhost (JAX's distributed runtime, CPU collectives) against the
session's one-process runs of the same configs: the same losses, the same parameters, and a resume on the two
processes. The first two-process runs are session jobs (see conftest.py): they start in the background at
collection, the assembly after the session pipeline whose incubated modules it reads."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

import processes
from conftest import JOBS, PIPELINE, REPO, SCRATCH, TINY
from modassem import checkpoints

# The tiny preset's defaults: the configs of the session pipeline's runs (6 steps, a checkpoint every 3).
META = [f"--config={TINY}:meta"]
ASSEMBLE = [f"--config={TINY}:assemble", f"--config.modules={','.join([os.path.join(PIPELINE, 'incubate')] * 4)}"]
WORK = {"meta": os.path.join(SCRATCH, "two", "meta"), "assemble": os.path.join(SCRATCH, "two", "assemble")}
for _name, _args in (("meta", META), ("assemble", ASSEMBLE)):
  JOBS.add(f"two-process-{_name}", [sys.executable, os.path.join(REPO, "tests", "processes.py"), "2", "4",
                                    WORK[_name], *_args], module=__file__)


def _job(name):
  """Each process's stdout of the background two-process run `name`."""
  return json.loads(JOBS.result(f"two-process-{name}").strip().splitlines()[-1])


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
  outs = _job("meta")
  shutil.copytree(WORK["meta"], two)
  # Process 0 reports; process 1 stays quiet.
  assert "meta done" in outs[0] and "meta done" not in outs[1]
  assert len(_losses(two)) == len(_losses(one)) == 3
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=2e-5)
  for a, b in zip(_modules(two), _modules(one), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  # Back to the state of a run stopped after its step-3 checkpoint, then the same two-process command.
  final = _modules(two)
  for d in ("modules", "checkpoints/6"):
    shutil.rmtree(os.path.join(two, d))
  os.remove(os.path.join(two, "results.json"))
  outs = processes.train(2, 4, two, META)
  assert all(rc == 0 for rc, _, _ in outs), outs[0][2][-3000:] + outs[1][2][-3000:]
  assert "resuming meta from step 3" in outs[0][1]
  for a, b in zip(_modules(two), final, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=2e-5)


def test_assembly_on_two_processes_matches_one(pipeline_dir):
  """Assembly's module sources span both processes' devices: the compiled init takes them as arguments."""
  one, two = os.path.join(pipeline_dir, "assemble"), WORK["assemble"]
  assert "assemble done" in _job("assemble")[0]
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=2e-5)
  for a, b in zip(_modules(two), _modules(one), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
