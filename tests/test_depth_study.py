"""benchmarks/depth_study.py on the tiny preset (two depths, one seed): it writes the table, the JSON and the plot,
and a rerun does not run a finished pipeline again. The first run is a background job (conftest.JOBS), after the
session's tiny pipeline, whose compiled programs its depth-8 runs find in the session's cache."""

import json
import os
import subprocess
import sys

from conftest import JOBS, REPO, SCRATCH, TINY

SCRIPT = os.path.join(REPO, "benchmarks", "depth_study.py")
OUT = os.path.join(SCRATCH, "depth_study")
ARGV = [sys.executable, SCRIPT, f"--config={TINY}", "--data=digits", "--depths=4,8", "--seeds=0", f"--out={OUT}"]
JOBS.add("depth-study", ARGV, module=__file__)


def test_the_study_writes_its_table_and_plot_and_resumes():
  JOBS.result("depth-study")
  with open(os.path.join(OUT, "results.json")) as f:
    r = json.load(f)
  assert sorted(r["runs"]) == ["depth4_seed0", "depth8_seed0"]
  for run in r["runs"].values():
    assert 0 <= run["assembled"] <= 100 and 0 <= run["e2e"] <= 100
    assert run["gain"] == run["assembled"] - run["e2e"]
    assert run["method_wall_s"] > 0 and run["method_flops"] > 0
    assert 0 <= run["meta"] <= 100 and run["e2e_steps"] > 0
  # The meta model is one block per module whatever the depth: the same run at both depths of a seed.
  assert r["runs"]["depth4_seed0"]["meta"] == r["runs"]["depth8_seed0"]["meta"]
  assert sorted(r["by_depth"]) == ["4", "8"] and r["by_depth"]["8"]["seeds"] == 1
  assert r["runs_setup"]["model"]["depths"] == [2, 2, 2, 2]
  assert set(r["commands"]) == {"depth4_seed0", "depth8_seed0"}
  assert "--config.model.depths=(1,1,1,1)" in r["commands"]["depth4_seed0"]
  with open(os.path.join(OUT, "results.md")) as f:
    md = f.read()
  assert "| 4 | 1 |" in md and "| 8 | 1 |" in md and "The gain grows with depth:" in md
  assert md.index("- depth4_seed0:") < md.index("- depth8_seed0:")
  with open(os.path.join(OUT, "depth.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(OUT, "log.txt")) as f:
    log = f.read()
  with open(os.path.join(OUT, "walls.json")) as f:
    walls = f.read()
  finished = os.path.getmtime(os.path.join(OUT, "runs", "depth8_seed0", "e2e", "results.json"))

  again = subprocess.run(ARGV, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "+ modassem" not in again.stdout and "| 8 | 1 |" in again.stdout
  with open(os.path.join(OUT, "log.txt")) as f:
    assert f.read() == log
  with open(os.path.join(OUT, "walls.json")) as f:
    assert f.read() == walls
  assert os.path.getmtime(os.path.join(OUT, "runs", "depth8_seed0", "e2e", "results.json")) == finished


def test_a_depth_that_four_modules_cannot_share_is_refused_before_anything_runs(tmp_path):
  bad = subprocess.run([*ARGV[:-2], "--depths=4,6", f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2 and "--depths=4,6" in bad.stderr and "multiple of 4" in bad.stderr
  assert not (tmp_path / "out").exists()
