"""The package's seams: no import cycles, every module importable on its own, conversion free of the trainer,
and modules of a readable length."""

import ast
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from modassem import convert

PACKAGE = os.path.join(REPO, "modassem")
MAX_LINES = 400
# The trainer and what only it needs: checkpoint conversion must work without any of it.
TRAINER = {"modassem.train", "modassem.prepare", "modassem.steps", "modassem.cost", "modassem.pipeline"}


def _modules() -> dict:
  """{dotted name: path} of every module of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].split(os.sep)
        name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        out[name] = os.path.join(root, f)
  return out


MODULES = _modules()


def _target(name: str) -> str | None:
  """The package module `name` refers to: itself, or its longest prefix that is a module (an attribute import)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(path: str, name: str) -> set:
  """The package modules `name` imports anywhere in its file, function-level imports included."""
  tree = ast.parse(open(path).read(), path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(_target(a.name) for a in node.names if a.name.startswith("modassem"))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      if not base.startswith("modassem"):
        continue
      for alias in node.names:
        # `from modassem import train` imports the module modassem.train; `from modassem.x import f`, modassem.x.
        out.add(_target(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else _target(base))
  out.discard(None)
  out.discard(name)
  return out


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _closure(start: str) -> set:
  seen, todo = set(), [start]
  while todo:
    for dep in GRAPH[todo.pop()]:
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


def test_the_import_scan_sees_the_imports():
  assert "modassem.prepare" in GRAPH["modassem.train"] and "modassem.cost" in GRAPH["modassem.train"]
  assert "modassem.train" in GRAPH["modassem.cli"]                # a function-level import
  assert "modassem.convert.arch" in GRAPH["modassem.convert.runs"]
  assert "modassem.data.augment" in GRAPH["modassem.data.dataset"] or "modassem.data.augment" in _closure(
      "modassem.data")


def test_no_import_cycles():
  cycles = sorted(f"{name} -> ... -> {name}" for name in GRAPH if name in _closure(name))
  assert not cycles, "\n".join(cycles)


def test_conversion_needs_nothing_from_the_trainer():
  for name in MODULES:
    if name == "modassem.convert" or name.startswith("modassem.convert."):
      assert not _closure(name) & TRAINER, (name, sorted(_closure(name) & TRAINER))
  assert not _closure("modassem.api") & TRAINER


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_a_readable_length(name):
  path = MODULES[name]
  with open(path) as f:
    lines = f.read().splitlines()
  if len(lines) > MAX_LINES:
    doc = ast.get_docstring(ast.parse("\n".join(lines))) or ""
    assert "Long because" in doc, (f"{path} has {len(lines)} lines: split it along its concerns, or say in its "
                                   f"docstring why it is one file ('Long because ...')")


def test_each_module_imports_on_its_own():
  """Every module imports in a fresh package (the libraries it uses stay loaded, for speed)."""
  script = (
      "import importlib, json, sys\n"
      "failed = {}\n"
      "for name in json.loads(sys.argv[1]):\n"
      "  for m in [m for m in sys.modules if m == 'modassem' or m.startswith('modassem.')]:\n"
      "    del sys.modules[m]\n"
      "  try:\n"
      "    importlib.import_module(name)\n"
      "  except Exception as e:\n"
      "    failed[name] = repr(e)\n"
      "print(json.dumps(failed))\n")
  names = sorted(n for n in MODULES if not n.endswith("__main__"))   # `python -m modassem`: importing it runs the CLI
  proc = subprocess.run([sys.executable, "-c", script, json.dumps(names)], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}


def _called(path: str) -> set:
  """The names of the functions and classes `path` calls (`f(...)` and `x.f(...)` alike)."""
  calls = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Call):
      f = node.func
      calls.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None))
  return calls


