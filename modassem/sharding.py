"""Device mesh and parameter placement.

One mesh axis, "data". The batch is split over it; parameters (and the AdamW
moments that mirror them) are either replicated (`data`) or split along their
largest divisible dimension (`fsdp`), and XLA inserts the gathers. Nothing in
the model or the step knows which: they are jitted against these shardings.
The experts of an MoE MLP are the exception, in both modes: where the devices
divide them evenly, each device holds its share of them (split along the
expert axis, as V-MoE does) and the model sends tokens to them
(moe.experts_apply_sharded).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from modassem.errors import ModassemError
from modassem.models.moe import EXPERT_AXIS, EXPERT_PARAMS, expert_shards
from modassem.models.vit import is_stacked

AXIS = "data"
MODES = ("data", "fsdp")
assert EXPERT_AXIS == AXIS, "the model's expert all-to-all runs over the mesh's one axis"


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, n: int, stacked: bool = False) -> P:
  # Largest dimension that splits evenly; small or indivisible arrays
  # (biases of odd width, scalars) stay replicated: they are cheap. The block
  # axis of scanned parameters is never split: each scan iteration slices one
  # block, and a slice of a split axis would gather the whole stack.
  dims = sorted(range(1 if stacked else 0, len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % n == 0 and shape[d] >= n:
      spec = [None] * len(shape)
      spec[d] = AXIS
      return P(*spec)
  return P()


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ModassemError(f"config.sharding={mode!r} is unknown: use one of {', '.join(MODES)}")


def _expert_spec(path, shape, n: int, stacked: bool) -> P | None:
  """The split of an MoE expert parameter along its expert axis (after the block axis where stacked), or None for
  any other leaf, and where the devices do not divide the experts evenly (the model then keeps them whole)."""
  name = getattr(path[-1], "key", None) if path else None
  axis = 1 if stacked else 0
  if name not in EXPERT_PARAMS or len(shape) <= axis or expert_shards(shape[axis], n) == 1:
    return None
  spec = [None] * len(shape)
  spec[axis] = EXPERT_AXIS
  return P(*spec)


def tree_shardings(tree, mesh: Mesh, mode: str):
  """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs)."""
  check_mode(mode)
  n = mesh.shape[AXIS]

  def one(path, x):
    shape, stacked = np.shape(x), is_stacked(path)
    spec = _expert_spec(path, shape, n, stacked)
    if spec is None:
      spec = P() if mode == "data" or n == 1 else _fsdp_spec(shape, n, stacked)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, tree)
