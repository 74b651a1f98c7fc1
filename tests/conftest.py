"""Shared fixtures: small real runs of every phase on the built-in data, made once per test session."""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def tiny(phase: str, **overrides):
  from modassem import config as config_lib
  return config_lib.load(f"{TINY}:{phase}", overrides)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
  """A finished tiny meta run, an incubate-all run and an incubate-module-1 run on it."""
  from modassem import train
  root = tmp_path_factory.mktemp("runs")
  dirs = {name: str(root / name) for name in ("meta", "inc_all", "inc_1")}
  train.train(tiny("meta"), dirs["meta"])
  train.train(tiny("incubate", meta=dirs["meta"], module="all"), dirs["inc_all"])
  train.train(tiny("incubate", meta=dirs["meta"], module="1"), dirs["inc_1"])
  return dirs


def run_cli(*args, env=None, timeout=600):
  """`python -m modassem ARGS` in a subprocess; returns the CompletedProcess."""
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", "modassem", *args], cwd=REPO, env=full_env, capture_output=True,
                        text=True, timeout=timeout)
