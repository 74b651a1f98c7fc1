"""What the benchmark drivers share: running modassem commands once each (resumable), the CIFAR-10 JPEGs, and
mean and spread over seeds."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_TAR = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10-jpeg.tar.gz")


def command_line(argv: list[str], code: str = REPO) -> str:
  """The command as typed from the repository's root: paths inside this checkout, or inside the checkout `code`
  whose modassem runs it (the same repository at another commit), are written relative to it."""
  def short(arg: str) -> str:
    head, sep, path = arg.rpartition("=") if arg.startswith("--") else ("", "", arg)
    for root in (REPO, code):
      if os.path.isabs(path) and path.startswith(root + os.sep):
        path = os.path.relpath(path, root)
    return head + sep + path
  return "modassem " + " ".join(shlex.quote(short(x)) for x in argv)


def run(argv: list[str], out: str, name: str, done: str, code: str = REPO) -> float:
  """`python -m modassem ARGV` once, its output appended to OUT/log.txt; returns its wall time. Stops on failure.

  The modassem that runs is the one in the checkout `code` (this one by default): a study can pin the code of its
  runs to one commit while its driver and tables go on changing.

  A command that finished before is not run again: its wall time is kept in OUT/walls.json (a rerun of a finished
  modassem command would only reload its results, and its few seconds would replace the real figure). `done` is
  the file the finished command left (its report or results); where it is gone (results committed, run
  directories not, on another machine), the command runs again.
  """
  walls_file, log = os.path.join(out, "walls.json"), os.path.join(out, "log.txt")
  walls = json.load(open(walls_file)) if os.path.isfile(walls_file) else {}
  if name in walls and os.path.isfile(done):
    return walls[name]
  line = "+ " + command_line(argv, code)
  print(line, flush=True)
  start = time.time()
  # `python -m` puts the working directory first on the path, ahead of an installed modassem.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")])))
  with open(log, "a") as f:
    f.write(line + "\n")
    f.flush()
    rc = subprocess.run([sys.executable, "-m", "modassem", *argv], cwd=code, env=env, stdout=f,
                        stderr=subprocess.STDOUT).returncode
  if rc != 0:
    sys.exit(f"modassem {argv[0]} failed (exit {rc}); see {log}, then rerun this script to resume")
  walls[name] = time.time() - start
  with open(walls_file, "w") as f:
    json.dump(walls, f, indent=2)
  return walls[name]


def code_commit(code: str) -> str:
  """The commit of the modassem that runs (the checkout `code`); where its modassem/ or configs/ differ from that
  commit, "+changes-" and a hash of the difference, so that runs of the same uncommitted code still match."""
  git = lambda *args: subprocess.run(["git", *args], cwd=code, capture_output=True, text=True).stdout
  head = git("rev-parse", "HEAD").strip() or "unknown"
  diff = git("diff", "HEAD", "--", "modassem", "configs")
  return head + (f"+changes-{hashlib.sha1(diff.encode()).hexdigest()[:12]}" if diff else "")


def nice_for_the_whole_session() -> None:
  """With Linux's autogroup scheduling, a process in a session of its own (started with setsid or nohup from another
  terminal) competes with the user's session as one group whatever its nice value: the study at `nice -n 19` would
  still take a core from the tests. Its group's nice value set to its own makes it yield as asked."""
  niceness = os.nice(0)
  if niceness > 0 and os.path.exists("/proc/self/autogroup"):
    try:
      with open("/proc/self/autogroup", "w") as f:
        f.write(str(niceness))
    except OSError:
      pass   # not permitted here: the nice value alone applies


def extract_cifar10(data_dir: str, eval_per_class: int) -> None:
  """CIFAR-10's train split whole (`data.train_fraction` picks the subset) and the first `eval_per_class` test
  images of each class, as an image folder: evaluating the whole test split would cost more than the phases it
  measures on 2 cores."""
  if os.path.isdir(os.path.join(data_dir, "train")):
    return
  if not os.path.isfile(CIFAR_TAR):
    sys.exit(f"{CIFAR_TAR} is missing: pass --data=DIR with train/<class>/* and test/<class>/* images")
  os.makedirs(data_dir, exist_ok=True)
  with tarfile.open(CIFAR_TAR) as tar:
    members = [m for m in tar.getmembers() if m.isdir() or m.name.split("/")[-3:-2] != ["test"]
               or int(os.path.splitext(m.name.split("/")[-1])[0]) < eval_per_class]
    tar.extractall(data_dir, members=members, filter="data")


def summary(values: list) -> dict:
  values = [v for v in values if v is not None]
  return {"mean": statistics.fmean(values) if values else None,
          "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def fmt(s: dict) -> str:
  if s["mean"] is None:
    return "-"
  return f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["std"] is not None else "")
