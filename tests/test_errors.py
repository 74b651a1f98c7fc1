"""Bad input: a one-line error that names the problem and the fix, exit status 2, and no damaged run directory."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import REPO, TINY, run_cli, tiny
from bitrot import garble
from modassem import checkpoints, cli, digests, lock, prepare, records, report, train
from modassem.errors import ModassemError

DEMO = os.path.join(REPO, "configs", "demo.py")


def tree_state(path):
  """Every file and folder under `path` with its size and mtime; None when `path` does not exist."""
  if not os.path.exists(path):
    return None
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      st = os.stat(full)
      out[os.path.relpath(full, path)] = (st.st_size if name in files else -1, st.st_mtime_ns)
  return out


def cli_error(capsys, verb, *args):
  """Runs `modassem VERB ARGS` in-process; checks exit status 2 and one stderr line; returns that line."""
  capsys.readouterr()
  rc = cli.main([verb, *args])
  out, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == 2, (rc, out, err)
  assert len(lines) == 1, err
  assert lines[0].startswith(f"modassem {verb}: error: "), err
  return lines[0]


def assert_names(line, *needles):
  for needle in needles:
    assert needle in line, f"{needle!r} not in: {line}"


def train_error(capsys, tmp_path, spec, *overrides, sources=()):
  """`modassem train` of `spec` into a fresh workdir: returns the error; checks the workdir and `sources` untouched."""
  workdir = str(tmp_path / "new_run")
  before = {s: tree_state(s) for s in sources}
  line = cli_error(capsys, "train", f"--config={spec}", *overrides, f"--workdir={workdir}")
  assert not os.path.exists(workdir), os.listdir(workdir)
  for s in sources:
    assert tree_state(s) == before[s], f"{s} changed"
  return line


# --- Incubation from a meta run that does not fit the config -----------------

@pytest.mark.parametrize("spec, overrides, meta, needles", [
    # The meta run has K=4 one-block modules; this config cuts the model into 2.
    (f"{TINY}:incubate", ["--config.model.num_modules=2", "--config.model.depths=(4,4)"], "meta",
     ["has 4 modules, this config 2", "model.num_modules=2"]),
    (f"{TINY}:incubate", ["--config.model.width=24"], "meta", ["has another architecture than this config", "width 16 vs 24"]),
    # Another preset altogether (demo: width 64, 16 px images).
    (f"{DEMO}:incubate", [], "meta", ["(preset tiny) has another architecture", "same preset and model settings", "width 16 vs 64"]),
    # An incubation run has 2-block modules, not the meta model's 1-block ones.
    (f"{TINY}:incubate", [], "inc_all", ["(phase incubate) has 2 block(s) in module 0", "needs 1", "pass a meta run"]),
], ids=["num_modules", "width", "preset", "not_a_meta_run"])
def test_incubate_rejects_a_meta_run_that_does_not_fit(runs, capsys, tmp_path, spec, overrides, meta, needles):
  line = train_error(capsys, tmp_path, spec, f"--config.meta={runs[meta]}", *overrides, sources=list(runs.values()))
  assert_names(line, f"meta run {runs[meta]!r}", *needles)


def test_incubate_without_a_meta_run(capsys, tmp_path):
  line = train_error(capsys, tmp_path, f"{TINY}:incubate")
  assert_names(line, "incubation needs the meta run", "--config.meta=")


def test_incubate_from_a_meta_run_that_does_not_exist(capsys, tmp_path):
  missing = str(tmp_path / "no_meta_here")
  line = train_error(capsys, tmp_path, f"{TINY}:incubate", f"--config.meta={missing}")
  assert_names(line, f"meta run {missing!r} does not exist", "--workdir of a finished run")


# --- Assembly from module sources that do not fit ----------------------------

def _assemble_case(runs, tmp_path, case):
  inc, missing = runs["inc_all"], str(tmp_path / "missing_run")
  return {
      "three_paths": ([inc] * 3, [], ["lists 3 run(s), the model has 4 modules", "one incubation run per module"]),
      "missing_path": ([inc, inc, missing, inc], [], [f"module source {missing!r} does not exist"]),
      "other_width": ([inc] * 4, ["--config.model.width=24"],
                      [f"module source {inc!r}", "has another architecture than this config", "width 16 vs 24"]),
      # Module 0 from a run that incubated module 1 only: the list is in module order.
      "wrong_module": ([runs["inc_1"]] * 4, [], [f"module source {runs['inc_1']!r}", "did not train module 0"]),
      # The meta run's modules have 1 block, assembly needs each module's 2.
      "meta_as_source": ([runs["meta"]] * 4, [], [f"module source {runs['meta']!r}", "has 1 block(s) in module 0",
                                                  "needs 2"]),
  }[case]


@pytest.mark.parametrize("case", ["three_paths", "missing_path", "other_width", "wrong_module", "meta_as_source"])
def test_assemble_rejects_bad_module_lists(runs, capsys, tmp_path, case):
  modules, overrides, needles = _assemble_case(runs, tmp_path, case)
  line = train_error(capsys, tmp_path, f"{TINY}:assemble", f"--config.modules={','.join(modules)}", *overrides,
                     sources=list(runs.values()))
  assert_names(line, *needles)
  assert not os.path.exists(str(tmp_path / "missing_run"))


def test_assemble_rejects_modules_of_another_preset(runs, capsys, tmp_path):
  modules = ",".join([runs["inc_all"]] * 4)
  line = train_error(capsys, tmp_path, f"{DEMO}:assemble", f"--config.modules={modules}",
                     sources=list(runs.values()))
  assert_names(line, f"module source {runs['inc_all']!r} (preset tiny) has another architecture", "same preset and model settings")


# --- Config values that cannot work -----------------------------------------

@pytest.mark.parametrize("phase, overrides, needles", [
    ("meta", ["--config.model.depths=(2,2,2,1)"], ["model.depths=(2, 2, 2, 1) adds up to 7", "depth 8",
                                                   "sum to 8"]),
    ("e2e", ["--config.model.depths=(3,3,3,3)"], ["adds up to 12", "depth 8"]),
    ("e2e", ["--config.model.depths=(4,4)"], ["model.depths=(4, 4) has 2 entries", "num_modules=4"]),
    ("meta", ["--config.model.image_size=10"], ["model.image_size=10 is not divisible by model.patch=4",
                                                "multiple of 4"]),
    ("incubate", ["--config.meta=/unused", "--config.module=7"], ["config.module=7 is out of range", "0..3"]),
], ids=["depths_sum_meta", "depths_sum_e2e", "depths_count", "image_size", "module_index"])
def test_rejects_config_values_that_cannot_work(capsys, tmp_path, phase, overrides, needles):
  assert_names(train_error(capsys, tmp_path, f"{TINY}:{phase}", *overrides), *needles)


@pytest.mark.parametrize("verb", ["train", "eval", "pipeline"])
@pytest.mark.parametrize("field", ["no_such_field", "optim.no_such"])
def test_unknown_config_field(capsys, tmp_path, verb, field):
  workdir = str(tmp_path / "new_run")
  spec = TINY if verb == "pipeline" else f"{TINY}:meta"   # the pipeline runs every phase of the file
  line = cli_error(capsys, verb, f"--config={spec}", f"--config.{field}=1", f"--workdir={workdir}")
  assert_names(line, f"unknown config field {field!r}", "configs/common.py")
  assert not os.path.exists(workdir)


def test_unknown_config_field_with_a_close_name(capsys, tmp_path):
  line = train_error(capsys, tmp_path, f"{TINY}:meta", "--config.optimm.lr=1")
  assert_names(line, "unknown config field 'optimm.lr' (did you mean 'optim'?)")


def test_unknown_config_field_exits_non_zero_from_the_console(tmp_path):
  workdir = tmp_path / "new_run"
  proc = run_cli("train", "--config=configs/tiny.py:meta", "--config.optim.no_such=1", f"--workdir={workdir}")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.splitlines() == ["modassem train: error: unknown config field 'optim.no_such': see the preset "
                                     "file and configs/common.py for the fields"], proc.stderr
  assert not workdir.exists()


# --- Data that is not there -------------------------------------------------

def _image_folder(root, with_classes):
  for split in ("train", "val"):
    os.makedirs(root / split, exist_ok=True)
    if with_classes:
      for name in ("cat", "dog"):
        os.makedirs(root / split / name)
  return root


@pytest.mark.parametrize("case", ["missing", "no_class_folders", "empty_class_folders"])
def test_rejects_a_dataset_path_without_images(capsys, tmp_path, case):
  if case == "missing":
    path = str(tmp_path / "nonexistent")
    needles = [f"data.path {path!r} does not exist", "--config.data.path"]
  elif case == "no_class_folders":
    path = str(_image_folder(tmp_path / "data", with_classes=False))
    needles = [f"{os.path.join(path, 'train')!r} has no class folders", "<class_name>/"]
  else:
    path = str(_image_folder(tmp_path / "data", with_classes=True))
    needles = [f"class folder {os.path.join(path, 'train', 'cat')!r} has no images", "add"]
  before = tree_state(path)
  line = train_error(capsys, tmp_path, f"{TINY}:meta", "--config.data.name=folder", f"--config.data.path={path}")
  assert_names(line, *needles)
  assert tree_state(path) == before


# --- Run directories that are not this run ----------------------------------

@pytest.fixture
def meta_copy(runs, tmp_path):
  """A private copy of the finished meta run: tests may point other runs at it."""
  path = str(tmp_path / "meta_copy")
  shutil.copytree(runs["meta"], path)
  return path


@pytest.mark.parametrize("spec, overrides, needles", [
    (f"{TINY}:e2e", [], ["holds a run (phase meta) whose phase is meta, not e2e"]),
    (f"{TINY}:meta", ["--config.model.width=24", "--config.model.heads=2"], ["holds a run (phase meta) whose architecture is"]),
    (f"{TINY}:meta", ["--config.model.num_modules=2", "--config.model.depths=(4,4)"],
     ["holds a run (phase meta) whose module depths is [1, 1, 1, 1], not [1, 1]"]),
], ids=["phase", "architecture", "num_modules"])
def test_train_refuses_a_run_directory_of_another_run(capsys, meta_copy, spec, overrides, needles):
  before = tree_state(meta_copy)
  line = cli_error(capsys, "train", f"--config={spec}", *overrides, f"--workdir={meta_copy}")
  assert_names(line, meta_copy, *needles, "use a new --workdir")
  assert tree_state(meta_copy) == before


@pytest.mark.parametrize("verb", ["train", "eval"])
def test_a_run_continues_only_in_the_parameter_layout_it_was_saved_in(capsys, meta_copy, verb):
  before = tree_state(meta_copy)
  line = cli_error(capsys, verb, f"--config={TINY}:meta", "--config.model.scan=True", f"--workdir={meta_copy}")
  assert_names(line, meta_copy, "model.scan=False", "--config.model.scan=False")
  assert tree_state(meta_copy) == before


def test_train_refuses_an_incubation_directory_of_another_module(runs, capsys, tmp_path):
  workdir = str(tmp_path / "inc_all_copy")
  shutil.copytree(runs["inc_all"], workdir)
  before = tree_state(workdir)
  line = cli_error(capsys, "train", f"--config={TINY}:incubate", f"--config.meta={runs['meta']}",
                   "--config.module=1", f"--workdir={workdir}")
  assert_names(line, workdir, "run (phase incubate) whose trained modules is [0, 1, 2, 3], not [1]", "use a new --workdir")
  assert tree_state(workdir) == before


def test_run_directory_of_another_phase_exits_non_zero_from_the_console(meta_copy, monkeypatch, capsys):
  """Through the console script's entry point, in this process (one real process checks the same path above)."""
  before = tree_state(meta_copy)
  monkeypatch.setattr(sys, "argv", ["modassem", "train", "--config=configs/tiny.py:e2e", f"--workdir={meta_copy}"])
  monkeypatch.chdir(REPO)
  capsys.readouterr()
  with pytest.raises(SystemExit) as exited:
    cli.entry()
  assert exited.value.code == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1, err
  assert_names(err, "modassem train: error: ", meta_copy, "holds a run (phase meta) whose phase is meta, not e2e")
  assert tree_state(meta_copy) == before


