"""The README's commands, as written: every `modassem` line of its quick start and hand-run example parses (flags,
config file, phase, fields), and each run a command reads is one an earlier line of the same example writes."""

import os
import re
import shlex

from conftest import REPO
from modassem import config as config_lib
from modassem import flags

with open(os.path.join(REPO, "README.md")) as f:
  README = f.read()


def block_after(heading: str) -> str:
  """The first ```bash block after `heading`."""
  rest = README[README.index(heading):]
  return re.search(r"```bash\n(.*?)```", rest, re.S).group(1)


def commands(block: str) -> list[list[str]]:
  """The block's `modassem` command lines, with `for k in ...; do ... done` loops unrolled."""
  out, lines = [], iter(block.splitlines())
  for line in lines:
    loop = re.match(r"for (\w+) in ([\w ]+); do", line.strip())
    if loop:
      body = []
      for inner in lines:
        if inner.strip() == "done":
          break
        body.append(inner)
      for value in loop.group(2).split():
        out += [shlex.split(b.replace(f"${loop.group(1)}", value)) for b in body]
    elif line.strip():
      words = shlex.split(line.split("&&")[-1])
      if words and words[0] == "modassem":
        out.append(words)
  return out


def parsed(argv: list[str]):
  verb, rest = argv[1], argv[2:]
  fv = flags.run_flags(rest, phased=verb != "pipeline")
  spec, overrides = flags.config_spec(fv)
  config = config_lib.load(spec, overrides) if verb != "pipeline" else None
  return verb, fv.workdir, config


def test_the_quick_start_runs_as_written(monkeypatch):
  monkeypatch.chdir(REPO)
  (cmd,) = commands(block_after("## Quick start"))
  verb, workdir, _ = parsed(cmd)
  assert (verb, workdir) == ("pipeline", "runs/demo")
  assert "pip install -e '.[test]' && pytest" in README
  with open(os.path.join(REPO, ".ci", "run")) as f:
    assert "pip install -e '.[test]' && pytest" in f.read()


def test_the_hand_run_example_runs_as_written(monkeypatch):
  monkeypatch.chdir(REPO)
  written = {}   # workdir -> (phase, module)
  reported = False
  for cmd in commands(block_after("## Running the phases yourself")):
    if cmd[1] == "report":
      assert all(run in written for run in cmd[2:]), cmd
      assert {written[r][0] for r in cmd[2:]} == {"assemble", "e2e"}
      reported = True
      continue
    verb, workdir, config = parsed(cmd)
    if verb == "eval":
      assert written[workdir][0] == config.phase, cmd
      continue
    assert verb == "train" and workdir not in written, cmd
    if config.phase == "incubate":
      assert written[config.meta] == ("meta", "all"), cmd
    if config.phase == "assemble":
      sources = config.modules.split(",")
      assert len(sources) == config.model.num_modules
      for k, source in enumerate(sources):
        assert written[source][0] == "incubate" and written[source][1] in (str(k), "all"), (k, source)
    written[workdir] = (config.phase, str(config.module))
  assert reported
  assert sorted(p for p, _ in written.values()) == ["assemble", "e2e", "incubate", "incubate", "incubate",
                                                    "incubate", "meta"]
