"""Where the test suite's CPU time goes: per test, and per process the session starts.

    python benchmarks/suite_cpu.py [--top=N] [--save] [PYTEST ARGS ...]

On 2 cores the suite's wall time is about half its CPU time once both cores are busy to the end (pytest prints the
background jobs' timeline, which shows whether they are), so CPU seconds are what a change to the suite must cut.
This runs pytest with two additions on PYTHONPATH (and in every process it starts, which inherit it):
- a `sitecustomize` that appends each Python process's own CPU time (user + system), wall time and command line to
  a file when it exits (processes killed with SIGKILL write nothing);
- a pytest plugin that records each test's CPU time in its worker (setup, call and teardown; the subprocesses a
  test starts are counted as processes, not here).
Then it prints the CPU seconds per test file, the costliest tests, and the costliest processes other than pytest's
own workers. The sums are taken under the session's own load, in the measuring process: unlike wall times, they do
not grow with what runs beside them.

`--save` writes the CPU seconds of each test file to tests/file_cpu.json, which the test session reads to hand the
costliest files out first (tests/conftest.py): run it over the whole suite after a change that moves a file's cost
much.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SITECUSTOMIZE = '''
import atexit, json, os, sys, time
_start = time.time()
def _record():
  t = os.times()
  with open(os.environ["MODASSEM_CPU_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[:6], "cpu": t.user + t.system, "wall": time.time() - _start}) + "\\n")
atexit.register(_record)
'''

_PLUGIN = '''
import json, os, time
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  t, start = os.times(), time.time()
  yield
  u = os.times()
  with open(os.environ["MODASSEM_TEST_CPU_LOG"], "a") as f:
    f.write(json.dumps({"test": item.nodeid, "cpu": u.user + u.system - t.user - t.system, "start": start,
                        "end": time.time(), "worker": os.environ.get("PYTEST_XDIST_WORKER", "")}) + "\\n")
'''


def _read(path: str) -> list:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str]) -> int:
  top, save = 25, False
  while argv and (argv[0] == "--save" or argv[0].startswith("--top=")):
    if argv[0] == "--save":
      save = True
    else:
      top = int(argv[0].split("=", 1)[1])
    argv = argv[1:]
  with tempfile.TemporaryDirectory(prefix="suite-cpu-") as tmp:
    with open(os.path.join(tmp, "sitecustomize.py"), "w") as f:
      f.write(_SITECUSTOMIZE)
    with open(os.path.join(tmp, "suite_cpu_plugin.py"), "w") as f:
      f.write(_PLUGIN)
    procs, tests = os.path.join(tmp, "procs.jsonl"), os.path.join(tmp, "tests.jsonl")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")])),
               MODASSEM_CPU_LOG=procs, MODASSEM_TEST_CPU_LOG=tests)
    start = time.time()
    rc = subprocess.run([sys.executable, "-m", "pytest", "-p", "suite_cpu_plugin", *argv], cwd=REPO, env=env).returncode
    wall = time.time() - start
    procs, tests = _read(procs), _read(tests)
  # pytest-xdist starts its workers as `python -c ...` with no other argument; pytest itself runs as a module.
  workers = [p for p in procs if p["argv"] == ["-c"] or p["argv"][0].endswith(os.path.join("pytest", "__main__.py"))]
  others = [p for p in procs if p not in workers]
  total = sum(p["cpu"] for p in procs)
  print(f"\nwall {wall:.0f} s; CPU {total:.0f} s in {len(procs)} processes: pytest and its workers "
        f"{sum(p['cpu'] for p in workers):.0f} s (tests {sum(t['cpu'] for t in tests):.0f} s), the processes they "
        f"started {sum(p['cpu'] for p in others):.0f} s")
  by_file = collections.Counter()
  for t in tests:
    by_file[t["test"].split("::")[0]] += t["cpu"]
  print("\nCPU s per test file (in the workers):")
  for name, cpu in by_file.most_common():
    print(f"  {cpu:7.1f}  {name}")
  if save and rc == 0:
    with open(os.path.join(REPO, "tests", "file_cpu.json"), "w") as f:
      json.dump({os.path.basename(name): round(cpu, 1) for name, cpu in sorted(by_file.items())}, f, indent=0)
      f.write("\n")
  print(f"\nthe {top} costliest tests:")
  for t in sorted(tests, key=lambda t: -t["cpu"])[:top]:
    print(f"  {t['cpu']:7.1f}  {t['test']}")
  if tests:
    # Each worker's test files in the order it ran them, with when they started and ended (s from the session's
    # start): the end of the session is where a core may idle while the other finishes a long file.
    print("\neach worker's test files: start-end s, CPU s")
    for worker in sorted({t["worker"] for t in tests}):
      files = collections.OrderedDict()
      for t in sorted((t for t in tests if t["worker"] == worker), key=lambda t: t["start"]):
        f = files.setdefault(t["test"].split("::")[0], [t["start"], t["end"], 0.0])
        f[1], f[2] = t["end"], f[2] + t["cpu"]
      for name, (a, b, cpu) in files.items():
        print(f"  {worker or '-'} {a - start:6.0f}-{b - start:4.0f}  {cpu:6.1f}  {name}")
  print(f"\nthe {top} costliest processes the tests and jobs started (wall s under the session's load):")
  for p in sorted(others, key=lambda p: -p["cpu"])[:top]:
    print(f"  {p['cpu']:7.1f}  {p['wall']:7.1f}  {' '.join(a[-60:] for a in p['argv'])[:160]}")
  return rc


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
