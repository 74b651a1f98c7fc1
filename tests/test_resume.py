"""Runs stopped every way a real one is, then rerun with the same command, end at the parameters of a run never
stopped, bit for bit: SIGTERM (preemption) and Ctrl-C save a checkpoint where they stop and exit with status 75;
SIGKILL loses what came after the last checkpoint; a latest checkpoint damaged (bytes overwritten in place, which its
digests find, or cut short) is moved aside and the one before it used. (Two processes preempted together: test_multiprocess.py.)"""

import errno
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, TINY, tiny
from bitrot import garble
from modassem import checkpoints, cli, digests, files, full_disk, metrics, preempt, train
from modassem.errors import ModassemError

# The tiny preset's epoch is 1437 // 32 = 44 steps: runs stopped before it and resumed cross the epoch boundary,
# where the data order reshuffles. How often a run logs and checkpoints does not change what it trains, so every
# run here matches the one reference.
STEPS, EPOCH = 50, 44
RUN = ["train", f"--config={TINY}:meta", f"--config.total_steps={STEPS}", "--config.log_every_steps=1",
       "--config.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The parameters of the run never stopped."""
  ref = str(tmp_path_factory.mktemp("reference"))
  train.train(tiny("meta", total_steps=STEPS, checkpoint_every_steps=10, log_every_steps=10), ref)
  return _params(ref)


def _params(run_dir):
  out = []
  for k in range(4):
    tree = ocp.StandardCheckpointer().restore(checkpoints.module_dir(run_dir, k))
    out += [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
  return out


def _assert_same(params, reference):
  for a, b in zip(params, reference, strict=True):
    np.testing.assert_array_equal(a, b)


def _steps(work):
  ckpt = checkpoints.state_dir(work)
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def _saving(work):
  """Whether an asynchronous checkpoint save is under way (Orbax writes into a temporary folder, then renames it)."""
  ckpt = checkpoints.state_dir(work)
  return os.path.isdir(ckpt) and any("tmp" in d for d in os.listdir(ckpt))


def _start(work, every, **popen):
  return subprocess.Popen([sys.executable, "-m", "modassem", *RUN, f"--workdir={work}",
                           f"--config.checkpoint_every_steps={every}"], cwd=REPO, text=True, **popen)


def _stop_message(err, signame, work):
  """The step of the one-line message a run stopped by `signame` ends with."""
  lines = [line for line in err.splitlines() if line.startswith("modassem train: ")]
  assert len(lines) == 1, err[-3000:]
  head, tail = f"modassem train: stopped by {signame} at step ", f"/{STEPS}, checkpoint saved in "
  assert lines[0].startswith(head) and tail in lines[0], lines[0]
  step, where = lines[0][len(head):].split(tail)
  assert where == f"{checkpoints.state_dir(work)}: rerun the same command to resume", lines[0]
  return int(step)


def _truncate_a_data_file(work, step):
  """Cuts every data file of checkpoint `step` to half its length. (One file alone is not enough: an OCDBT folder
  also holds files its final manifest no longer refers to, and a restore never reads those.)"""
  data = os.path.join(checkpoints.state_dir(work), str(step), "state", "ocdbt.process_0", "d")
  for name in os.listdir(data):
    with open(os.path.join(data, name), "r+b") as f:
      f.truncate(os.path.getsize(os.path.join(data, name)) // 2)


def test_sigterm_saves_where_it_stops_and_a_damaged_checkpoint_is_set_aside(reference, tmp_path, capsys):
  """SIGTERM sent to this process (to its own handlers, as a preemption sends it) once the first checkpoint is
  committed. (A real process of a job stopped by SIGTERM: test_multiprocess.py.)"""
  work = str(tmp_path / "run")
  done = threading.Event()

  def terminate():
    while not done.is_set() and not _steps(work):
      time.sleep(0.01)
    if not done.is_set():
      os.kill(os.getpid(), signal.SIGTERM)

  sender = threading.Thread(target=terminate)
  sender.start()
  try:
    rc = cli.main([*RUN, f"--workdir={work}", "--config.checkpoint_every_steps=10"])
  finally:
    done.set()
    sender.join()
  out, err = capsys.readouterr()
  assert rc == 75, err[-3000:]
  step = _stop_message(err, "SIGTERM", work)
  assert _steps(work) == [10, step] and 10 < step < EPOCH, (step, _steps(work))
  assert f"meta step {step}/{STEPS}" in out and f"meta step {step + 1}/{STEPS}" not in out

  # Its latest checkpoint with garbage of the same length in its parameters (read by eval) or in its optimizer
  # state (read by train; a copy per case). Orbax reads either without a word (`garble` checks that); the digests
  # find it: moved aside, and the step before used.
  for under, verb in (("['params']", "eval"), ("['opt_state']", "train")):
    damaged = str(tmp_path / f"damaged-{verb}-{under[2:-2]}")
    shutil.copytree(work, damaged)
    garble(os.path.join(checkpoints.state_dir(damaged), str(step), "state"), under)
    capsys.readouterr()
    assert cli.main([verb, *RUN[1:], f"--workdir={damaged}"]) == 0
    said = capsys.readouterr().out
    assert (f"{damaged}: checkpoint {step} is damaged (digest mismatch in state/ocdbt.process_0/d/" in said and
            f"moved it to {damaged}/damaged/checkpoints/{step}; using checkpoint 10" in said), said
    assert os.path.isdir(os.path.join(damaged, "damaged", "checkpoints", str(step)))
    if verb == "eval":
      assert files.read_json(os.path.join(damaged, "eval.json"))["step"] == 10
    else:
      assert "resuming meta from step 10/" in said
      _assert_same(_params(damaged), reference)

  # Every checkpoint damaged: the latest by garbage its digests find, the one before cut short and without digests
  # (as a run of an older version, or one stopped between a checkpoint and its digests, leaves it), which Orbax
  # finds. A one-line error naming the newest one's damage, and nothing moved.
  hopeless = str(tmp_path / "hopeless")
  shutil.copytree(work, hopeless)
  garble(os.path.join(checkpoints.state_dir(hopeless), str(step), "state"))
  os.remove(os.path.join(checkpoints.state_dir(hopeless), "10", digests.DIGESTS_FILE))
  _truncate_a_data_file(hopeless, 10)
  capsys.readouterr()
  assert cli.main([*RUN, f"--workdir={hopeless}"]) == 2
  err = capsys.readouterr().err.strip()
  head = (f"modassem train: error: every checkpoint in {checkpoints.state_dir(hopeless)} (step(s) {step}, 10) is "
          f"damaged (digest mismatch in state/ocdbt.process_0/d/")
  assert err.startswith(head) and err.endswith("): move that folder away to start the run over, or restore it "
                                               "from a copy") and "\n" not in err, err
  assert _steps(hopeless) == [10, step] and not os.path.exists(os.path.join(hopeless, "damaged"))
  # The step without digests alone: Orbax's own failure to read it is the damage named.
  shutil.rmtree(os.path.join(checkpoints.state_dir(hopeless), str(step)))
  assert cli.main([*RUN, f"--workdir={hopeless}"]) == 2
  assert "is damaged (Exception): move that folder away" in capsys.readouterr().err

  # The preempted run itself: the same command resumes where it stopped.
  assert cli.main([*RUN, f"--workdir={work}", "--config.checkpoint_every_steps=10"]) == 0
  assert f"resuming meta from step {step}/" in capsys.readouterr().out
  _assert_same(_params(work), reference)


def _signal_during_a_save(work, signum, skip, delay, pid, running):
  """Sends `signum` to `pid` `delay` s into the asynchronous save after the next `skip` ones (while `running()`)."""
  seen, was = 0, False
  while running():
    now = _saving(work)
    if now and not was:
      if seen == skip:
        time.sleep(delay)
        os.kill(pid, signum)
        return
      seen += 1
    was = now
    time.sleep(0.0005)


def test_ctrl_c_during_asynchronous_saves_stops_the_same_way_every_time(reference, tmp_path, capsys):
  """Twice at seeded moments, in this process (a real SIGINT, to this process's own handlers), the second time in
  the run resumed from the first stop."""
  work, rng, stops = str(tmp_path / "run"), random.Random(0), []
  args = [*RUN, f"--workdir={work}", "--config.checkpoint_every_steps=4"]
  for _ in range(2):
    done = threading.Event()
    sender = threading.Thread(target=_signal_during_a_save, args=(
        work, signal.SIGINT, rng.randint(0, 1), rng.uniform(0, 0.01), os.getpid(), lambda: not done.is_set()))
    sender.start()
    try:
      rc = cli.main(args)
    finally:
      done.set()
      sender.join()
    out, err = capsys.readouterr()
    assert rc == 75, err[-3000:]
    stops.append(_stop_message(err, "SIGINT", work))
    assert "stopping after this step to save a checkpoint (Ctrl-C again to stop at once)" in out
    assert _steps(work)[-1] == stops[-1]
    if len(stops) > 1:
      assert f"resuming meta from step {stops[-2]}/" in out
  assert stops == sorted(stops) and stops[-1] < STEPS, stops
  assert cli.main(args) == 0
  _assert_same(_params(work), reference)


def test_a_second_ctrl_c_stops_at_once_with_the_interrupt_status(tmp_path, capsys):
  """Two Ctrl-Cs in a row: no checkpoint at the step it stops on, one line, and 130 (128 + SIGINT), not the 2 of a
  bad command nor the 75 that the launch scripts rerun."""
  work = str(tmp_path / "run")
  done = threading.Event()

  def twice():
    while not done.is_set() and not _steps(work):   # once the first checkpoint (step 4) is committed
      time.sleep(0.005)
    if not done.is_set():
      os.kill(os.getpid(), signal.SIGINT)
      # Two signals pending at once are delivered as one: the second goes once the first has been handled.
      while not done.is_set() and (preempt._active is None or preempt._active.signame is None):  # pylint: disable=protected-access
        time.sleep(0.0005)
      os.kill(os.getpid(), signal.SIGINT)

  sender = threading.Thread(target=twice)
  sender.start()
  try:
    rc = cli.main([*RUN, f"--workdir={work}", "--config.checkpoint_every_steps=4"])
  finally:
    done.set()
    sender.join()
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 130, err
  assert err[-1] == ("modassem train: interrupted: stopped at once, without a checkpoint; rerun the same command to "
                     "resume from the last one"), err
  assert [line for line in err if line.startswith("modassem ")] == err[-1:]
  assert _steps(work)[0] == 4 and _steps(work)[-1] < STEPS and not os.path.exists(os.path.join(work, "results.json"))


def test_a_ctrl_c_while_the_digest_pass_starts_still_lets_the_stop_wait_and_close(tmp_path, monkeypatch):
  """A second Ctrl-C can land inside `Thread.start` of the digest pass (its wait for the thread to run): the stop
  that follows waits for the manager and closes it without an error of its own."""
  mngr = checkpoints.Manager(str(tmp_path / "checkpoints"), item_names=("state",))
  mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(4.0)})))
  start = threading.Thread.start

  def interrupted(thread):
    if thread.name == "modassem-digests":
      raise KeyboardInterrupt   # before the thread runs: a thread never started cannot be joined
    start(thread)

  monkeypatch.setattr(threading.Thread, "start", interrupted)
  with pytest.raises(KeyboardInterrupt):
    mngr.wait_until_finished()
  monkeypatch.undo()
  mngr.wait_until_finished()
  mngr.close()
  assert mngr.latest_step() == 1