def test_cost_prices_through_the_trainers_set_up():
  """`modassem plan` makes no plan or set-up of its own: the trainer's (`prepare.abstract_setup`) stands in."""
  calls = _called(MODULES["modassem.cost"])
  assert "abstract_setup" in calls
  own = calls & {"make_plan", "plan_of", "Setup", "make_mesh", "check_config", "frozen_slots", "abstract_params",
                 "load_modules", "meta_arch", "teacher_cut", "check_teacher_cut"}
  assert not own, f"modassem/cost.py builds its own {sorted(own)}: use prepare.abstract_setup"


def test_module_names_come_from_one_function():
  """No f-string spells a module's or a teacher module's name outside modassem/names.py."""
  raw = []
  for name, path in MODULES.items():
    if name == "modassem.names":
      continue
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if not isinstance(node, ast.JoinedStr):
        continue
      # Anywhere in the f-string, not only at its start: "{what} has no module_{k}" spells a name too.
      for text, field in zip(node.values, node.values[1:]):
        if (isinstance(text, ast.Constant) and isinstance(field, ast.FormattedValue)
            and str(text.value).endswith(("module_", "teacher_"))):
          raw.append(f"{path}:{node.lineno}")
  assert not raw, f"spell names with modassem.names.module_name / teacher_name: {raw}"



def test_config_fields_are_read_without_fallbacks():
  """A live config has every field from its preset, so the code reads fields directly: a `config.get(field,
  default)` would be a second default that can disagree with the preset's (as `mixup_group` once did: 128 in the
  preset, 0 in the step). Older runs' config.json files are completed in one place, `records.ADDED_FIELDS`."""
  fallbacks = []
  for name, path in MODULES.items():
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if not isinstance(node, ast.Call):
        continue
      # config.get(field, default), and getattr(config, field, default): a default beside the preset's either way.
      if isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        holder = node.func.value
      elif isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) == 3:
        holder = node.args[0]
      else:
        continue
      if ast.unparse(holder).split(".")[0] in ("config", "c", "data", "m", "model"):
        fallbacks.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
  assert not fallbacks, f"read config fields directly (their defaults live in the presets): {fallbacks}"


def test_fields_older_runs_lack_are_live_fields_and_complete_their_configs(tmp_path):
  from conftest import tiny  # pylint: disable=g-import-not-at-top
  from modassem import records  # pylint: disable=g-import-not-at-top
  live = records._flat(records.config_record(tiny("incubate")))  # pylint: disable=protected-access
  assert set(records.ADDED_FIELDS) <= set(live)
  # A run of an older version, started before mixup_group and the m2mKD fields existed: it mixed once per batch.
  (tmp_path / "config.json").write_text(json.dumps({"phase": "incubate", "optim": {"lr": 0.004}}))
  old = records.recorded_config(tmp_path)
  assert old["mixup_group"] == 0 and old["teacher"] == "" and old["distill.alpha"] == 0.5
  assert old["optim.lr"] == 0.004 and old["phase"] == "incubate"

# Conversion's torch-free parts: they run where torch is not installed (test_convert.py needs it throughout).

def test_detection_from_depths():
  assert convert.kind_of([1, 1, 1, 1]) == ("meta", [0, 1, 2, 3])
  assert convert.kind_of([1, 1, 6, 1]) == ("incubate", [2])
  assert convert.kind_of([3, 3, 3, 3]) == ("assemble", [0, 1, 2, 3])
  assert convert.run_depths([1, 3, 1, 1]) == [3, 3, 3, 3]


def test_import_modassem_does_not_import_torch_and_the_command_line_imports_tensorflow_without_keras():
  code = ("import sys, modassem, modassem.cli, modassem.convert, modassem.api\n"
          "assert 'torch' not in sys.modules\n"
          "modassem.cli.quick_tensorflow_import()\n"
          "from modassem.data._tf import tf\n"
          "assert int(tf().data.Dataset.range(4).reduce(tf().constant(0, tf().int64), lambda a, b: a + b)) == 6\n"
          "assert 'keras' not in sys.modules and 'sklearn' not in sys.modules, 'keras imported'\n")
  env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}   # as a user's shell has it
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
