"""Run directories on gs://, served by a Cloud Storage emulator on localhost (tests/emulator.py), through the code a
TPU VM runs: etils.epath over gcsfs for modassem's files and Orbax's folders, TensorStore for the arrays.

A meta run stopped by SIGTERM and resumed, an incubation reading that meta run, and an assembly of incubated modules,
all in the bucket, end at the parameters and results of the session's runs of the same configs on a local disk. While
they run, any run-directory path that reaches `open`, `os.*` or `os.path.*` instead of epath fails the test."""

import builtins
import contextlib
import io
import json
import os
import shutil
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import SCRATCH, tiny
from emulator import BUCKET, CloudStorage
from modassem import checkpoints, files, preempt, train
from modassem.errors import ModassemError

GS = f"gs://{BUCKET}"

# Every call of these that could touch a file by name; a gs:// path in any argument is a run-directory path that
# bypassed epath (on a TPU VM it would land on the local disk as ./gs:/bucket/...).
_GUARDED = [(builtins, "open"), (io, "open"), (os, "open"), (os, "makedirs"), (os, "mkdir"), (os, "replace"),
            (os, "rename"), (os, "remove"), (os, "unlink"), (os, "rmdir"), (os, "listdir"), (os, "scandir"),
            (os, "stat"), (os, "walk"), (os.path, "exists"), (os.path, "isdir"), (os.path, "isfile"),
            (os.path, "abspath"), (os.path, "realpath"), (os.path, "getsize"), (shutil, "rmtree"),
            (shutil, "copytree"), (shutil, "copy"), (shutil, "move")]


@pytest.fixture(scope="module")
def gcs():
  """The emulator, with the variables that point gcsfs and TensorStore at it set in this process."""
  with CloudStorage(os.path.join(SCRATCH, "gcs.log")) as env:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
      yield env
    finally:
      for k, v in old.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v


@pytest.fixture
def local_io(monkeypatch):
  """The gs:// paths that reached the functions in `_GUARDED` during the test (each also raises there)."""
  reached = []
  for module, name in _GUARDED:
    real = getattr(module, name)

    def guarded(*args, _real=real, _name=f"{module.__name__}.{name}", **kwargs):
      named = [os.fspath(a) for a in args if isinstance(a, (str, os.PathLike))]
      bad = [a for a in named if isinstance(a, str) and "gs:" in a]
      if bad:
        reached.append(f"{_name}({bad[0]})")
        raise AssertionError(f"{_name} was given the run-directory path {bad[0]}: go through modassem.files")
      return _real(*args, **kwargs)

    monkeypatch.setattr(module, name, guarded)
  yield reached
  assert not reached, reached


def test_the_guard_catches_a_path_that_bypasses_epath(gcs, local_io):
  with pytest.raises(AssertionError, match="path.exists was given the run-directory path"):
    os.path.exists(f"{GS}/meta/run.json")
  assert local_io == [f"posixpath.exists({GS}/meta/run.json)"]
  local_io.clear()


def _modules(run_dir, n=4):
  out = []
  for k in range(n):
    path = checkpoints.module_dir(run_dir, k)
    if path.exists():
      out += [np.asarray(x) for x in jax.tree_util.tree_leaves(ocp.StandardCheckpointer().restore(path))]
  return out


def _assert_same_run(gs_dir, local_dir):
  got, want = _modules(gs_dir), _modules(local_dir)
  assert got and len(got) == len(want)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(a, b)
  ours, theirs = files.read_json(f"{gs_dir}/results.json"), files.read_json(os.path.join(local_dir, "results.json"))
  for key in ("top1", "top5", "loss", "steps"):
    assert ours[key] == theirs[key], key


class _SigtermAt:
  """Stdout that sends this process SIGTERM when the run logs `marker`: the signal arrives at that step."""

  def __init__(self, marker):
    self.marker, self.text, self.sent = marker, "", False

  def write(self, s):
    self.text += s
    if not self.sent and self.marker in self.text:
      self.sent = True
      os.kill(os.getpid(), signal.SIGTERM)
    return len(s)

  def flush(self):
    pass