# Each file a run reads back, each way it can be damaged: cut short, valid JSON but not an object, not UTF-8.
_DAMAGED_RUN_FILES = [
    ("run.json", b'{"phase": "me', "run.json is unreadable (JSONDecodeError"),
    ("run.json", b"[1, 2]", "run.json holds a JSON list, not the object modassem writes"),
    ("run.json", b'{"phase": "\xffmeta"}', "run.json is unreadable (UnicodeDecodeError"),
    ("config.json", b'{"phase": "meta", "opt', "config.json is unreadable (JSONDecodeError"),
    ("config.json", b'"meta"', "config.json holds a JSON str, not the object modassem writes"),
    ("config.json", b'{"phase": "meta", \xff}', "config.json is unreadable (UnicodeDecodeError"),
    ("results.json", b"{\"top1\": 1", "results.json is unreadable (JSONDecodeError"),
    ("results.json", b"12.5", "results.json holds a JSON float, not the object modassem writes"),
    ("results.json", b'{"top1": 12.5, "\xfe": 1}', "results.json is unreadable (UnicodeDecodeError"),
]


# eval reads run.json and the checkpoint, not the config or the results of training.
@pytest.mark.parametrize("verb, name, content, needle", [("train", *c) for c in _DAMAGED_RUN_FILES]
                         + [("eval", *c) for c in _DAMAGED_RUN_FILES if c[0] == "run.json"])
