"""Every verb, given a bad command line: exit status 2, one line `modassem VERB: error: ...`, no traceback, and the
run directories as they were. One table, run in-process; each case stops before anything is compiled."""

import os
import re

import pytest

from conftest import REPO, TINY
from modassem import cli
from modassem.errors import ModassemError
from test_errors import tree_state

DEMO = os.path.join(REPO, "configs", "demo.py")


@pytest.fixture
def bad(tmp_path):
  """Config files that fail in each way a hand-written one can, and paths that are not what they claim to be."""
  paths = {"missing": tmp_path / "nope.py", "empty": tmp_path / "empty.py", "broken": tmp_path / "broken.py",
           "raises": tmp_path / "raises.py", "text": tmp_path / "notes.txt", "dir": tmp_path / "a_folder",
           "returns": tmp_path / "returns.py", "imports": tmp_path / "imports.py", "file": tmp_path / "a_file",
           "run": tmp_path / "run", "pth": tmp_path / "missing.pth", "fake_pth": tmp_path / "fake.pth",
           "unfinished": tmp_path / "unfinished", "e2e_a": tmp_path / "e2e_a", "e2e_b": tmp_path / "e2e_b"}
  paths["empty"].write_text("")
  paths["broken"].write_text("def get_config(:\n")
  paths["raises"].write_text("def get_config(phase='meta'):\n  return 1 / 0\n")
  paths["returns"].write_text("def get_config(phase='meta'):\n  return {'batch_size': 8}\n")
  paths["imports"].write_text("import no_such_module\n")
  paths["text"].write_text("batch_size = 8\n")
  paths["dir"].mkdir()
  paths["file"].write_text("not a run directory\n")
  paths["fake_pth"].write_bytes(b"not a pickle at all")
  # Run directories as far as `report` reads them: one unfinished, two finished e2e runs.
  for name, finished in (("unfinished", False), ("e2e_a", True), ("e2e_b", True)):
    paths[name].mkdir()
    (paths[name] / "run.json").write_text('{"phase": "e2e", "trained": [0, 1, 2, 3], "depths": [2, 2, 2, 2]}')
    if finished:
      (paths[name] / "results.json").write_text('{"top1": 1.0, "top5": 2.0, "train_flops": 1.0, "steps": 1}')
  return {k: str(v) for k, v in paths.items()}


# (verbs, argument template, what the line must name). `{run}` is a fresh run directory, `{X}` a path of `bad`.
CONFIG_CASES = [
    (["--config={missing}:meta"], "does not exist"),
    (["--config={empty}:meta"], "has no get_config()"),
    (["--config={broken}:meta"], "SyntaxError"),
    (["--config={raises}:meta"], "ZeroDivisionError"),
    (["--config={returns}:meta"], "not an ml_collections.ConfigDict"),
    (["--config={imports}:meta"], "no_such_module"),
    (["--config={text}"], "not a Python file"),
    (["--config={dir}:meta"], "is a directory"),
    (["--config="], "--config is empty"),
    ([], "--config is required"),
    (["--config={tiny}:meta", "--config.batchsize=3"], "unknown config field 'batchsize' (did you mean 'batch_size'?)"),
    (["--config={tiny}:meta", "--config.no_such=3"], "unknown config field 'no_such'"),
    (["--config={tiny}:meta", "--config.optim.no_such=3"], "unknown config field 'optim.no_such'"),
    (["--config={tiny}:meta", "--config.batch_size=abc"], "--config.batch_size=abc"),
    (["--config={tiny}:meta", "--config.model.depths=(1,2"], "--config.model.depths"),
    (["--config={tiny}:meta", "--config.model=3"], "--config.model=3"),
    (["--config={tiny}:meta", "--no_such_flag=1"], "no_such_flag"),
]
PHASED_CASES = [
    (["--config={demo}:metaa"], "unknown phase 'metaa'"),
    (["--config={tiny}:meta", "--config.optim.lr=nan"], "optim.lr=nan is not a finite number"),
    (["--config={tiny}:meta", "--config.optim.lr=-0.1"], "optim.lr=-0.1 is out of range"),
    (["--config={tiny}:meta", "--config.batch_size=0"], "batch_size=0 is out of range"),
    (["--config={tiny}:meta", "--config.total_steps=-5"], "total_steps=-5 is out of range"),
    (["--config={tiny}:meta", "--config.model.heads=0"], "model.heads=0 is out of range"),
    (["--config={tiny}:meta", "--config.label_smoothing=inf"], "label_smoothing=inf is not a finite number"),
    (["--config={tiny}:meta", "--config.mixup=0.8", "--config.mixup_group=5"], "not a multiple of mixup_group=5"),
    (["--config={tiny}:meta", f"--config.seed={2 ** 64}"], f"seed={2 ** 64} is out of range: it must be >= 0 and <= "
                                                          f"{2 ** 63 - 1}"),
    (["--config={tiny}:meta", "--config.seed=-1"], "seed=-1 is out of range"),
    (["--config={tiny}:meta", "--config.incubation_drop_path=blocks"],
     "incubation_drop_path='blocks' is unknown: use hybrid (Deep Incubation's) or module (m2mKD's)"),
    (["--config={tiny}:meta", "--config.model.depths=(0,4,4,0)"], "has a module of depth 0: every module needs at "
                                                                  "least one block"),
    (["--config={tiny}:meta", "--config.data.name=folder", "--config.data.path={file}"],
     "data.path '{file}' is a file, not a folder"),
]