def test_kill_9_at_seeded_moments_then_reruns_end_bit_identical(reference, tmp_path, capsys):
  """SIGKILL twice, the second time in the rerun of the run killed first, each once the run has committed a
  checkpoint of its own: a seeded number of steps later, then a seeded moment into its next asynchronous save. The
  last rerun (here, in this process) finishes."""
  work, rng, every = str(tmp_path / "run"), random.Random(0), 4
  for i in range(2):
    start = (_steps(work) or [0])[-1]
    proc = _start(work, every, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out, more = "", rng.randint(0, 4)
    try:
      for line in proc.stdout:
        out += line
        if (_steps(work) or [0])[-1] > start:
          if i == 1:
            _signal_during_a_save(work, signal.SIGKILL, 0, rng.uniform(0, 0.01), proc.pid,
                                  lambda: proc.poll() is None)
            break
          if more == 0:
            proc.send_signal(signal.SIGKILL)
            break
          more -= 1
      out += proc.communicate(timeout=300)[0]
    finally:
      proc.kill()
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert (f"resuming meta from step {start}/" in out) == (start > 0)
    assert not os.path.exists(os.path.join(work, "results.json")), "the run ended before it was killed"
  assert 0 < _steps(work)[-1] < EPOCH
  capsys.readouterr()
  assert cli.main([*RUN, f"--workdir={work}", f"--config.checkpoint_every_steps={every}"]) == 0
  assert "resuming meta from step" in capsys.readouterr().out
  _assert_same(_params(work), reference)
  assert cli.main([*RUN, f"--workdir={work}", f"--config.checkpoint_every_steps={every}"]) == 0
  assert "already finished" in capsys.readouterr().out


@pytest.fixture(scope="module")
def full_disks(tmp_path_factory):
  """The command on a tmpfs of its own (a mount namespace: `unshare`, which needs no privileges where user namespaces
  are on) that is full before the first checkpoint (8k), or when one is being written in Orbax's thread (1100k),
  then rerun once the tmpfs has grown (tests/full_disks.py, one process for both sizes)."""
  root = tmp_path_factory.mktemp("full_disks")
  mnt, out = root / "mnt", root / "out"
  mnt.mkdir(), out.mkdir()
  spec = {"mnt": str(mnt), "out": str(out), "sizes": ["8k", "1100k"],
          "argv": [*RUN, "--config.checkpoint_every_steps=10"]}
  done = subprocess.run(["unshare", "--map-root-user", "--mount", sys.executable,
                         os.path.join(REPO, "tests", "full_disks.py"), json.dumps(spec)],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return str(mnt), out


@pytest.mark.parametrize("size", ["8k", "1100k"], ids=["at_start", "mid_run"])
def test_a_full_disk_is_one_line_and_the_rerun_after_space_is_freed_ends_bit_identical(reference, full_disks, size):
  """One line naming the path, the space free and needed and the checkpoint to resume from; no lock left behind;
  then the same command on the device grown resumes and ends at the run never stopped."""
  mnt, out = full_disks
  out = out / size
  assert (out / "rc2").exists()
  read = lambda name: (out / name).read_text()
  err = read("err1")
  assert read("rc1").strip() == "2", err[-3000:]
  # The whole of stderr: no traceback, no log of Orbax's failed writes, no notice of TensorFlow's start-up (this
  # process's first run imports it).
  lines = err.splitlines()
  run = f"{mnt}/run"
  assert len(lines) == 1 and lines[0].startswith(f"modassem train: error: no space left on the device of {run} "
                                                 f"(writing "), err[-3000:]
  assert " free): free at least " in lines[0] and " MiB (" in lines[0], lines[0]
  steps = _steps(out / "run1")
  # The disk may fill in the digest pass of a checkpoint Orbax has committed: the line names it, and the newest
  # checkpoint sealed with its digests for a rerun to fall back on.
  sealed = [s for s in steps if os.path.exists(os.path.join(checkpoints.state_dir(out / "run1"), str(s),
                                                             digests.DIGESTS_FILE))]
  if steps:
    resume = f"and rerun the same command to resume from checkpoint {steps[-1]}"
    if steps[-1] not in sealed:
      resume += (f" (from {sealed[-1]} if {steps[-1]} turns out cut short)" if sealed else
                 f" (or start over if {steps[-1]} turns out cut short)")
    assert lines[0].endswith(resume), lines[0]
  else:
    assert size == "8k" and lines[0].endswith("and rerun the same command to start it"), lines[0]
  assert not os.path.exists(out / "run1" / "lock.json")
  # Space freed: the same command resumes (or starts) and ends where the run never stopped did.
  assert read("rc2").strip() == "0", read("err2")[-3000:]
  assert not steps or f"resuming meta from step {steps[-1]}/" in read("out2")
  _assert_same(_params(str(out / "run2")), reference)
  assert not [d for d in os.listdir(checkpoints.state_dir(out / "run2")) if "tmp" in d]   # no half-written save left


def _saved_step(workdir, step: int, *, sealed: bool) -> None:
  """A checkpoint step's folder as the full-disk line reads it: a data file of 1000 bytes, and digests if sealed."""
  folder = checkpoints.state_dir(workdir) / str(step)
  (folder / "state").mkdir(parents=True)
  (folder / "state" / "data").write_bytes(b"x" * 1000)
  if sealed:
    (folder / digests.DIGESTS_FILE).write_text("{}")


@pytest.mark.parametrize("sealed", [(10, 20), (10,), ()])
def test_a_full_disk_names_the_checkpoint_a_rerun_resumes_from_and_its_fallback(tmp_path, sealed):
  """The disk may fill in the digest pass of a checkpoint Orbax has committed: a rerun resumes from it where it reads
  back whole, from the newest sealed one where it does not, and the line says both."""
  for step in (10, 20):
    _saved_step(tmp_path, step, sealed=step in sealed)
  with pytest.raises(ModassemError) as e:
    with full_disk.one_line(str(tmp_path), abstract_state=None):
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
  line = str(e.value)
  assert f"(writing {tmp_path / 'metrics.jsonl'}; " in line
  assert line.endswith({(10, 20): "to resume from checkpoint 20",
                        (10,): "to resume from checkpoint 20 (from 10 if 20 turns out cut short)",
                        (): "to resume from checkpoint 20 (or start over if 20 turns out cut short)"}[sealed]), line


def test_a_full_disk_met_writing_the_tensorboard_events_is_the_same_one_line(tmp_path):
  """The run's TensorBoard event file on a device that is full (Linux's /dev/full: every write fails with ENOSPC,
  from the kernel): the write of the next records ends in the full-disk line, naming the checkpoint to resume from."""
  if not os.path.exists("/dev/full"):
    pytest.fail("this test needs Linux's /dev/full")
  _saved_step(tmp_path, 10, sealed=True)
  writer = metrics.Writer(str(tmp_path))
  writer.write(1, "train", {"loss": 2.0})   # the event file is made
  events, = (tmp_path / "tb").iterdir()
  events.unlink()
  events.symlink_to("/dev/full")
  with pytest.raises(ModassemError) as e:
    with full_disk.one_line(str(tmp_path), abstract_state=None):
      writer.write(2, "train", {"loss": 1.9})
  line = str(e.value)
  assert line.startswith(f"no space left on the device of {tmp_path} (writing {events}; "), line
  assert "MiB free): free at least 0.0 MiB (one checkpoint of this run)" in line, line
  assert line.endswith("and rerun the same command to resume from checkpoint 10"), line
  # The record went to metrics.jsonl before the events failed: a resume drops it (it is past checkpoint 10).
  assert '"step": 2' in (tmp_path / metrics.METRICS_FILE).read_text()


def test_an_assembly_resumes_without_its_incubation_runs_and_holds_no_second_copy_of_them(
    pipeline_dir, tmp_path, monkeypatch, capsys):
  """An assembly of a copy of the session pipeline's incubation run, stopped after step 3 (by a stop request, as
  SIGTERM makes one): once its state is initialised, the modules it read are gone from memory (weak references
  to them are dead when the loop starts); resumed after the incubation run has moved away, it ends at the session
  pipeline's assembly, bit for bit."""
  inc = str(tmp_path / "incubate")
  shutil.copytree(os.path.join(pipeline_dir, "incubate"), inc)
  work = str(tmp_path / "assemble")
  argv = ["train", f"--config={TINY}:assemble", f"--config.modules={','.join([inc] * 4)}", f"--workdir={work}"]
  read, alive_at_loop = [], []
  real_read, real_run = train.prepare.read_sources, train._Loop.run

  def read_sources(*args):
    out = real_read(*args)
    read.extend(weakref.ref(x) for x in jax.tree_util.tree_leaves(out))
    return out

  def run(loop, state, start):
    gc.collect()
    alive_at_loop.append(sum(r() is not None for r in read))
    loop.stop.requested = lambda step: (setattr(loop.stop, "signame", "SIGTERM") or True) if step == 3 else False
    return real_run(loop, state, start)

  monkeypatch.setattr(train.prepare, "read_sources", read_sources)
  monkeypatch.setattr(train._Loop, "run", run)
  assert cli.main(argv) == 75
  assert read and alive_at_loop == [0], (len(read), alive_at_loop)
  assert _steps(work) == [3]

  shutil.move(inc, str(tmp_path / "moved"))
  monkeypatch.setattr(train._Loop, "run", real_run)
  capsys.readouterr()
  assert cli.main(argv) == 0
  assert "resuming assemble from step 3/6" in capsys.readouterr().out
  _assert_same(_params(work), _params(os.path.join(pipeline_dir, "assemble")))
