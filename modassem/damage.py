"""Items of a run directory found damaged: how they are read without Orbax's noise, how the processes of a job agree
that one is damaged, and how it is moved aside (to WORKDIR/damaged/, never deleted)."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys

import jax

from modassem import digests, files


@contextlib.contextmanager
def quietly_failing():
  """Reading a damaged item: Orbax's pending reads fail one by one as garbage-collected coroutines and tasks, each
  printing a traceback of its own (hundreds for one cut-short file). The caller reports the damage in one line."""
  hook, asyncio_log = sys.unraisablehook, logging.getLogger("asyncio")
  level = asyncio_log.level
  sys.unraisablehook = lambda unraisable: None
  asyncio_log.setLevel(logging.CRITICAL)
  try:
    yield
  except BaseException:
    gc.collect()   # the failed reads' coroutines go now, while their tracebacks are silenced (a read that
    raise          # succeeds leaves none, and a full collection costs a tenth of a second with TensorFlow loaded)
  finally:
    sys.unraisablehook = hook
    asyncio_log.setLevel(level)


def digest_damage(folder) -> str | None:
  """What `folder`'s digests find wrong with it, read by process 0 alone (the callers agree on the answer)."""
  return digests.damage(folder) if jax.process_index() == 0 else None


def all_processes_agree(ok: bool) -> bool:
  """Whether `ok` holds on every process (each reads its own shards, so one may find damage the others do not)."""
  if jax.process_count() == 1:
    return ok
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def move_aside(workdir, path) -> files.Path:
  """Moves `path` (inside `workdir`) to `workdir/damaged/...`, never over anything; returns where it went."""
  rel = files.relative(path, workdir)
  dest, n = files.path(workdir) / "damaged" / rel, 1
  while dest.exists():
    n += 1
    dest = files.path(workdir) / "damaged" / f"{rel}.{n}"
  dest.parent.mkdir(parents=True, exist_ok=True)
  files.path(path).rename(dest)
  return dest


def move_aside_together(workdir, paths: list) -> list:
  """Process 0 moves `paths` aside (`move_aside`) while the others wait for it; where they went (on process 0; no
  other process moves anything, so elsewhere the list is empty)."""
  moved = [move_aside(workdir, p) for p in paths] if jax.process_index() == 0 else []
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("modassem: damaged items moved aside")
  return moved
