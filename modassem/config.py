"""Loading `configs/<preset>.py:<phase>` files, the same way the CLI does."""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections

from modassem.errors import ModassemError


def split_spec(spec: str) -> tuple[str, str | None]:
  path, _, arg = spec.partition(":")
  return path, (arg or None)


def add_config_dir(path: str) -> None:
  """Preset files `import common` from their own folder."""
  folder = os.path.dirname(os.path.abspath(path))
  if folder not in sys.path:
    sys.path.insert(0, folder)


def load(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """`load("configs/demo.py:meta", {"batch_size": 64})`: the config with flattened overrides applied.

  Whatever goes wrong in the file (it is missing, does not parse, imports what is not there, or its `get_config`
  raises) is the user's to fix, so it becomes one ModassemError naming the file and the cause.
  """
  path, arg = split_spec(spec)
  if not path:
    raise ModassemError("--config is empty: pass a config file, e.g. --config=configs/demo.py:meta")
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    raise ModassemError(f"config file {path!r} {what}: pass a Python file with get_config(), e.g. "
                        "--config=configs/demo.py:meta")
  if not path.endswith(".py"):
    raise ModassemError(f"config file {path!r} is not a Python file: pass a .py file with get_config(), e.g. "
                        "--config=configs/demo.py:meta")
  add_config_dir(path)
  module_spec = importlib.util.spec_from_file_location(f"modassem_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise ModassemError(f"config file {path!r} failed to load: {_cause(e)}: fix the file") from None
  if not callable(getattr(module, "get_config", None)):
    raise ModassemError(f"config file {path!r} has no get_config(): define one that returns an "
                        "ml_collections.ConfigDict (see configs/demo.py)")
  try:
    config = module.get_config(arg) if arg is not None else module.get_config()
  except (ValueError, ModassemError) as e:
    # A config's own refusal (an unknown phase, say) already says what to do.
    raise ModassemError(f"config {spec!r}: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    raise ModassemError(f"config {spec!r}: get_config({'' if arg is None else repr(arg)}) failed: {_cause(e)}: "
                        "fix the file or the argument after ':'") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ModassemError(f"config {spec!r}: get_config() returned a {type(config).__name__}, not an "
                        "ml_collections.ConfigDict")
  if overrides:
    apply_overrides(config, overrides)
  return config


def _cause(e: BaseException) -> str:
  """`SyntaxError: invalid syntax (line 3)`: an exception as one short clause."""
  if isinstance(e, SyntaxError):
    return f"SyntaxError: {e.msg} (line {e.lineno})"
  return f"{type(e).__name__}: {e}"


def phase_overrides(overrides: dict, phase: str) -> dict:
  """The overrides of a several-phase command (pipeline, plan) that apply to `phase`: not `phase` itself, and a
  teacher (m2mKD) and its loss's settings for the incubation alone."""
  return {k: v for k, v in overrides.items()
          if k != "phase" and (phase == "incubate" or not (k == "teacher" or k.startswith("distill.")))}


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Sets existing fields only: a locked ConfigDict refuses new keys, so a typo is an error, not a new field."""
  config.lock()
  for field, value in overrides.items():
    try:
      config.update_from_flattened_dict({field: value})
    except (KeyError, AttributeError):
      raise ModassemError(f"unknown config field {field!r}: see the preset file and configs/common.py for the fields") from None
  config.unlock()
