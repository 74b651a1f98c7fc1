"""benchmarks/depth_study.py on the tiny preset (two depths, one seed): it writes the table, the JSON and the plot,
and a rerun does not run a finished pipeline again. The first run is a background job (conftest.JOBS)."""

import json
import os
import shutil
import subprocess
import sys

from conftest import JOBS, REPO, SCRATCH, TINY

SCRIPT = os.path.join(REPO, "benchmarks", "depth_study.py")
OUT = os.path.join(SCRATCH, "depth_study")
ARGV = [sys.executable, SCRIPT, f"--config={TINY}", "--data=digits", "--depths=4,8", "--seeds=0", f"--out={OUT}"]
# After the session pipeline: the study's meta run and its depth-8 pipeline compile the programs the session
# pipeline compiled, and read them from the session's compilation cache.
JOBS.add("depth-study", ARGV, module=__file__, after="pipeline")


def test_the_study_writes_its_table_and_plot_and_resumes():
  JOBS.result("depth-study")
  with open(os.path.join(OUT, "results.json")) as f:
    r = json.load(f)
  assert sorted(r["runs"]) == ["depth4_seed0", "depth8_seed0"]
  # Each row is its runs' own results: the assembly's and e2e's top-1, the shared meta run's, and the FLOPs of the
  # three phases of the method.
  done = lambda *path: json.load(open(os.path.join(OUT, "runs", *path, "results.json")))
  meta = done("meta_seed0")
  for name, run in r["runs"].items():
    assemble, e2e, incubate = done(name, "assemble"), done(name, "e2e"), done(name, "incubate")
    assert (run["assembled"], run["e2e"], run["meta"]) == (assemble["top1"], e2e["top1"], meta["top1"]), name
    assert run["gain"] == assemble["top1"] - e2e["top1"] and run["e2e_steps"] == e2e["steps"]
    assert run["method_flops"] == meta["train_flops"] + incubate["train_flops"] + assemble["train_flops"]
    assert run["method_wall_s"] == meta["wall_s"] + incubate["wall_s"] + assemble["wall_s"]
  # The meta model is one block per module whatever the depth: the same run at both depths of a seed.
  assert r["runs"]["depth4_seed0"]["meta"] == r["runs"]["depth8_seed0"]["meta"]
  assert sorted(r["by_depth"]) == ["4", "8"] and r["by_depth"]["8"]["seeds"] == 1
  assert r["runs_setup"]["model"]["depths"] == [2, 2, 2, 2]
  assert set(r["commands"]) == {"meta_seed0", "depth4_seed0", "depth8_seed0"}
  assert "--config.meta=" in r["commands"]["depth4_seed0"] and ":meta" in r["commands"]["meta_seed0"]
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

  # On another machine: the results committed, the run directories not. The runs recorded from the same code are
  # not run again (not even their meta model), and the table is the same.
  shutil.move(os.path.join(OUT, "runs"), os.path.join(SCRATCH, "depth_study_runs"))
  try:
    elsewhere = subprocess.run(ARGV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert "+ modassem" not in elsewhere.stdout and "2 runs of commit" in elsewhere.stdout
    assert not os.path.exists(os.path.join(OUT, "runs", "meta_seed0"))
    with open(os.path.join(OUT, "results.md")) as f:
      assert f.read() == md
  finally:
    shutil.rmtree(os.path.join(OUT, "runs"), ignore_errors=True)
    shutil.move(os.path.join(SCRATCH, "depth_study_runs"), os.path.join(OUT, "runs"))


def test_a_pipeline_given_a_meta_run_trains_none_and_counts_its_flops(pipeline_dir):
  """The study's depth-8 pipeline is the session's tiny pipeline but for its meta run, trained beforehand and given
  with --config.meta: it trains no meta model, and its budget, e2e's steps and its results are the session
  pipeline's, where the meta model was trained in the chain. Its report says the meta run was shared."""
  JOBS.result("depth-study")
  shared = os.path.join(OUT, "runs", "depth8_seed0")
  read = lambda *path: json.load(open(os.path.join(*path)))
  assert not os.path.exists(os.path.join(shared, "meta"))
  ours, chain = read(shared, "report.json"), read(pipeline_dir, "report.json")
  meta = read(OUT, "runs", "meta_seed0", "results.json")
  assert ours["phases"]["meta"]["train_flops"] == meta["train_flops"] == chain["phases"]["meta"]["train_flops"]
  assert ours["phases"]["meta"]["workdir"] == os.path.join(OUT, "runs", "meta_seed0")
  assert ours["assembled"]["train_flops"] == chain["assembled"]["train_flops"]
  assert ours["phases"]["e2e"]["steps"] == chain["phases"]["e2e"]["steps"]
  assert ours["e2e"]["train_flops"] == chain["e2e"]["train_flops"]
  assert ours["assembled"]["top1"] == chain["assembled"]["top1"] and ours["e2e"]["top1"] == chain["e2e"]["top1"]
  assert ours["meta_shared"] is True and chain["meta_shared"] is False
  with open(os.path.join(shared, "report.md")) as f:
    assert f"The meta run {os.path.join(OUT, 'runs', 'meta_seed0')} was shared" in f.read()
  with open(os.path.join(pipeline_dir, "report.md")) as f:
    assert "was shared" not in f.read()



def test_a_depth_that_four_modules_cannot_share_is_refused_before_anything_runs(tmp_path):
  bad = subprocess.run([*ARGV[:-2], "--depths=4,6", f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2 and "--depths=4,6" in bad.stderr and "multiple of 4" in bad.stderr
  assert not (tmp_path / "out").exists()
