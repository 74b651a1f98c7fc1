"""Train steps lowered once per process: runs that differ only in what their step never reads share one.

A run's train step is a pure function of its config's model, plan and recipe, of the mesh, and of its arguments'
shapes and shardings; how long the run is, its learning rates, its seed, where it reads and writes and how it logs
are arguments of the step or outside it. Runs in one process (a notebook's, a resume after an error, a pipeline's
e2e priced before it trains) that differ in those alone trace and lower their step once, and compile it once (a
lowered step keeps its executable). JAX's persistent compilation cache spares the compilation only: it finds a
program by its lowered text, so without this every run traces and lowers its step again (1.3 s of CPU for the
tiny preset's steps).
"""

from __future__ import annotations

import collections
import json

import jax
import jax.numpy as jnp

# The fields of a config (a name, or every field under it) that its train step never reads. The schedule's numbers,
# the key and the frozen modules are arguments of the step, not constants in it. (tests/test_model.py checks that
# changing every one of them leaves the lowered program as it was.)
RUN_ONLY = frozenset({"seed", "total_steps", "warmup_steps", "epochs", "warmup_epochs", "optim.lr", "optim.warmup_lr",
                      "optim.min_lr", "optim.lr_base_batch", "meta", "modules", "teacher", "allow_mixed_meta", "data",
                      "eval_batch_size", "eval_every_steps", "log_every_steps", "checkpoint_every_steps",
                      "keep_checkpoints", "progress"})
# A few at most: a large model's lowered step holds its whole program.
_KEPT = 8
_LOWERED: collections.OrderedDict = collections.OrderedDict()


def _without(fields: dict, names, prefix: str = "") -> dict:
  return {k: _without(v, names, f"{prefix}{k}.") if isinstance(v, dict) else v
          for k, v in fields.items() if prefix + k not in names}


def program_key(config, plan, mesh, args):
  """What the lowered step depends on, as a hashable value: every config field but the run-only ones, the plan, the
  mesh and the arguments' shapes, dtypes and shardings; None where something cannot be hashed."""
  leaves, tree = jax.tree_util.tree_flatten(args)
  try:
    key = (json.dumps(_without(config.to_dict(), RUN_ONLY), sort_keys=True, default=repr), plan, mesh, tree,
           tuple((jnp.shape(x), str(jnp.result_type(x)), getattr(x, "sharding", None)) for x in leaves))
    hash(key)
  except (TypeError, AttributeError):
    return None
  return key


def lowered(jitted, args, key):
  """(`jitted` lowered on `args`, its jaxpr): the ones lowered before under `key` where there are (None: lowered
  afresh)."""
  if key is not None and key in _LOWERED:
    _LOWERED.move_to_end(key)
    return _LOWERED[key]
  traced = jitted.trace(*args)
  found = (traced.lower(), traced.jaxpr)
  if key is not None:
    _LOWERED[key] = found
    while len(_LOWERED) > _KEPT:
      _LOWERED.popitem(last=False)
  return found


def forget() -> None:
  """Drops every step kept (tests compare fresh lowerings)."""
  _LOWERED.clear()