def cases():
  for verb in ("train", "eval", "pipeline", "plan"):
    for args, needle in CONFIG_CASES:
      if verb in ("pipeline", "plan"):
        args = [a.replace(":meta", "") for a in args]
      yield verb, args + (["--workdir={run}"] if verb != "plan" else []), needle
  for args, needle in PHASED_CASES:
    yield "train", args + ["--workdir={run}"], needle
  yield "eval", PHASED_CASES[0][0] + ["--workdir={run}"], PHASED_CASES[0][1]
  yield "eval", ["--config={tiny}:meta", "--workdir={run}"], "not a run directory"
  for verb in ("train", "eval"):
    yield verb, ["--config={tiny}:meta", "--workdir={file}"], "is a file, not a directory"
    yield verb, ["--config={tiny}:meta", "--workdir={file}/run"], "lies under {file}, which is a file"
    yield verb, ["--config={tiny}:meta"], "--workdir is required"
  for args, needle in PHASED_CASES[1:3]:
    yield "pipeline", [a.replace(":meta", "") for a in args] + ["--workdir={run}"], needle.split("=")[0]
  yield "pipeline", ["--config={tiny}", "--workdir={file}"], "is a file, not a directory"
  yield "pipeline", ["--config={tiny}:meta", "--workdir={run}"], "runs every phase"
  yield "plan", ["--config={tiny}:meta"], "runs every phase"
  yield "plan", ["--config={tiny}", "--num_train=0"], "--num_train"
  yield "plan", ["--config={tiny}", "--num_train=many"], "--num_train"
  yield "train", ["--config={tiny}:incubate", "--config.meta={dir}", "--workdir={run}"], "no run.json"
  yield "eval", ["--config={tiny}:meta", "--workdir={dir}"], "not a run"
  yield "convert", [], "--from"
  yield "convert", ["--from={pth}", "--to={run}"], "does not exist"
  yield "convert", ["--from={file}", "--to={run}"], "a_file"
  yield "convert", ["--from={dir}", "--to={run}.pth"], "a_folder"
  yield "convert", ["--from={pth}", "--to={run}", "--preset=no_such"], "unknown preset 'no_such'"
  yield "convert", ["--from={pth}", "--to={run}", "--heads=0"], "--heads=0"
  yield "convert", ["--from={pth}", "--to={run}", "--ln_eps=-1"], "--ln_eps=-1"
  yield "convert", ["--to={run}"], "--from"
  yield "convert", ["--from={pth}"], "--to"
  yield "convert", ["--from=", "--to={run}"], "--from"
  yield "convert", ["--from={fake_pth}", "--to={run}"], "fake.pth"
  yield "convert", ["--from={text}", "--to={run}"], "notes.txt"
  yield "convert", ["--from={empty}", "--to={run}"], "empty.py"
  yield "convert", ["--from={pth}", "--to={run}", "--heads=abc"], "--heads"
  yield "convert", ["--from={pth}", "--to={run}", "--ln_eps=abc"], "--ln_eps"
  yield "convert", ["--from={pth}", "--to={run}", "--heads=-3"], "--heads=-3"
  yield "convert", ["--from={pth}", "--to={run}", "--ln_eps=0"], "--ln_eps=0"
  yield "convert", ["--from={dir}", "--to={run}.pth", "--preset=tiny"], "apply to importing a .pth file"
  yield "convert", ["--from={dir}", "--to={run}.pth", "--heads=4"], "apply to importing a .pth file"
  yield "convert", ["--from={pth}", "--to={run}", "--no_such=1"], "no_such"
  yield "report", [], "no runs given"
  yield "report", ["{unfinished}"], "has not finished"
  yield "report", ["{e2e_a}"], "0 assembly runs given"
  yield "report", ["{e2e_a}", "{e2e_b}"], "0 assembly runs given"
  yield "report", ["{e2e_a}", "{run}"], "does not exist"
  yield "report", ["{e2e_a}", "{dir}"], "not a run directory"
  yield "report", ["{e2e_a}", "{file}"], "is a file"
  yield "report", ["{e2e_a}", "--out"], "--out"
  yield "report", ["{e2e_a}", "--out={file}"], "0 assembly runs given"
  yield "report", ["--out={run}"], "no runs given"
  yield "report", ["{empty}"], "is a file"
  yield "report", ["{missing}"], "does not exist"
  yield "report", ["{pth}", "{run}"], "does not exist"
  yield "report", ["{unfinished}", "{e2e_a}"], "has not finished"
  yield "report", ["{dir}", "{e2e_a}"], "not a run directory"
  yield "report", ["{e2e_a}", "{e2e_b}", "{unfinished}"], "has not finished"
  yield "report", ["{run}"], "does not exist"
  yield "report", ["{dir}"], "not a run directory (no run.json)"
  yield "report", ["{file}"], "is a file, not a run directory"
  yield "report", ["{dir}", "--no_such=1"], "no_such"
  yield "trian", ["--config={tiny}:meta", "--workdir={run}"], "unknown verb 'trian'"