def test_a_damaged_run_file_is_one_line_naming_it(capsys, meta_copy, verb, name, content, needle):
  with open(os.path.join(meta_copy, name), "wb") as f:
    f.write(content)
  before = tree_state(meta_copy)
  line = cli_error(capsys, verb, f"--config={TINY}:meta", f"--workdir={meta_copy}")
  assert_names(line, os.path.join(meta_copy, name), needle, "restore it from a copy, or start in a new --workdir")
  assert tree_state(meta_copy) == before


def test_unreadable_lines_of_the_metrics_are_set_aside_and_the_rest_kept(capsys, meta_copy):
  """A resume rewrites metrics.jsonl from the records that parse; the others (bytes that are not UTF-8, a line cut
  short) go to damaged/metrics.jsonl, and a line says so."""
  path = os.path.join(meta_copy, "metrics.jsonl")
  with open(path, "rb") as f:
    good = f.read().splitlines()
  bad = [b'{"step": 2, "kind": "train", "loss": \xff\xfe}', b'{"step": 3, "ki']
  with open(path, "wb") as f:
    f.write(b"\n".join(good[:2] + bad[:1] + good[2:] + bad[1:]) + b"\n")
  os.remove(os.path.join(meta_copy, "results.json"))   # finished up to its last checkpoint: the run resumes there
  assert cli.main(["train", f"--config={TINY}:meta", f"--workdir={meta_copy}"]) == 0
  assert ("2 line(s) of metrics.jsonl could not be read (cut short or damaged): kept aside in "
          f"{meta_copy}/damaged/metrics.jsonl") in capsys.readouterr().out
  with open(os.path.join(meta_copy, "damaged", "metrics.jsonl"), "rb") as f:
    assert f.read() == b"\n".join(bad) + b"\n"
  with open(path, "rb") as f:
    again = f.read().splitlines()
  assert again[:len(good)] == good   # then the records of this start: its setup and the final evaluation
  assert [json.loads(line)["kind"] for line in again[len(good):]] == ["setup", "final"]


