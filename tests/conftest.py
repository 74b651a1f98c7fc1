"""Shared fixtures: small real runs of every phase on the built-in data, made once per test session.

Most of the suite's time is XLA compiling the tiny preset's programs on two
cores, so the session is arranged to compile less and to keep both cores busy:
- Every process of the session (this one and the subprocesses tests start,
  which inherit the environment) shares one persistent compilation cache with
  no threshold: a program compiled once (the tiny meta step, its evaluation, a
  sharded init) is read back wherever it comes again. The cache lives in a
  temporary folder and goes with the session.
- XLA's CPU backend compiles without LLVM's optimisation passes
  and with the flags measured below: half the compile time, for
  programs that run a few steps on tiny shapes. Every process of the session
  uses the same setting, so runs compared with each other compile alike.
- The tests run in two pytest-xdist workers, a test file at a time (`-n 2
  --dist loadfile` in pyproject.toml): the files that read no session runs
  first, then the others, each group the costliest first (`file_order`,
  from the CPU seconds in file_cpu.json), so that both cores stay busy to
  the end.
- The heavy subprocesses (`modassem pipeline` on the tiny preset and an
  incubation of module 1 in its meta run, whose runs many tests read, the
  depth study, the two-process job and the sharding tests' cases on 8
  devices and on 1) are `JOBS`: the workers share them out and
  start them in the background as soon as the tests are collected (a job
  that reads the session pipeline's runs once the pipeline has finished),
  and every worker reads their results from the session folder; the tests
  that need none of them run first.
- The workers and every process they start preload jemalloc where the
  system has it (`_preload_allocator`): XLA allocates faster through it.
- Every process of the session imports TensorFlow without Keras, as the
  command line does (`cli.quick_tensorflow_import`), and those that trace
  models (the workers, the command line's runs, the tests' helper
  processes) run Python's garbage collector less often (`cli.collect_less`).
"""

import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# pytest-xdist's workers inherit the environment of the process that starts them (the one where this file is
# imported first): they share its session folder, and with it the compilation cache and the jobs' results.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")    # None in the process that starts the workers, or runs alone
_SCRATCH = os.environ.get("MODASSEM_TEST_SCRATCH") or tempfile.mkdtemp(prefix="modassem-tests-")
os.environ["MODASSEM_TEST_SCRATCH"] = _SCRATCH
_JOB_RESULTS = os.path.join(_SCRATCH, "jobs")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_SCRATCH, "jax-cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
# A size limit turns on the cache's file lock (JAX's LRU cache writes entries in place, and locks only with
# eviction on): processes compiling side by side never read an entry half written.
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)
# XLA:CPU flags that cut compile time (measured on the tiny e2e step, CPU seconds, median of 3 fresh processes):
# no LLVM optimisation passes, 6.3 -> 4.4 s; the older elemental emitters in place of the fusion emitters, -> 3.8 s;
# the LLVM module compiled whole rather than split for parallel codegen, whose threads only add overhead when both
# cores are busy with the session's processes, -> 3.0 s. Then XLA:CPU's fast-compile preset, which leaves out passes
# that spend compile time to buy run time: that step 3.3 -> 2.6 s and the state's init 2.1 -> 1.4 s (medians of 4).
_XLA_TEST_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                   "--xla_cpu_parallel_codegen_split_count=1 --xla_cpu_opt_preset=FAST_COMPILE")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_TEST_FLAGS}".strip()


def _preload_allocator() -> None:
  """The workers and every process they start allocate through jemalloc (or tcmalloc) where the system has it.

  XLA compiling, tracing and TensorFlow's import allocate and free millions of small blocks from several threads,
  which glibc's allocator serves slowly: a fresh process's tiny run takes about 9 % less CPU with jemalloc
  preloaded, and the whole session about 6 % less (benchmarks/README.md). The library is a system package
  (`apt install libjemalloc2`; .ci/run installs it); without it the session runs as before. Set before the xdist
  workers start, which inherit it; an LD_PRELOAD of the caller's own is left alone."""
  import ctypes.util  # pylint: disable=g-import-not-at-top
  if os.environ.get("LD_PRELOAD"):
    return
  for name in ("jemalloc", "tcmalloc_minimal", "tcmalloc"):
    found = ctypes.util.find_library(name)   # a soname the dynamic loader resolves, as LD_PRELOAD takes it
    if found:
      os.environ["LD_PRELOAD"] = found
      return


