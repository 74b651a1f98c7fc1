"""Where the test suite's time goes: JAX tracing, lowering and XLA compiling, over every process of one session.

    python benchmarks/suite_compiles.py [PYTEST ARGS ...]

Runs pytest with JAX's compile log on (`JAX_LOG_COMPILES`) in this process and every process it starts (a
`sitecustomize` on PYTHONPATH adds a handler that appends each "Finished tracing / jaxpr to MLIR / XLA compilation"
record, and each persistent cache hit, to a file), then prints the seconds per stage and the programs that took most
compile time, reads from the persistent cache counted apart (JAX logs those as compilations too). Compare the
total with pytest's CPU time (`time pytest`): the rest is imports, data, checkpoints and Python.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SITECUSTOMIZE = '''
import logging, os
class _Compiles(logging.Handler):
  def emit(self, record):
    msg = record.getMessage()
    if msg.startswith(("Finished tracing", "Finished jaxpr to MLIR", "Finished XLA compilation",
                       "Persistent compilation cache hit")):
      with open(os.environ["MODASSEM_COMPILE_LOG"], "a") as f:
        f.write(f"{os.getpid()}\\t{msg[:300]}\\n")
_handler = _Compiles(logging.DEBUG)
for _name in ("jax._src.dispatch", "jax._src.interpreters.pxla", "jax._src.compiler", "jax._src.pjit"):
  logging.getLogger(_name).addHandler(_handler)
'''
_STAGES = {"trace": r"Finished tracing (.*) in ([0-9.e-]+) sec",
           "lower": r"Finished jaxpr to MLIR module conversion (.*) in ([0-9.e-]+) sec",
           "compile": r"Finished XLA compilation of (.*) in ([0-9.e-]+) sec"}


def _bare(name: str) -> str:
  return re.sub(r"[^0-9A-Za-z]", "", name)


def summarise(log_path: str) -> str:
  """Seconds per stage, and the programs that took most XLA time. JAX logs "Finished XLA compilation" for a read from
  the persistent cache too, right after its "cache hit" line: those are counted as cache reads, not compilations."""
  seconds, per_program, count, reads, processes = (collections.Counter(), collections.Counter(), collections.Counter(),
                                                   collections.Counter(), set())
  hit = {}   # process -> the program whose cache hit it logged last
  with open(log_path) as f:
    for line in f:
      pid, msg = line.rstrip("\n").split("\t", 1)
      processes.add(pid)
      m = re.match(r"Persistent compilation cache hit for '([^']+)'", msg)
      if m:
        hit[pid] = m.group(1)
        continue
      for stage, pattern in _STAGES.items():
        m = re.match(pattern, msg)
        if not m:
          continue
        if stage == "compile":
          name = m.group(1)
          # The cache names jit(<lambda>) "jit__lambda": compared by their letters and digits.
          if _bare(hit.pop(pid, "")) == _bare(name):
            reads[name] += 1
            seconds["cache reads"] += float(m.group(2))
            continue
          per_program[name] += float(m.group(2))
          count[name] += 1
        seconds[stage] += float(m.group(2))
  lines = [f"{len(processes)} processes: tracing {seconds['trace']:.0f} s, lowering {seconds['lower']:.0f} s, "
           f"XLA compiling {seconds['compile']:.0f} s, reading {sum(reads.values())} programs from the persistent "
           f"cache {seconds['cache reads']:.0f} s", "seconds  compilations  cache reads  program"]
  lines += [f"{s:7.1f}  {count[name]:12d}  {reads[name]:11d}  {name[:70]}" for name, s in per_program.most_common(12)]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  with tempfile.TemporaryDirectory(prefix="suite-compiles-") as tmp:
    with open(os.path.join(tmp, "sitecustomize.py"), "w") as f:
      f.write(_SITECUSTOMIZE)
    log = os.path.join(tmp, "compiles.log")
    open(log, "w").close()
    path = os.pathsep.join(p for p in (tmp, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, JAX_LOG_COMPILES="1", MODASSEM_COMPILE_LOG=log)
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv], cwd=REPO, env=env)
    print(summarise(log))
  return rc


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
