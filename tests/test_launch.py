"""The launch scripts, under DRY_RUN=1: which commands they would run, in which order, and that they run none.

Every script runs with stub `gcloud`, `modassem`, `pip`, `python3`, ... first on PATH: a stub that is called
records it, so "nothing was executed" is checked directly. No accelerator, cloud account or network is needed.
Every `modassem` command a script emits is then parsed by the CLI's own parser (flags, config file, overrides),
and the checks read what that parser makes of it: a flag the CLI renamed or a config field it lost fails here.
"""

import json
import os
import shlex
import subprocess
import sys

import pytest

from modassem import cli, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
K = 4
STUBBED = ("gcloud", "gsutil", "modassem", "pip", "pip3", "python", "python3", "git", "curl", "sudo", "gcsfuse",
           "nvidia-smi", "ssh", "scp")


@pytest.fixture
def sandbox(tmp_path):
  """(env, called-marker, cwd): PATH starts with stubs that record any call and fail."""
  stubs = tmp_path / "stubs"
  stubs.mkdir()
  called = tmp_path / "called"
  for name in STUBBED:
    stub = stubs / name
    stub.write_text(f"#!/bin/sh\necho \"{name} $*\" >> '{called}'\nexit 97\n")
    stub.chmod(0o755)
  env = {k: v for k, v in os.environ.items()
         if k not in ("MODE", "K", "NNODES", "NODE_RANK", "COORDINATOR", "RUNS", "TPU_NAME", "ZONE", "PROJECT",
                      "ACCELERATOR_TYPE", "SLICE_ACCELERATOR_TYPE", "DISTRIBUTED", "CONFIG", "INSTALL")}
  env.update(PATH=f"{stubs}:/usr/bin:/bin", DRY_RUN="1")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  return env, called, cwd


def dry_run(sandbox, script, *args, **env):
  """The commands `script` prints under DRY_RUN=1, each as its argv."""
  base, called, cwd = sandbox
  proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env={**base, **env}, cwd=cwd,
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  assert not called.exists(), f"{script} ran commands under DRY_RUN=1:\n{called.read_text()}"
  assert os.listdir(cwd) == [], f"{script} created {os.listdir(cwd)} under DRY_RUN=1"
  lines = proc.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
  return [shlex.split(line[2:]) for line in lines]


def flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def parse(argv):
  """A `modassem` command as `modassem VERB ...` parses it, config file and overrides included."""
  assert argv[0] == "modassem" and argv[1] in cli.VERBS, argv
  cwd = os.getcwd()
  os.chdir(REPO)   # config paths are the repository's: the scripts run modassem from a copy of it
  try:
    return flags.run_flags(argv[2:])
  finally:
    os.chdir(cwd)


def check_phases(cmds, runs, mode, config="configs/vit_b.py"):
  """meta, then the incubations, then assemble and eval; the sources each phase reads; returns the parsed flags."""
  assert [c[1] for c in cmds] == ["train"] * (len(cmds) - 1) + ["eval"], cmds
  parsed = [parse(c) for c in cmds]
  assert all(flags.config_spec(fv)[0].startswith(config + ":") for fv in parsed)
  phases = [fv.config.phase for fv in parsed]
  n_inc = K if mode == "each" else 1
  assert phases == ["meta"] + ["incubate"] * n_inc + ["assemble", "assemble"]
  meta, incs, asm, ev = parsed[0], parsed[1:-2], parsed[-2], parsed[-1]
  assert meta.workdir == f"{runs}/meta"
  for inc in incs:
    assert inc.config.meta == meta.workdir
  if mode == "each":
    assert [fv.config.module for fv in incs] == [str(i) for i in range(K)]
    inc_dirs = [fv.workdir for fv in incs]
    assert len(set(inc_dirs)) == K
  else:
    assert incs[0].config.module == "all"
    inc_dirs = [incs[0].workdir] * K
  assert asm.config.modules.split(",") == inc_dirs
  assert not {meta.workdir, asm.workdir} & set(inc_dirs)
  assert ev.workdir == asm.workdir
  return parsed


# -- local.sh -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["each", "all"])
def test_local_phases_in_order(sandbox, mode):
  cmds = dry_run(sandbox, "local.sh", "configs/vit_b.py", "runs/b", "--config.batch_size=64", MODE=mode)
  parsed = check_phases(cmds, "runs/b", mode)
  assert all(fv.config.batch_size == 64 for fv in parsed)   # extra flags reach every phase