def test_eval_of_a_directory_that_is_not_a_run(capsys, tmp_path):
  (tmp_path / "notes.txt").write_text("not a run\n")
  before = tree_state(str(tmp_path))
  line = cli_error(capsys, "eval", f"--config={TINY}:meta", f"--workdir={tmp_path}")
  assert_names(line, f"{tmp_path} is not a run directory (no run.json)", "--workdir of a run")
  assert tree_state(str(tmp_path)) == before


def test_eval_of_a_directory_that_does_not_exist(capsys, tmp_path):
  workdir = str(tmp_path / "nowhere")
  line = cli_error(capsys, "eval", f"--config={TINY}:meta", f"--workdir={workdir}")
  assert_names(line, f"{workdir} is not a run directory")
  assert not os.path.exists(workdir)


def test_an_assembly_of_modules_from_different_meta_runs_is_refused_unless_allowed(capsys, runs, tmp_path):
  """Module 1 from an incubation run that grew in another meta run (a copy of the meta run, and an incubation run
  that names it): refused in one line naming both; with allow_mixed_meta the assembly runs, says so in its
  config.json, and its report names both meta runs."""
  other_meta, other_inc = str(tmp_path / "other_meta"), str(tmp_path / "other_inc")
  shutil.copytree(runs["meta"], other_meta)
  shutil.copytree(runs["inc_all"], other_inc)
  for name, key, value in (("run.json", "sources", [other_meta]), ("config.json", "meta", other_meta)):
    path = os.path.join(other_inc, name)
    with open(path) as f:
      record = json.load(f)
    record[key] = value
    with open(path, "w") as f:
      json.dump(record, f)
  modules = "--config.modules=" + ",".join([runs["inc_all"], other_inc, runs["inc_all"], runs["inc_all"]])
  line = train_error(capsys, tmp_path, f"{TINY}:assemble", modules, sources=[runs["inc_all"], other_inc])
  assert_names(line, "the module sources grew in different meta runs", f"{runs['inc_all']} in {runs['meta']}",
               f"{other_inc} in {other_meta}", "--config.allow_mixed_meta=True")
  work = str(tmp_path / "mixed")
  assert cli.main(["train", f"--config={TINY}:assemble", modules, "--config.allow_mixed_meta=True",
                   f"--workdir={work}"]) == 0
  with open(os.path.join(work, "config.json")) as f:
    assert json.load(f)["allow_mixed_meta"] is True
  r = report.write([work], str(tmp_path / "report"))
  assert r["meta_runs"] == [runs["meta"], other_meta]
  with open(tmp_path / "report" / "report.md") as f:
    assert f"The modules grew in 2 meta runs ({runs['meta']}, {other_meta})" in f.read()