_preload_allocator()

import pytest  # noqa: E402

from modassem.cli import collect_less, quick_tensorflow_import  # noqa: E402

# As the command line does: every process of the session (the workers, and the subprocesses that inherit this
# environment) imports TensorFlow without Keras, about 1.5 s less per process. The workers, which trace many models,
# run the garbage collector less often, as the command line and the tests' helper processes do.
quick_tensorflow_import()
collect_less()

from processes import env_with_devices as devices_env  # noqa: E402,F401  (for the tests)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
SCRATCH = _SCRATCH                               # a folder for the session, removed at its end
PIPELINE = os.path.join(_SCRATCH, "pipeline")   # the session pipeline's workdir: PIPELINE/meta, .../incubate, ...
# The tiny preset at one block per module, for tests whose check does not depend on the depth: its programs compile
# and trace in about half the time of the preset's two blocks per module.
SHALLOW = {"model.depth": 4, "model.depths": (1, 1, 1, 1)}
# Two modules of two blocks, for tests that need blocks to scan over or stack but not four modules.
PAIRS = {"model.depth": 4, "model.num_modules": 2, "model.depths": (2, 2)}
_SESSION_RUNS = ("pipeline_dir", "runs")


@dataclasses.dataclass
class _Job:
  argv: list
  env: dict
  module: str          # the test file that needs it
  after: str | None    # a job whose runs it reads: it starts once that one has finished
  sooner: str | None   # or once this file exists (the one run of `after` that it reads is finished)