def test_local_default_is_one_run_per_module(sandbox):
  check_phases(dry_run(sandbox, "local.sh", "configs/vit_b.py", "runs/b"), "runs/b", "each")


def _modassem_preempted_once(sandbox, when: str):
  """The `modassem` stub, made to exit with status 75 (preempted) the first time its arguments contain `when`,
  and 0 otherwise; each call is recorded."""
  env, called, _ = sandbox
  stub = os.path.join(env["PATH"].split(":")[0], "modassem")
  flag_file = f"{called}.preempted"
  with open(stub, "w") as f:
    f.write(f"#!/bin/sh\necho \"$*\" >> '{called}'\n"
            f"case \"$*\" in *{when}*) [ -e '{flag_file}' ] || {{ touch '{flag_file}'; exit 75; }};; esac\nexit 0\n")


def test_local_runs_a_preempted_phase_again(sandbox):
  base, called, cwd = sandbox
  _modassem_preempted_once(sandbox, "--workdir=runs/b/inc1")
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "configs/vit_b.py", "runs/b"],
                        env={**base, "DRY_RUN": "0"}, cwd=cwd, capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  workdirs = [flag(shlex.split(line), "workdir") for line in called.read_text().splitlines()]
  assert workdirs == ["runs/b/meta", "runs/b/inc0", "runs/b/inc1", "runs/b/inc1", "runs/b/inc2", "runs/b/inc3",
                      "runs/b/assemble", "runs/b/assemble"]
  assert "modassem was preempted (exit status 75): running it again to resume (1/20)" in proc.stderr


@pytest.mark.parametrize("statuses,calls,rc", [("75 75 0", 3, 0), ("2", 1, 2), ("75 75 75", 3, 75)])
def test_until_done_reruns_only_preempted_commands(tmp_path, statuses, calls, rc):
  """launch/until_done.sh (on TPU VM workers) against a command exiting with each status in turn."""
  count = tmp_path / "count"
  cmd = tmp_path / "cmd"
  cmd.write_text(f"#!/bin/sh\necho x >> '{count}'\nset -- {statuses}\nshift $(($(wc -l < '{count}') - 1))\n"
                 f"exit $1\n")
  cmd.chmod(0o755)
  proc = subprocess.run([os.path.join(LAUNCH, "until_done.sh"), str(cmd)], env={**os.environ, "MAX_RERUNS": "2"},
                        capture_output=True, text=True, timeout=30)
  assert (proc.returncode, len(count.read_text().split())) == (rc, calls), proc.stderr


def test_bad_mode_is_refused(sandbox):
  base, _, cwd = sandbox
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "configs/vit_b.py", "runs/b"],
                        env={**base, "MODE": "sideways"}, cwd=cwd, capture_output=True, text=True, timeout=30)
  assert proc.returncode != 0 and "MODE=sideways" in proc.stderr


# -- gpu.sh ---------------------------------------------------------------------------------------------------

def test_gpu_single_host(sandbox):
  cmds = dry_run(sandbox, "gpu.sh", "configs/vit_l.py", "runs/l")
  install, phases = cmds[0], cmds[1:]
  assert install[:5] == ["python3", "-m", "pip", "install", "-e"] and install[5].endswith("[gpu]")
  parsed = check_phases(phases, "runs/l", "each", config="configs/vit_l.py")
  for fv in parsed:     # one process for all local GPUs: no multi-process flags
    assert (fv.coordinator, fv.num_processes, fv.process_id, fv.distributed) == (None, None, None, False)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_gpu_multi_node_flags_per_node(sandbox, rank):
  cmds = dry_run(sandbox, "gpu.sh", "configs/vit_b.py", "/shared/runs/b", MODE="all", NNODES="3",
                 NODE_RANK=str(rank), COORDINATOR="10.0.0.1:1234", INSTALL="0")
  for fv in check_phases(cmds, "/shared/runs/b", "all"):
    assert (fv.coordinator, fv.num_processes, fv.process_id) == ("10.0.0.1:1234", 3, rank)


def test_gpu_multi_node_needs_coordinator(sandbox):
  base, _, cwd = sandbox
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "gpu.sh"), "configs/vit_b.py", "runs/b"],
                        env={**base, "NNODES": "2", "NODE_RANK": "1"}, cwd=cwd, capture_output=True, text=True,
                        timeout=30)
  assert proc.returncode != 0 and "COORDINATOR" in proc.stderr


