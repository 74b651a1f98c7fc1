"""Where the test suite's CPU time goes inside JAX: tracing, lowering, XLA compiling and garbage collection, over every
process of one session.

    python benchmarks/suite_compiles.py [PYTEST ARGS ...]

Runs pytest with a `sitecustomize` on PYTHONPATH (so in this process and every process it starts, which inherit
it) that listens to JAX's own timers (`jax.monitoring`) once JAX is imported, and times Python's garbage collections
(`gc.callbacks`). Each process writes a record of its own every few seconds and when it exits:
- its CPU time (user + system);
- per program, the CPU seconds of XLA's compilations (the process's CPU time across each compile event: XLA compiles
  on threads of its own, so the calling thread's time would read zero) and the reads from the persistent cache,
  counted apart;
- the wall seconds of tracing and lowering (these run in the calling thread; on a loaded machine they overstate CPU);
- the CPU seconds spent in garbage collections.
Then it prints the totals and the programs that took most compile time. The rest of the CPU time is imports, data,
checkpoints, execution and the tests' own Python (`benchmarks/suite_cpu.py` splits it per test and per process).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Importing JAX here would read its configuration before the test session sets it, so the listeners are registered
# by an import hook when `jax._src.monitoring` is first imported.
_SITECUSTOMIZE = '''
import atexit, collections, gc, importlib.machinery, json, os, sys, threading, time
_COMPILE, _READ = "/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec"
_WALL = {"/jax/core/compile/jaxpr_trace_duration": "trace", "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower"}
_programs = collections.defaultdict(lambda: [0, 0.0, 0])   # name -> [compilations, CPU s, cache reads]
_wall = collections.Counter()
_gc = [0.0, 0.0]
_local = threading.local()

def _scalar(event, value, **kw):
  if event == _COMPILE:
    _local.start, _local.read = time.process_time(), False

def _duration(event, seconds, **kw):
  if event == _READ:
    _local.read = True
  elif event in _WALL:
    _wall[_WALL[event]] += seconds
  elif event == _COMPILE:
    p = _programs[str(kw.get("fun_name"))]
    if getattr(_local, "read", False):
      p[2] += 1
    else:
      p[0] += 1
      p[1] += time.process_time() - getattr(_local, "start", time.process_time())

class _Hook:
  def find_spec(self, name, path=None, target=None):
    if name != "jax._src.monitoring":
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    run = spec.loader.exec_module
    def exec_module(module):
      run(module)
      module.register_event_duration_secs_listener(_duration)
      module.register_scalar_listener(_scalar)
    spec.loader.exec_module = exec_module
    return spec

def _collected(phase, info):
  if phase == "start":
    _gc[1] = time.process_time()
  else:
    _gc[0] += time.process_time() - _gc[1]

sys.meta_path.insert(0, _Hook())
gc.callbacks.append(_collected)

_writing = threading.Lock()   # the exit handler and the thread below write the same file

@atexit.register
def _record():
  with _writing:
    t = os.times()
    path = os.path.join(os.environ["MODASSEM_JAX_CPU_DIR"], f"{os.getpid()}.json")
    with open(path + ".part", "w") as f:
      json.dump({"argv": sys.argv[:3], "cpu": t.user + t.system, "gc": _gc[0], "wall": dict(_wall),
                 "programs": {k: list(v) for k, v in list(_programs.items())}}, f)
    os.replace(path + ".part", path)

def _every_few_seconds():   # pytest-xdist may end a worker with os._exit, which runs no exit handler
  while True:
    time.sleep(5)
    _record()

threading.Thread(target=_every_few_seconds, daemon=True).start()
'''


def summarise(records: list[dict], top: int = 12) -> str:
  """Totals over the processes, and the `top` programs by compile CPU seconds."""
  programs = collections.defaultdict(lambda: [0, 0.0, 0])
  wall = collections.Counter()
  for r in records:
    wall.update(r["wall"])
    for name, (n, cpu, reads) in r["programs"].items():
      p = programs[name]
      p[0], p[1], p[2] = p[0] + n, p[1] + cpu, p[2] + reads
  cpu = sum(r["cpu"] for r in records)
  compiled = sum(p[1] for p in programs.values())
  lines = [f"{len(records)} processes, {cpu:.0f} CPU s: XLA compiling {compiled:.0f} CPU s "
           f"({sum(p[0] for p in programs.values())} compilations, {sum(p[2] for p in programs.values())} more read "
           f"from the persistent cache), garbage collection {sum(r['gc'] for r in records):.0f} CPU s; tracing "
           f"{wall['trace']:.0f} s and lowering {wall['lower']:.0f} s of wall time",
           "compile CPU s  compilations  cache reads  program"]
  for name, (n, s, reads) in sorted(programs.items(), key=lambda kv: -kv[1][1])[:top]:
    lines.append(f"{s:13.1f}  {n:12d}  {reads:11d}  {name[:70]}")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  with tempfile.TemporaryDirectory(prefix="suite-compiles-") as tmp:
    with open(os.path.join(tmp, "sitecustomize.py"), "w") as f:
      f.write(_SITECUSTOMIZE)
    records_dir = os.path.join(tmp, "processes")   # one record per process, rewritten as it goes
    os.makedirs(records_dir)
    path = os.pathsep.join(p for p in (tmp, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, MODASSEM_JAX_CPU_DIR=records_dir)
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv], cwd=REPO, env=env)
    records = []
    for name in sorted(os.listdir(records_dir)):
      if name.endswith(".json"):
        with open(os.path.join(records_dir, name)) as f:
          records.append(json.load(f))
    print(summarise(records))
  return rc


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
