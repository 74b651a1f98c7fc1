"""Damage that Orbax reads without a word: bytes overwritten in place in a saved item's data files."""

from __future__ import annotations

import itertools
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from modassem import damage


def _data_files(item):
  out = []
  for root, _, names in os.walk(item):
    if os.path.basename(root) == "d":
      out += [os.path.join(root, n) for n in names]
  return sorted(out, key=os.path.getsize, reverse=True)


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def garble(item: str, under: str = "") -> list[str]:
  """Overwrites 256 bytes (or fewer, in a small file) at a tenth, a fifth, ... of a data file of the Orbax item in folder `item` with garbage of the same
  length, in a file that Orbax itself then reads back without an error but with other values in arrays whose
  path starts with `under` (e.g. "['opt_state']"); returns the paths of the arrays that changed. (Orbax's format
  compresses chunks and checksums only its indexes: garbage is silent where it lands in a chunk's data.)"""
  before = _leaves(ocp.StandardCheckpointer().restore(item))
  for name, tenth in itertools.product(_data_files(item), range(1, 10)):
    with open(name, "rb") as f:
      original = f.read()
    at = len(original) * tenth // 10
    garbage = np.random.default_rng(at).bytes(min(256, len(original) // 20))
    with open(name, "r+b") as f:
      f.seek(at)
      f.write(garbage)
    try:
      with damage.quietly_failing():
        after = _leaves(ocp.StandardCheckpointer().restore(item))
    except Exception:  # pylint: disable=broad-except  (this garbage Orbax does see: try another place)
      after = before
    changed = [k for k in before if not np.array_equal(before[k], after[k], equal_nan=True)]
    if changed and all(k.startswith(under) for k in changed):
      return changed
    with open(name, "wb") as f:
      f.write(original)
  raise AssertionError(f"no data file of {item} holds arrays under {under!r} alone")
