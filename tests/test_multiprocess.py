"""2 processes x 4 simulated devices on localhost (JAX's distributed runtime, CPU collectives) against the
session's one-process runs of the same configs: the same losses, the same parameters; and one host of the job
preempted (SIGTERM), the job's rerun resuming to the parameters of the uninterrupted job. Input: the records each
process of a 2 x 4 job reads from a TFDS dataset in ArrayRecord files, against the batches of one process. And the
processes' agreement on a finished run they see differently.

All of it is one session job (see conftest.py) of two processes that run the parts one after another, as hosts
run one command after another, and then two new processes for the preempted run's rerun: it starts in the
background once the session pipeline, whose incubated modules the assembly reads, has finished."""

import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from conftest import JOBS, PIPELINE, REPO, SCRATCH, TINY
from modassem import checkpoints

# Each process of a 2 x 4 job takes steps 0-2 (one epoch of 30 records in batches of 10), step 2 alone (a resume
# at step 2 of that epoch), and steps 2-4 (across the epoch boundary).
READS = os.path.join(SCRATCH, "reads-tfds")
SPANS = ("0:3", "2:1", "2:3")
# The tiny preset's defaults: the configs of the session pipeline's runs (6 steps, a checkpoint every 3).
META = [f"--config={TINY}:meta"]
ASSEMBLE = [f"--config={TINY}:assemble", f"--config.modules={','.join([os.path.join(PIPELINE, 'incubate')] * 4)}"]
WORK = {name: os.path.join(SCRATCH, "two", name) for name in ("meta", "assemble", "preempt")}
# The same meta run, its last process sent SIGTERM after the first step, then run again. (A log line every step
# tells the job when to send it; how often a run logs does not change what it trains.)
PREEMPT = [*META, "--config.log_every_steps=1"]
SPEC = {"processes": 2, "devices": 4, "preempt": "preempt",
        "parts": [["reads", "reads", [READS, *SPANS]], ["agreed", "agreed", []],
                  ["meta", "train", [*META, f"--workdir={WORK['meta']}"]],
                  ["assemble", "train", [*ASSEMBLE, f"--workdir={WORK['assemble']}"]],
                  ["preempt", "train", [*PREEMPT, f"--workdir={WORK['preempt']}"]]],
        "rerun": {"workdir": WORK["preempt"], "args": PREEMPT}}
JOBS.add("two-process", [sys.executable, os.path.join(REPO, "tests", "processes.py"), json.dumps(SPEC)],
         module=__file__, after="pipeline")


def _result() -> dict:
  return JOBS.printed("two-process")


def _job(name):
  """Each process's stdout of part `name` of the job; fails the test with their stderr where one failed."""
  outs = _result()["parts"][name]
  assert all(rc == 0 for rc, _, _ in outs), "\n".join(err[-3000:] for _, _, err in outs)
  return [out for _, out, _ in outs]


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


def test_two_processes_match_one(runs):
  one, two = runs["meta"], WORK["meta"]
  outs = _job("meta")
  # Process 0 reports; process 1 stays quiet.
  assert "meta done" in outs[0] and "meta done" not in outs[1]
  assert len(_losses(two)) == len(_losses(one)) == 3
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=2e-5)
  for a, b in zip(_modules(two), _modules(one), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_preempted_host_stops_the_job_at_one_step_and_the_rerun_resumes_exactly():
  job = _result()
  (rc0, out0, err0), (rc1, _, err1) = job["parts"]["preempt"]
  assert (rc0, rc1) == (75, 75), err0[-3000:] + err1[-3000:]
  message = [line for line in err0.splitlines() if line.startswith("modassem train: ")]
  assert len(message) == 1 and message[0].startswith("modassem train: stopped by SIGTERM at step "), err0[-3000:]
  assert "modassem train: stopped" not in err1   # one message for the job, from process 0
  step = int(message[0].split(" at step ")[1].split("/")[0])
  assert 1 <= step < 6 and f"checkpoint saved in {WORK['preempt']}/checkpoints: rerun the same command" in message[0]
  assert f"meta step {step}/6" in out0 and f"meta step {step + 1}/6" not in out0
  (rc0, out0, err0), (rc1, _, err1) = job["rerun"]
  assert (rc0, rc1) == (0, 0), err0[-3000:] + err1[-3000:]
  assert f"resuming meta from step {step}/6" in out0
  for a, b in zip(_modules(WORK["preempt"]), _modules(WORK["meta"]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_assembly_on_two_processes_matches_one(pipeline_dir):
  """Assembly's module sources span both processes' devices: the compiled init takes them as arguments."""
  one, two = os.path.join(pipeline_dir, "assemble"), WORK["assemble"]
  assert "assemble done" in _job("assemble")[0]
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=2e-5)
  for a, b in zip(_modules(two), _modules(one), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_each_process_reads_only_its_share_of_the_records_and_a_resume_reads_nothing_before_it():
  import reads  # pylint: disable=g-import-not-at-top
  job = [json.loads(out.strip().splitlines()[-1]) for out in _job("reads")]
  assert [(p["process"], p["devices"]) for p in job] == [(0, 4), (1, 4)]
  ds, counter = reads.counted_dataset(READS)
  one = reads.take(ds, counter, 0, 5)   # one process, steps 0-4
  assert sorted(one["read"][:30]) == list(range(30))
  epoch = [job[p]["spans"]["0:3"] for p in (0, 1)]
  # Disjoint halves of the epoch: every record read once in all, each by one process, and only for its batches.
  halves = [sorted(e["read"]) for e in epoch]
  assert len(halves[0]) == len(halves[1]) == 15 and sorted(halves[0] + halves[1]) == list(range(30))
  # The global batches (process 0's slice, then process 1's) are the one-process batches, step for step.
  for span, first in (("0:3", 0), ("2:3", 2)):
    spans = [job[p]["spans"][span]["batches"] for p in (0, 1)]
    assert [a + b for a, b in zip(*spans)] == one["batches"][first:first + 3]
  # Record index -> example id, from the one-process run's epoch 0 (one index read per example).
  example_of = dict(zip(one["read"][:30], sum(one["batches"][:3], [])))
  for p in (0, 1):
    assert sorted(example_of[i] for i in epoch[p]["read"]) == sorted(sum(epoch[p]["batches"], []))
    # Resumed at step 2: exactly this process's examples of step 2, none of steps 0 and 1.
    resumed = job[p]["spans"]["2:1"]
    assert sorted(example_of[i] for i in resumed["read"]) == sorted(resumed["batches"][0])
    assert not {example_of[i] for i in resumed["read"]} & set(sum(one["batches"][:2], []))


def test_processes_take_the_first_ones_view_of_a_finished_run():
  """Exporting modules again is collective: every process must take the branch process 0 takes, whatever it saw
  (process 0: finished, modules 1 and 3 damaged; process 1: not finished)."""
  assert [json.loads(out.strip().splitlines()[-1]) for out in _job("agreed")] == [[True, [1, 3]], [True, [1, 3]]]