# --- A loss that is not finite ----------------------------------------------

# warmup_steps=2: step 1 trains at warmup_lr, step 2 at half of a huge peak lr,
# so the loss of step 3 (computed from the state after step 2) is not finite.
NAN = {"optim.lr": 1e12, "total_steps": 6, "checkpoint_every_steps": 1, "log_every_steps": 1, "warmup_steps": 2}


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(capsys, tmp_path):
  workdir = str(tmp_path / "diverged")
  line = cli_error(capsys, "train", f"--config={TINY}:meta", *[f"--config.{k}={v}" for k, v in NAN.items()],
                   f"--workdir={workdir}")
  words = line.split()
  bad = int(words[words.index("step") + 1].rstrip(":"))
  good = int(words[words.index("checkpoint") + 3])
  assert_names(line, f"loss is nan at step {bad}: training stopped",
               f"last good checkpoint is step {good} in {os.path.join(workdir, 'checkpoints')}",
               "lower --config.optim.lr")
  # Step 2's update, at half the peak, throws the parameters far off: step 3's loss is the first one not finite,
  # and the checkpoint of step 2 holds those parameters.
  assert (bad, good) == (3, 1)

  # Unfinished: no results, no exported modules; only checkpoints from before the divergence.
  assert not os.path.exists(os.path.join(workdir, records.RESULTS_FILE))
  assert not os.path.exists(os.path.join(workdir, "modules"))
  kept = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert kept and max(kept) == good, kept
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [r for r in map(json.loads, f) if r["kind"] != "setup"]
  assert [r["step"] for r in logged] == list(range(1, bad)), logged
  assert all(math.isfinite(r["loss"]) for r in logged)

  # The kept checkpoint is good: finite parameters with a finite loss, so a rerun resumes from it.
  config = tiny("meta", **NAN)
  s = prepare.setup(config, workdir)
  mngr = checkpoints.manager(workdir, config)
  assert mngr.latest_step() == good
  state = checkpoints.restore_state(mngr, good, prepare.state_spec(s).abstract)
  mngr.close()
  assert int(state.step) == good
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))
  assert math.isfinite(train.evaluate(s, state.params)["loss"])


