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
  """`load("configs/demo.py:meta", {"batch_size": 64})`: the config with flattened overrides applied."""
  path, arg = split_spec(spec)
  if not os.path.isfile(path):
    raise ModassemError(f"config file {path!r} does not exist: pass e.g. --config=configs/demo.py:meta")
  add_config_dir(path)
  module_spec = importlib.util.spec_from_file_location(f"modassem_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg is not None else module.get_config()
  if overrides:
    apply_overrides(config, overrides)
  return config


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
