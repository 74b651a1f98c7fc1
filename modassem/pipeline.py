"""The whole method from one command, with its baseline and a report.

meta -> incubate (module=all) -> assemble, each in its own run directory
under WORKDIR, then the end-to-end baseline given the same number of training
FLOPs as the three phases together. Every run resumes, so rerunning the
command after an interruption picks up where it stopped.

`--config.meta=RUN` takes a finished meta run instead of training one (one
meta run shared by pipelines at several depths: the meta model has one block
per module whatever the depth). Its training FLOPs are counted in the
method's budget exactly as if it had been trained here, so e2e's budget is the
same either way; the report says the meta run was shared.
"""

from __future__ import annotations

import os

from modassem import config as config_lib, cost, files, report as report_lib, train
from modassem.records import RESULTS_FILE, RUN_FILE
from modassem.distributed import is_main, say
from modassem.errors import ModassemError
from modassem.report import METHOD, PLAIN


def phase_configs(spec: str, overrides: dict, workdir: str, compare_plain: bool = False) -> tuple[dict, dict]:
  """Each phase's config (with the user's overrides) and run directory; incubation and assembly wired to the runs
  before them. `compare_plain` (with a teacher) adds an incubation without the teacher and its assembly."""
  path, _ = config_lib.split_spec(spec)
  dirs = {p: files.join(workdir, p) for p in METHOD + ("e2e",)}
  shared = str(overrides.get("meta") or "")
  if shared:
    dirs["meta"] = shared_meta_run(shared)
  # The meta run is the pipeline's to wire: a given one is the incubation's source, not a field of every phase.
  overrides = {k: v for k, v in overrides.items() if k != "meta"}
  configs = {}
  for phase in METHOD + ("e2e",):
    c = config_lib.load(f"{path}:{phase}", config_lib.phase_overrides(overrides, phase))
    if phase == "incubate":
      c.module = "all"
      c.meta = dirs["meta"]
    if phase == "assemble":
      c.modules = ",".join([dirs["incubate"]] * c.model.num_modules)
    configs[phase] = c
  if compare_plain:
    if not configs["incubate"].teacher:
      raise ModassemError("--compare_plain compares incubation with a teacher (m2mKD) and without: pass "
                          "--config.teacher=SOURCE too")
    dirs.update({p: files.join(workdir, p) for p in PLAIN})
    configs["incubate_plain"] = configs["incubate"].copy_and_resolve_references()
    configs["incubate_plain"].teacher = ""
    configs["assemble_plain"] = configs["assemble"].copy_and_resolve_references()
    configs["assemble_plain"].modules = ",".join([dirs["incubate_plain"]] * configs["assemble"].model.num_modules)
  return configs, dirs


def shared_meta_run(path: str) -> str:
  """A meta run given to the pipeline: finished, and recorded as an absolute path (or a bucket URL) so that the
  incubation's config.json names it wherever it is read from."""
  full = path if files.is_remote(path) else os.path.abspath(path)
  wd = files.path(full)
  run = files.read_json(wd / RUN_FILE) if wd.is_dir() else None
  if run is None:
    raise ModassemError(f"--config.meta={path} is not a run directory: pass the --workdir of a finished meta run, or "
                        "leave --config.meta out to train one")
  if run.get("phase") != "meta":
    raise ModassemError(f"--config.meta={path} is a {run.get('phase')} run: pass the --workdir of a meta run")
  if files.read_json(wd / RESULTS_FILE) is None:
    raise ModassemError(f"--config.meta={path} has not finished (no {RESULTS_FILE}): rerun its command to finish it "
                        "first")
  return full


def run(spec: str, overrides: dict, workdir: str, compare_plain: bool = False) -> dict:
  configs, dirs = phase_configs(spec, overrides, workdir, compare_plain)
  results = {}
  for phase in METHOD + (PLAIN if compare_plain else ()):
    if phase == "meta" and overrides.get("meta"):
      # Trained elsewhere: its results (train FLOPs and wall time included) stand in the budget as they are.
      say(f"== meta: the shared meta run {dirs['meta']} (not trained here)")
      results[phase] = files.read_json(files.path(dirs["meta"]) / RESULTS_FILE)
      continue
    say(f"== {phase} -> {dirs[phase]}")
    results[phase] = train.train(configs[phase], dirs[phase])

  budget = sum(results[p]["train_flops"] for p in METHOD)
  e2e = configs["e2e"]
  # A finished e2e run recorded its step's FLOPs (the same cost analysis); a rerun need not lower the step again.
  done = files.read_json(files.path(dirs["e2e"]) / RESULTS_FILE) or {}
  per_step = done.get("step_flops") or cost.step_flops(e2e)
  e2e.total_steps = max(int(round(budget / per_step)), 1)
  say(f"== e2e -> {dirs['e2e']}: {e2e.total_steps} steps = {budget:.3g} FLOPs, the method's budget")
  results["e2e"] = train.train(e2e, dirs["e2e"])

  if not is_main():
    return {}
  # The same report `modassem report` makes of these run directories.
  report = report_lib.write([dirs[p] for p in dirs], workdir)
  print(report_lib.report_markdown(report), flush=True)
  return report