def test_the_checkpoint_a_diverged_run_names_is_one_that_verifies(meta_copy):
  """Garbage in place in the newest checkpoint (Orbax reads it back without a word): the checkpoint the divergence's
  line names for a rerun to resume from is the previous one, whose files match their digests, and the damaged one is
  moved aside, not deleted."""
  steps = checkpoints.saved_steps(meta_copy)[::-1]   # oldest first
  assert len(steps) >= 2, steps
  newest = os.path.join(checkpoints.state_dir(meta_copy), str(steps[-1]))
  garble(os.path.join(newest, "state"))
  mngr = checkpoints.manager(meta_copy, tiny("meta"))
  with pytest.raises(ModassemError) as stop:
    train._stop_diverged(mngr, steps[-1] + 1, f"loss is nan at step {steps[-1] + 1}")  # pylint: disable=protected-access
  mngr.close()
  assert f"the last good checkpoint is step {steps[-2]} in {checkpoints.state_dir(meta_copy)}," in str(stop.value)
  assert checkpoints.saved_steps(meta_copy) == steps[-2::-1] and not os.path.exists(newest)
  assert os.listdir(os.path.join(meta_copy, "damaged", "checkpoints")) == [str(steps[-1])]


def test_train_api_raises_the_error_type(runs, tmp_path):
  """`train.train` raises ModassemError (the CLI's one-line error) and writes nothing for bad input."""
  workdir = str(tmp_path / "new_run")
  config = tiny("incubate", meta=runs["meta"], **{"model.num_modules": 2, "model.depths": (4, 4)})
  with pytest.raises(ModassemError, match=r"has 4 modules, this config 2"):
    train.train(config, workdir)
  assert not os.path.exists(workdir)


# --- A resume with another config -------------------------------------------

def test_a_resume_that_changes_what_is_trained_is_refused(capsys, meta_copy):
  before = tree_state(meta_copy)
  line = cli_error(capsys, "train", f"--config={TINY}:meta", "--config.optim.lr=0.001", "--config.seed=3",
                   f"--workdir={meta_copy}")
  assert_names(line, meta_copy, "was started with optim.lr=0.004, this config has optim.lr=0.001",
               "1 more field(s) differ: seed", "config.json", "--allow_changed=optim.lr,seed")
  assert tree_state(meta_copy) == before
  with open(os.path.join(meta_copy, "config.json")) as f:
    assert json.load(f)["optim"]["lr"] == tiny("meta").optim.lr
  line = cli_error(capsys, "train", f"--config={TINY}:meta", "--allow_changed=optim.rate", f"--workdir={meta_copy}")
  assert_names(line, "--allow_changed=optim.rate names no config field")


def test_a_resume_may_change_what_only_reports(capsys, meta_copy):
  capsys.readouterr()
  assert cli.main(["train", f"--config={TINY}:meta", "--config.log_every_steps=1", "--config.eval_every_steps=5",
                   "--config.keep_checkpoints=1", f"--workdir={meta_copy}"]) == 0
  assert "already finished" in capsys.readouterr().out


def test_an_allowed_change_continues_the_run_and_is_recorded(capsys, meta_copy):
  # Back to a run stopped after its step-3 checkpoint.
  for d in ("modules", "checkpoints/6"):
    shutil.rmtree(os.path.join(meta_copy, d))
  os.remove(os.path.join(meta_copy, "results.json"))
  capsys.readouterr()
  assert cli.main(["train", f"--config={TINY}:meta", "--config.optim.lr=0.001", "--allow_changed=optim.lr",
                   f"--workdir={meta_copy}"]) == 0
  out = capsys.readouterr().out
  assert "resuming meta from step 3" in out and "continuing with changed optim.lr" in out
  with open(os.path.join(meta_copy, "config.json")) as f:
    assert json.load(f)["optim"]["lr"] == 0.001


def test_a_divergence_at_the_last_step_stops_before_anything_is_exported(capsys, tmp_path):
  """One step at a learning rate of 1e39 (6e37 at this batch): the step's loss is computed before its update, so it
  is finite, and the update leaves parameters near float32's limit, whose loss is not. Nothing is exported, and the
  run starts over when rerun."""
  workdir = str(tmp_path / "last")
  last = [f"--config.{k}={v}" for k, v in {"total_steps": 1, "warmup_steps": 0, "checkpoint_every_steps": 1,
                                           "log_every_steps": 1}.items()]
  line = cli_error(capsys, "train", f"--config={TINY}:meta", "--config.optim.lr=1e39", *last, f"--workdir={workdir}")
  assert_names(line, "the last step (1) diverged: its parameters are finite, their held-out loss is nan: "
               "training stopped",
               "no good checkpoint was saved yet, so a rerun starts over", "lower --config.optim.lr")
  assert not os.path.exists(os.path.join(workdir, records.RESULTS_FILE))
  assert not os.path.exists(os.path.join(workdir, "modules"))
  assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [r for r in map(json.loads, f) if r["kind"] == "train"]
  assert [r["step"] for r in logged] == [1] and math.isfinite(logged[0]["loss"])
  # Resumable: rerun with a learning rate that works, it starts over and finishes.
  assert cli.main(["train", f"--config={TINY}:meta", "--config.optim.lr=0.001", "--allow_changed=optim.lr", *last,
                   f"--workdir={workdir}"]) == 0
  with open(os.path.join(workdir, records.RESULTS_FILE)) as f:
    assert math.isfinite(json.load(f)["loss"])