# -- tpu_pod.sh -----------------------------------------------------------------------------------------------

RUNS = "gs://my-bucket/modassem/vit_b"   # the workers write the run directories straight to the bucket


def tpu_commands(cmds):
  """[(verb, tpu name, argv)], and the modassem commands [(tpu name, modassem argv)] started over ssh."""
  steps, runs = [], []
  for c in cmds:
    if c == ["wait"]:
      steps.append(("wait", None, c))
      continue
    assert c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], c
    verb, name = c[4], c[5]
    if verb == "scp":
      name = c[7].split(":")[0] if c[5] == "--recurse" else name
    steps.append((verb, name, c))
    if verb == "ssh":
      assert "--worker=all" in c
      remote = flag(c, "command")
      last = remote.split(" && ")[-1]
      if last.startswith("launch/until_done.sh modassem "):   # preempted runs are run again on the worker
        runs.append((name, shlex.split(last)[1:]))
      else:
        assert "modassem " not in last, last
  return steps, runs


def test_tpu_pod_mode_all(sandbox):
  cmds = dry_run(sandbox, "tpu_pod.sh", "--config.batch_size=4096", RUNS=RUNS, TPU_NAME="pod", ZONE="us-central2-b")
  steps, runs = tpu_commands(cmds)
  creates = [s for s in steps if s[0] == "create"]
  assert [s[1] for s in creates] == ["pod"]
  create = creates[0][2]
  assert flag(create, "accelerator-type") == "v4-32" and flag(create, "zone") == "us-central2-b"
  assert flag(create, "version")
  verbs = [s[0] for s in steps]
  assert verbs.index("create") < verbs.index("scp") < verbs.index("ssh")
  scp = next(s[2] for s in steps if s[0] == "scp")
  assert "--recurse" in scp and "--worker=all" in scp and scp[scp.index("--recurse") + 1] == REPO
  remotes = [flag(s[2], "command") for s in steps if s[0] == "ssh"]
  assert "pip install -e '.[tpu]'" in remotes[0]                 # install before any run
  assert not any("gcsfuse" in r for r in remotes)                # nothing mounted
  assert {name for name, _ in runs} == {"pod"}
  for fv in check_phases([argv for _, argv in runs], RUNS, "all"):
    # A v4-32 spans 4 hosts: jax.distributed in every process; extra flags everywhere.
    assert fv.distributed and fv.config.batch_size == 4096
  assert "delete" not in verbs


def test_tpu_pod_mode_slices(sandbox):
  cmds = dry_run(sandbox, "tpu_pod.sh", RUNS=RUNS, TPU_NAME="pod", MODE="slices", SLICE_ACCELERATOR_TYPE="v4-8",
                 PROJECT="proj")
  steps, runs = tpu_commands(cmds)
  assert all(flag(s[2], "project") == "proj" for s in steps if s[0] != "wait")
  slices = [f"pod-inc{i}" for i in range(K)]
  creates = {s[1]: s[2] for s in steps if s[0] == "create"}
  assert list(creates) == ["pod"] + slices                        # K slices besides the main TPU VM
  assert all(flag(creates[n], "accelerator-type") == "v4-8" for n in slices)
  assert flag(creates["pod"], "accelerator-type") == "v4-32"
  for name in creates:                                           # each gets the code and modassem
    assert any(s[0] == "scp" and s[1] == name for s in steps)
    assert any(s[0] == "ssh" and s[1] == name and "pip install -e '.[tpu]'" in flag(s[2], "command")
               for s in steps)
  parsed = check_phases([argv for _, argv in runs], RUNS, "each")
  names = [name for name, _ in runs]
  assert names == ["pod"] + slices + ["pod", "pod"]               # incubation i on slice i
  for name, fv in zip(names, parsed):
    if name != "pod":
      assert fv.config.module == name[-1]
      assert not fv.distributed                                   # a v4-8 is one host
    else:
      assert fv.distributed
  # the slices run in parallel, are waited for, then deleted, all before the assembly
  order = [(s[0], s[1]) for s in steps]
  wait = order.index(("wait", None))
  assert [o for o in order[wait + 1:] if o[0] == "delete"] == [("delete", n) for n in slices]
  last_inc = max(i for i, s in enumerate(steps) if s[0] == "ssh" and s[1] in slices)
  first_asm = min(i for i, s in enumerate(steps) if s[0] == "ssh" and s[1] == "pod" and i > last_inc)
  assert last_inc < wait < first_asm