CASES = list(cases())


@pytest.mark.parametrize("verb, args, needle", CASES, ids=[f"{v}-{i}" for i, (v, _, _) in enumerate(CASES)])
def test_a_bad_command_is_one_line_and_changes_nothing(capsys, bad, verb, args, needle):
  paths = {**bad, "tiny": TINY, "demo": DEMO}
  argv = [verb] + [a.format(**paths) for a in args]
  before = {k: tree_state(p) for k, p in bad.items()}
  capsys.readouterr()
  rc = cli.main(argv)
  out, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == 2, (argv, rc, out, err)
  assert "Traceback" not in out + err, err
  assert len(lines) == 1 and lines[0].startswith(f"modassem {verb}: error: "), (argv, err)
  needle = needle.format(**paths)
  assert needle in lines[0], (needle, lines[0])
  assert {k: tree_state(p) for k, p in bad.items()} == before, f"{argv} changed a path it was given"


def test_the_table_covers_every_verb():
  assert all(sum(v == verb for v, _, _ in CASES) >= 20 for verb in cli.VERBS)


def test_a_bug_is_a_traceback_and_a_request_to_report_it(capsys, monkeypatch, tmp_path):
  """What no check foresaw: the traceback, a line saying it is a bug, exit status 1."""
  from modassem import train  # pylint: disable=g-import-not-at-top

  def broken(*a, **k):
    raise RuntimeError("an invariant broke")
  monkeypatch.setattr(train, "train", broken)
  rc = cli.main(["train", f"--config={TINY}:meta", f"--workdir={tmp_path / 'run'}"])
  err = capsys.readouterr().err
  assert rc == 1
  assert "Traceback" in err and "RuntimeError: an invariant broke" in err
  assert err.strip().splitlines()[-1].startswith("modassem train: internal error: this is a bug in modassem")


def test_every_number_of_every_preset_is_range_checked():
  """Each numeric field of every preset's config, in every phase, has a range (checks._RANGES) that the preset's own
  values keep to, and a value just outside it, given as a command-line override would be, is refused by the check
  that runs before anything is built, naming the field."""
  from modassem import checks, config as config_lib, records  # pylint: disable=g-import-not-at-top
  ranges = {field: (low, closed) for field, low, _, closed in checks._RANGES}  # pylint: disable=protected-access
  # Every preset file (common.py and high_res.py are the files they build on).
  presets = sorted(f for f in os.listdir(os.path.join(REPO, "configs"))
                   if f.endswith(".py") and f not in ("common.py", "high_res.py"))
  assert {"tiny.py", "vit_h.py", "vit_h_392.py", "vmoe_b16.py", "cifar_study.py"} <= set(presets)
  # The phases some presets refuse, saying which to use: high resolution fine-tunes only, and m2mKD's V-MoE student
  # is incubated in ViT-L's meta model.
  refusals = ("fine-tune a trained model: use :assemble", "m2mKD's meta model is ViT-L's")
  seen, loaded = set(), set()
  for preset, phase in ((p, ph) for p in presets for ph in ("meta", "incubate", "assemble", "e2e")):
    spec = f"{os.path.join(REPO, 'configs', preset)}:{phase}"
    try:
      config = config_lib.load(spec, {})
    except ModassemError as e:
      assert any(r in str(e) for r in refusals), e
      continue
    loaded.add(preset)
    checks.check_numbers(config)
    for field, value in records._flat(config.to_dict()).items():  # pylint: disable=protected-access
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      assert field in ranges, f"{preset}:{phase} {field}={value!r} has no range in checks._RANGES"
      if field in seen:
        continue
      seen.add(field)
      low, closed = ranges[field]
      bad = type(value)(low) - (1 if closed else 0)   # just below the range, of the field's own type
      with pytest.raises(ModassemError, match=rf"^{re.escape(field)}={re.escape(repr(bad))} is "):
        checks.check_numbers(config_lib.load(spec, {field: bad}))
  assert loaded == set(presets)
  assert {"seed", "optim.lr", "data.train_fraction", "distill.tau", "model.moe.k", "unit_epochs"} <= seen