# --- A finished run whose modules were lost ----------------------------------

def test_a_finished_run_with_missing_or_damaged_modules_exports_them_again(capsys, runs, meta_copy):
  """Module 1 with garbage in place (its digests find it), module 2 gone, module 3 cut short and without digests (as
  an older version wrote it: Orbax finds that)."""
  garble(str(checkpoints.module_dir(meta_copy, 1)))
  shutil.rmtree(checkpoints.module_dir(meta_copy, 2))
  os.remove(os.path.join(checkpoints.module_dir(meta_copy, 3), digests.DIGESTS_FILE))
  data = os.path.join(checkpoints.module_dir(meta_copy, 3), "d")
  for name in os.listdir(data):   # cut every data file of module 3 short
    path = os.path.join(data, name)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  assert [checkpoints.module_intact(meta_copy, k) for k in range(4)] == [True, False, False, False]
  capsys.readouterr()
  assert cli.main(["train", f"--config={TINY}:meta", f"--workdir={meta_copy}"]) == 0
  out = capsys.readouterr().out
  assert "module_1, module_2, module_3 in modules/ were missing or damaged: exported them again" in out, out
  for k in (1, 3):   # moved aside, not deleted
    assert os.path.isdir(os.path.join(meta_copy, "damaged", "modules", f"module_{k}"))
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  for k in (1, 2, 3):
    got = jax.tree_util.tree_leaves(ocp.StandardCheckpointer().restore(checkpoints.module_dir(meta_copy, k)))
    want = jax.tree_util.tree_leaves(ocp.StandardCheckpointer().restore(checkpoints.module_dir(runs["meta"], k)))
    for a, b in zip(got, want, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Now whole again, digests included: the next rerun finds nothing to do.
  assert all(checkpoints.module_intact(meta_copy, k) for k in range(4))
  assert cli.main(["train", f"--config={TINY}:meta", f"--workdir={meta_copy}"]) == 0
  assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize("phase", ["incubate", "assemble"])
def test_a_module_damaged_in_place_is_refused_where_a_phase_loads_it(capsys, runs, tmp_path, phase):
  """Garbage of the same length in a module's data, which Orbax reads without a word: its digests find it, and the
  run that loads it stops in one line naming the run, the module and the file, before it makes anything."""
  source = str(tmp_path / "source")
  shutil.copytree(runs["meta" if phase == "incubate" else "inc_all"], source)
  garble(str(checkpoints.module_dir(source, 1)))
  if phase == "incubate":
    what, overrides = "meta run", [f"--config.meta={source}", "--config.module=2"]   # the meta model's 1 is read
  else:
    what, overrides = "module source", [f"--config.modules={runs['inc_all']},{source},{runs['inc_all']},"
                                        f"{runs['inc_all']}"]
  line = train_error(capsys, tmp_path, f"{TINY}:{phase}", *overrides, sources=[source])
  assert_names(line, f"{what} {source!r}: module_1 is damaged (digest mismatch in ", "/d/",
               "rerun the run that made it")


# --- Two writers -----------------------------------------------------------------

def test_a_second_writer_on_a_live_run_directory_is_refused(capsys, tmp_path):
  """A live holder (a process holding the lock as a run does, heartbeat and all): a train on its directory stops with
  one line naming it, and leaves the lock alone. Once the holder is killed (no chance to remove its lock), the next
  train takes the lock over at once."""
  work = str(tmp_path / "live")
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom modassem import lock\n"
                             f"with lock.writer({work!r}):\n  print('held', flush=True)\n  time.sleep(600)"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lock_file = os.path.join(work, "lock.json")
  try:
    assert holder.stdout.readline().strip() == "held", holder.communicate()[1][-3000:]
    held = {k: v for k, v in json.load(open(lock_file)).items() if k != "heartbeat"}
    line = cli_error(capsys, "train", f"--config={TINY}:meta", f"--workdir={work}")
    assert_names(line, f"{work} is being written by another run (pid {holder.pid} on {socket.gethostname()}",
                 "last heartbeat", "wait for it to end")
    assert holder.poll() is None
    assert {k: v for k, v in json.load(open(lock_file)).items() if k != "heartbeat"} == held
  finally:
    holder.kill()
    holder.wait()
  capsys.readouterr()
  with lock.writer(work):
    assert json.load(open(lock_file))["pid"] == os.getpid()
  assert "took over the lock of a run that is gone" in capsys.readouterr().out
  assert not os.path.exists(lock_file)


@pytest.mark.parametrize("age, taken", [(2 * lock.LEASE_S, True), (0.0, False)])
def test_a_lock_under_a_live_pid_is_taken_over_once_its_heartbeat_is_stale(tmp_path, age, taken):
  """After a container's restart the new run may have the crashed one's PID (PID 1, or a reused id): the holder's
  process is alive (here: this very process), and only its heartbeat tells that it has stopped."""
  work = tmp_path / "restarted"
  work.mkdir()
  now = time.time()
  ghost = {"host": socket.gethostname(), "pid": os.getpid(), "since": now - 3600, "heartbeat": now - age}
  (work / "lock.json").write_text(json.dumps(ghost))
  said = []
  if taken:
    with lock.writer(str(work), say=said.append):
      assert json.loads((work / "lock.json").read_text())["since"] > ghost["since"]
    assert len(said) == 1 and "took over the lock of a run that is gone" in said[0], said
    assert not (work / "lock.json").exists()
  else:
    with pytest.raises(ModassemError, match="is being written by another run"):
      with lock.writer(str(work), say=said.append):
        pass
    assert json.loads((work / "lock.json").read_text()) == ghost


@pytest.mark.parametrize("content", [b"", b'{"host": "h", "pid": 12', b"[1, 2]", b'{"pid": 1}', b"\xff\xfe\x00"],
                         ids=["empty", "cut-short", "not-an-object", "no-holder", "not-utf8"])
def test_a_lock_file_that_names_no_holder_is_taken_over(tmp_path, monkeypatch, content):
  """As a crash or a full disk between the lock's creation and its first write leaves it: no live run holds it."""
  monkeypatch.setattr(lock, "GARBLED_S", 0.3)   # the wait, shortened for the test
  (tmp_path / "lock.json").write_bytes(content)
  said, t = [], time.monotonic()
  with lock.writer(str(tmp_path), say=said.append):
    assert json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
  assert time.monotonic() - t >= lock.GARBLED_S   # it may have been being written: read again for a while first
  assert said == [f"{tmp_path}: took over the lock of a run that is gone (its lock file named no holder)"], said
  assert not (tmp_path / "lock.json").exists()


def test_a_lock_file_written_just_after_it_is_seen_empty_is_respected(tmp_path):
  """A lock seen empty in the instant between another run's create and its write: that run holds it."""
  (tmp_path / "lock.json").write_text("")
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "heartbeat": time.time()}
  writing = threading.Timer(0.5, lambda: (tmp_path / "lock.json").write_text(json.dumps(holder)))
  writing.start()
  try:
    with pytest.raises(ModassemError, match="is being written by another run"):
      with lock.writer(str(tmp_path)):
        pass
  finally:
    writing.join()
  assert json.loads((tmp_path / "lock.json").read_text()) == holder


def test_the_lock_of_a_run_that_is_gone_is_taken_over(capsys, meta_copy):
  # A lock left by a process of this host that no longer exists (as after kill -9).
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  with open(os.path.join(meta_copy, "lock.json"), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": int(dead.stdout), "since": time.time(), "heartbeat": time.time()},
              f)
  capsys.readouterr()
  assert cli.main(["train", f"--config={TINY}:meta", f"--workdir={meta_copy}"]) == 0
  out = capsys.readouterr().out
  assert "took over the lock of a run that is gone" in out and "already finished" in out
  assert not os.path.exists(os.path.join(meta_copy, "lock.json"))