def test_tpu_pod_needs_bucket(sandbox):
  base, called, cwd = sandbox
  for runs in (None, "runs/local"):
    env = {**base, **({"RUNS": runs} if runs else {})}
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh")], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0 and "gs://" in proc.stderr
  assert not called.exists()


# -- colab.ipynb ----------------------------------------------------------------------------------------------

def test_colab_notebook(tmp_path):
  path = os.path.join(LAUNCH, "colab.ipynb")
  with open(path) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["name"] == "python3"
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
      # valid Python once IPython's `!` and `%` lines are set aside
      compile("".join(l for l in cell["source"] if not l.lstrip().startswith(("!", "%"))), "cell", "exec")
  code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  text = "\n".join(code)
  assert "REPO_URL" in text and "git" in text and "clone" in text and ".zip" in text
  # Colab's own TensorFlow stays: the plain install, without the [cpu] extra that adds tensorflow-cpu.
  assert any(c.strip() == "%pip install -q -e ." for c in code)
  index = lambda pred: next(i for i, c in enumerate(code) if pred(c))
  drive = index(lambda c: "drive.mount(" in c)
  assert "USE_DRIVE" in code[drive] and "RUN_DIR" in code[drive] and "google.colab" in code[drive]
  board = index(lambda c: "%tensorboard --logdir {RUN_DIR}" in c)
  assert "%load_ext tensorboard" in code[board]
  pipeline = index(lambda c: c.strip() == "!modassem pipeline --config=configs/demo.py --workdir={RUN_DIR}")
  shows = index(lambda c: "report.md" in c and "curves.png" in c)
  loads = index(lambda c: "modassem.load(" in c)
  assert drive < board < pipeline < shows < loads
  assert "Markdown(" in code[shows] and "Image(" in code[shows] and "IPython.display" in code[shows]
  try:
    import nbformat  # pylint: disable=import-outside-toplevel
  except ImportError:
    pass
  else:
    nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))
  # the committed notebook is what launch/make_colab.py writes
  out = tmp_path / "colab.ipynb"
  subprocess.run([sys.executable, os.path.join(LAUNCH, "make_colab.py"), str(out)], check=True,
                 capture_output=True, timeout=30)
  assert json.loads(out.read_text()) == nb


def test_the_notebooks_load_cell_classifies_held_out_images(pipeline_dir, monkeypatch, capsys):
  """The `modassem.load` cell, run as written on a finished pipeline's runs: its predictions are the model's."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  with open(os.path.join(LAUNCH, "colab.ipynb")) as f:
    cell = next("".join(c["source"]) for c in json.load(f)["cells"] if "modassem.load(" in "".join(c["source"]))
  capsys.readouterr()
  cell_vars = {"os": os, "RUN_DIR": pipeline_dir}
  exec(compile(cell, "load-cell", "exec"), cell_vars)  # pylint: disable=exec-used
  lines = capsys.readouterr().out.splitlines()
  predicted = json.loads(lines[0].split(":", 1)[1])
  true = json.loads(lines[1].split(":", 1)[1])
  # The same 12 held-out digits through the assembly's final train state, as the trainer restores it, in the
  # model the trainer builds: not through modassem.load.
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from conftest import tiny  # pylint: disable=import-outside-toplevel
  from modassem import checkpoints, data, phases  # pylint: disable=import-outside-toplevel
  config = tiny("assemble")
  run = os.path.join(pipeline_dir, "assemble")
  params = ocp.StandardCheckpointer().restore(checkpoints.state_dir(run) / str(config.total_steps) / "state")["params"]
  batch = next(data.build(config.data, config.model.image_size).eval_batches(12))
  logits = jax.jit(phases.model_for(config, config.model.depths).apply)({"params": params}, batch["image"])
  assert true == batch["label"].tolist()
  assert predicted == np.asarray(logits).argmax(-1).tolist()
  # The tiny model is near chance and predicts few classes: its logits say more than their argmax.
  cell_logits = cell_vars["predict"]({"params": cell_vars["params"]}, batch["image"])
  np.testing.assert_allclose(cell_logits, logits, rtol=1e-5, atol=1e-6)


def test_the_readme_opens_the_notebook_in_colab():
  sys.path.insert(0, LAUNCH)
  try:
    import make_colab  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(LAUNCH)
  with open(os.path.join(os.path.dirname(LAUNCH), "README.md")) as f:
    readme = f.read()
  assert f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({make_colab.COLAB_URL})" in readme