class Jobs:
  """Subprocesses that tests will need, run one after another in a background thread from collection on.

  A test module adds its job when it is imported (`JOBS.add(...)`, during
  collection); `JOBS.result(name)` waits for it. Only the jobs of modules
  with collected tests run, the pipeline first. The xdist workers share them
  out (pytest itself runs them all where it has no workers), and each writes
  a job's outcome to the session folder, where every worker reads it.
  """

  def __init__(self):
    self._jobs: dict[str, _Job] = {}
    self._procs: list = []
    self._stopped = False
    self._waited: dict[str, float] = {}
    self._thread: threading.Thread | None = None

  def add(self, name: str, argv: list, *, module: str, env: dict | None = None, after: str | None = None,
          sooner: str | None = None) -> None:
    self._jobs[name] = _Job(list(argv), dict(env or os.environ), os.path.basename(module), after, sooner)

  def start(self, modules: set, pipeline: bool) -> None:
    order = [n for n, job in self._jobs.items() if n != "pipeline" and job.module in modules]
    # The jobs others read run too, and first (the pipeline first of all): the session's runs where a test reads them.
    needed = {self._jobs[n].after for n in order if self._jobs[n].after} | (set(_SESSION_JOBS) if pipeline else set())
    order = sorted(needed - set(order), key=lambda n: n != "pipeline") + order
    for name in set(self._jobs) - set(order):
      del self._jobs[name]
    # Each worker runs the jobs in a background thread of its own, taking the next one that is ready whenever it is
    # free (`_run`): jobs differ in length, and a fixed share per worker left one worker's jobs running long after
    # the other's.
    os.makedirs(_JOB_RESULTS, exist_ok=True)
    self._thread = threading.Thread(target=self._run, args=(order,), daemon=True)
    self._thread.start()

  def _run(self, order):
    """Runs jobs of `order` one after another until every one is taken: each time the first one whose `after` has
    finished and that no worker has claimed yet (by creating its claim file in the session folder, which one
    process alone can do). A job waits for its `after` no longer than the deadline `result` gives a job: a worker
    stopped with the job it waits on never writes its outcome, and this one then runs and fails rather than
    waits for ever."""
    pending, deadline = list(order), time.monotonic() + 1200
    done = lambda name: os.path.exists(os.path.join(_JOB_RESULTS, f"{name}.json"))
    while pending and not self._stopped:
      late = time.monotonic() > deadline
      ready = [n for n in pending if late or not self._jobs[n].after or done(self._jobs[n].after)
               or (self._jobs[n].sooner and os.path.exists(self._jobs[n].sooner))]
      if not ready:
        time.sleep(0.05)
        continue
      name = ready[0]
      pending.remove(name)
      try:
        os.close(os.open(os.path.join(_JOB_RESULTS, f"{name}.claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
      except FileExistsError:
        continue   # another worker runs it
      self._execute(name)

  def _execute(self, name):
    job, start = self._jobs[name], time.time()
    proc = subprocess.Popen(job.argv, cwd=REPO, env=job.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    self._procs.append(proc)
    stdout, stderr = proc.communicate()
    if self._stopped:
      return   # the session is over, its folder perhaps gone
    outcome = {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr, "start": start, "end": time.time()}
    part = os.path.join(_JOB_RESULTS, f"{name}.part")
    with open(part, "w") as f:
      json.dump(outcome, f)
    os.replace(part, os.path.join(_JOB_RESULTS, f"{name}.json"))   # whole, or not there yet

  def modules(self) -> set:
    """The test files that have jobs."""
    return {job.module for job in self._jobs.values()}

  def result(self, name: str, timeout: float = 1200) -> str:
    """The stdout of job `name` once it has finished; fails the test with its stderr if it failed."""
    assert name in self._jobs, name
    path, t = os.path.join(_JOB_RESULTS, f"{name}.json"), time.monotonic()
    while not os.path.exists(path) and time.monotonic() - t < timeout:
      time.sleep(0.05)
    self._waited[name] = self._waited.get(name, 0.0) + time.monotonic() - t
    assert os.path.exists(path), f"{name} did not finish in {timeout} s"
    with open(path) as f:
      job = json.load(f)
    assert job["returncode"] == 0, f"{name} failed:\n{job['stdout'][-2000:]}\n{job['stderr'][-3000:]}"
    return job["stdout"]

  def printed(self, name: str):
    """What job `name` printed last, as JSON: the jobs that report results print them as their last line."""
    return json.loads(self.result(name).strip().splitlines()[-1])

  def save_waits(self) -> None:
    if self._waited:
      with open(os.path.join(_JOB_RESULTS, f"waited-{_WORKER or 'main'}.json"), "w") as f:
        json.dump(self._waited, f)

  def finish(self) -> None:
    """Waits for this worker's job thread: a worker whose own tests are done may run a job another one still
    needs, or take one that is not yet claimed."""
    if self._thread is not None:
      self._thread.join()

  def stop(self):
    self._stopped = True
    for proc in self._procs:
      if proc.poll() is None:
        proc.kill()


def _timeline(t0: float) -> list[str]:
  """Each job's start and end (seconds into the session) and how long tests waited for it, from the session folder."""
  if not os.path.isdir(_JOB_RESULTS):
    return []
  waited, jobs = {}, []
  for name in sorted(n for n in os.listdir(_JOB_RESULTS) if n.endswith(".json")):   # not a job's `.part`
    with open(os.path.join(_JOB_RESULTS, name)) as f:
      record = json.load(f)
    if name.startswith("waited-"):
      for job, secs in record.items():
        waited[job] = waited.get(job, 0.0) + secs
    else:
      jobs.append((record["start"], name[:-len(".json")], record["end"]))
  return [f"{name}: {start - t0:.0f} s to {end - t0:.0f} s ({end - start:.0f} s), tests waited "
          f"{waited.get(name, 0.0):.0f} s" for start, name, end in sorted(jobs)]


JOBS = Jobs()
JOBS.add("pipeline", [sys.executable, "-m", "modassem", "pipeline", f"--config={TINY}", f"--workdir={PIPELINE}"],
         module=__file__)
# An incubation of module 1 alone in the session pipeline's meta run (`runs["inc_1"]`): once for the session,
# rather than once in each worker as a session fixture would train it; it starts as soon as the meta run is
# finished (its results.json, written last, is there), beside the pipeline's later phases.
INC_1 = os.path.join(_SCRATCH, "inc_1")
JOBS.add("inc-1", [sys.executable, "-m", "modassem", "train", f"--config={TINY}:incubate",
                   f"--config.meta={os.path.join(PIPELINE, 'meta')}", "--config.module=1", f"--workdir={INC_1}"],
         module=__file__, after="pipeline", sooner=os.path.join(PIPELINE, "meta", "results.json"))
_SESSION_JOBS = ("pipeline", "inc-1")   # the jobs whose runs the `runs` and `pipeline_dir` fixtures give


def _uses_runs(item) -> bool:
  return any(name in getattr(item, "fixturenames", ()) for name in _SESSION_RUNS)


# Each test file's CPU seconds in the workers, as `benchmarks/suite_cpu.py --save` last measured them.
_FILE_CPU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "file_cpu.json")
_UNMEASURED_CPU = 10.0   # a file the table does not know yet: about the median


def file_order(files: dict, cpu: dict) -> list:
  """The order in which the workers take the test files (`files`: {name: whether a test of it reads the session
  pipeline's runs}): first the files that read no runs, which the workers run while the session pipeline and the
  incubation the runs include are still running (a worker that reaches a test reading them sooner waits, a core
  idle), then the files that read runs. Each group goes costliest first, as longest-first scheduling does, so that
  the session ends on short files and both cores stay busy to the end; the files whose tests read jobs of their
  own come last, when those jobs (started in the background at collection) are done or nearly."""
  cost = lambda name: -cpu.get(name, _UNMEASURED_CPU)
  own_jobs = JOBS.modules()
  free = sorted((n for n, reads in files.items() if not reads and n not in own_jobs), key=cost)
  reading = sorted((n for n, reads in files.items() if reads and n not in own_jobs), key=cost)
  return free + reading + sorted((n for n in files if n in own_jobs), key=cost)


def pytest_collection_modifyitems(session, config, items):
  """Orders the files as `file_order` says (pytest-xdist hands them out in collection order, with
  `--no-loadscope-reorder`), and in each file runs the tests that read no runs first: the worker runs those while
  the session pipeline runs."""
  files = {}
  for item in items:
    name = os.path.basename(str(item.fspath))
    files[name] = files.get(name, False) or _uses_runs(item)
  cpu = {}
  if os.path.exists(_FILE_CPU):
    with open(_FILE_CPU) as f:
      cpu = json.load(f)
  rank = {name: i for i, name in enumerate(file_order(files, cpu))}
  items.sort(key=lambda item: (rank[os.path.basename(str(item.fspath))], _uses_runs(item)))   # stable


def pytest_collection_finish(session):
  """Starts the jobs that the tests left after deselection (`-k`, `-m`) need. Everything the test files imported
  (JAX, Flax, TensorFlow, Orbax) lives as long as the worker: frozen, the garbage collector's full collections no
  longer walk it."""
  gc.freeze()
  JOBS.start({os.path.basename(str(item.fspath)) for item in session.items},
             any(_uses_runs(item) for item in session.items))


_T0 = time.time()


def pytest_terminal_summary(terminalreporter):
  lines = _timeline(_T0)
  if lines:
    terminalreporter.write_sep("=", "background jobs")
    for line in lines:
      terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
  if _WORKER is not None and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
    JOBS.finish()
  JOBS.stop()
  JOBS.save_waits()


def pytest_unconfigure(config):
  if _WORKER is None:   # after the workers and the summary: the session folder goes
    shutil.rmtree(_SCRATCH, ignore_errors=True)


def tiny(phase: str, **overrides):
  from modassem import config as config_lib
  return config_lib.load(f"{TINY}:{phase}", overrides)


@pytest.fixture(scope="session")
def pipeline_dir():
  """`modassem pipeline` on the tiny preset: meta, incubate (module=all), assemble and e2e run directories."""
  JOBS.result("pipeline")
  return PIPELINE


@pytest.fixture(scope="session")
def runs(pipeline_dir):
  """Finished tiny runs: the pipeline's meta and incubate-all runs, and an incubate-module-1 run on that meta."""
  JOBS.result("inc-1")
  return {"meta": os.path.join(pipeline_dir, "meta"), "inc_all": os.path.join(pipeline_dir, "incubate"),
          "inc_1": INC_1}


def run_cli(*args, env=None, timeout=600):
  """`python -m modassem ARGS` in a subprocess; returns the CompletedProcess."""
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", "modassem", *args], cwd=REPO, env=full_env, capture_output=True,
                        text=True, timeout=timeout)