def test_a_run_on_gs_stopped_by_sigterm_resumes_to_the_local_run(gcs, runs, local_io, tmp_path):
  work = f"{GS}/meta"
  config = tiny("meta", log_every_steps=1, progress="off")
  out = _SigtermAt("meta step 4/6")
  with contextlib.redirect_stdout(out), pytest.raises(preempt.Preempted) as stopped:
    train.train(config, work)
  assert stopped.value.step == 4 and f"{GS}/meta/checkpoints" in stopped.value.where
  assert sorted(int(p.name) for p in checkpoints.state_dir(work).iterdir() if p.name.isdigit()) == [3, 4]
  assert files.read_json(f"{work}/results.json") is None

  result = train.train(config, work)
  assert result["steps"] == 6
  _assert_same_run(work, runs["meta"])
  # metrics.jsonl holds each step once, the records after the checkpoint a resume starts from logged again.
  records = [json.loads(line) for line in files.read_text(f"{work}/metrics.jsonl").splitlines()]
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
  # TensorBoard reads the same losses from the event files written to the bucket.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  local_tb = tmp_path / "tb"
  local_tb.mkdir()
  for event_file in files.path(f"{work}/tb").iterdir():
    (local_tb / event_file.name).write_bytes(event_file.read_bytes())
  acc = event_accumulator.EventAccumulator(str(local_tb))
  acc.Reload()
  losses = {e.step: e.value for e in acc.Scalars("train/loss")}
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  for r in records:
    if r["kind"] == "train":
      np.testing.assert_allclose(losses[r["step"]], r["loss"], rtol=1e-6)


def test_an_incubation_on_gs_reads_its_meta_run_on_gs(gcs, runs, local_io):
  work = f"{GS}/inc_1"
  train.train(tiny("incubate", meta=f"{GS}/meta", module="1"), work)
  _assert_same_run(work, runs["inc_1"])


def _upload(local_dir, url):
  for root, _, names in os.walk(local_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      with open(os.path.join(root, name), "rb") as f:
        (files.path(url) / rel).write_bytes(f.read())


def test_an_assembly_on_gs_of_modules_in_the_bucket_matches_the_local_one(gcs, pipeline_dir, local_io):
  # The incubation run is uploaded as a user would after training it elsewhere.
  _upload(os.path.join(pipeline_dir, "incubate"), f"{GS}/incubate")
  work = f"{GS}/assemble"
  config = tiny("assemble", modules=",".join([f"{GS}/incubate"] * 4))
  train.train(config, work)
  _assert_same_run(work, os.path.join(pipeline_dir, "assemble"))
  # `eval` of the run in the bucket reads its final checkpoint there and scores what the local assembly scored.
  evaluated = train.evaluate_run(config, work)
  local = files.read_json(os.path.join(pipeline_dir, "assemble", "results.json"))
  assert (evaluated["top1"], evaluated["loss"], evaluated["step"]) == (local["top1"], local["loss"], local["steps"])
  assert files.read_json(f"{work}/eval.json")["loss"] == local["loss"]


def test_a_second_writer_of_a_run_directory_on_gs_is_refused(gcs, local_io):
  work = f"{GS}/taken"
  holder = {"host": os.uname().nodename, "pid": os.getpid(), "since": 0.0, "heartbeat": 1e12}
  assert files.create(f"{work}/lock.json", json.dumps(holder))
  assert not files.create(f"{work}/lock.json", "{}")   # the bucket refuses a second create
  with pytest.raises(ModassemError, match=f"{work} is being written by another run"):
    train.train(tiny("meta"), work)
  assert json.loads(files.read_text(f"{work}/lock.json")) == holder
  assert not checkpoints.state_dir(work).exists()

