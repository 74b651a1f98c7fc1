"""Digests of every file of a saved checkpoint step or exported module, written once it is whole and checked before
it is read.

Orbax and TensorStore check the structure of what they read (a file cut short, a missing manifest), not its bytes:
the zarr3 format Orbax writes checksums its shard indexes but not the chunks, so bytes overwritten in place (bit
rot, a bad disk, a torn copy) read back as wrong numbers without a word. A digest per file, over what is on disk
whatever wrote it, does not depend on Orbax's layout, on the mesh that wrote the arrays or on the one that reads
them. SHA-256 (hashlib) is the digest: cryptographic digests are what object stores and package indexes use for
the same purpose, and a per-file one names the damaged file.

A step or module written before digests existed, or by a run stopped between Orbax's commit of the step and the
write of its digests (a window of one digest pass), has no digest file and is read as before, unverified.
"""

from __future__ import annotations

import hashlib

from modassem import files
from modassem.errors import ModassemError

DIGESTS_FILE = "digests.json"
_ALGORITHM = "sha256"
_BLOCK = 1 << 22   # hashlib releases the GIL for blocks this size: a digest pass in a thread leaves the step running


def _digest(p) -> str:
  h = hashlib.new(_ALGORITHM)
  with files.path(p).open("rb") as f:
    while block := f.read(_BLOCK):
      h.update(block)
  return h.hexdigest()


def _files(folder) -> list[str]:
  """Every file under `folder` (not the digest file), relative to it, in a fixed order."""
  folder = files.path(folder)
  return sorted(rel for rel in (files.relative(p, folder) for p in files.files_under(folder)) if rel != DIGESTS_FILE)


def seal(folder) -> None:
  """Writes the digest of every file under `folder` (a committed checkpoint step, or an exported module) into it."""
  folder = files.path(folder)
  record = {"algorithm": _ALGORITHM, "files": {rel: _digest(folder / rel) for rel in _files(folder)}}
  files.write_json(folder / DIGESTS_FILE, record)


def is_sealed(folder) -> bool:
  return (files.path(folder) / DIGESTS_FILE).exists()


def damage(folder) -> str | None:
  """What is wrong with `folder` against its digests ("digest mismatch in state/d/12ab", "state/d/12ab is
  missing"), or None when every file they name is there and unchanged, or when it has none (see above)."""
  folder = files.path(folder)
  try:
    record = files.read_json(folder / DIGESTS_FILE)
  except ModassemError:
    return f"{DIGESTS_FILE} is unreadable"
  if record is None:
    return None
  listed = record.get("files")
  if record.get("algorithm") != _ALGORITHM or not isinstance(listed, dict):
    return f"{DIGESTS_FILE} is not one modassem wrote"
  for rel, want in sorted(listed.items()):
    p = folder / rel
    if not p.exists():
      return f"{rel} is missing"
    if _digest(p) != want:
      return f"digest mismatch in {rel}"
  return None
