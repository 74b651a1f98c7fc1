"""One writer per run directory: a lock file with a heartbeat.

`WORKDIR/lock.json` names the run writing the directory (host, process id,
start time, last heartbeat). It is created only if it does not exist
(`files.create`: `O_CREAT | O_EXCL` on a local disk and on NFS, a write
conditional on the object's absence on Cloud Storage), atomically in both, so
of two runs started together one gets it and the other stops with a one-line
error naming the holder. The holder
refreshes its heartbeat every `HEARTBEAT_S` seconds and removes the file when
it ends. A lock left by a crashed run does not block its rerun: it is stale
when its heartbeat is older than `LEASE_S` seconds, or at once when its holder
is a process of this host that no longer exists, and is then taken over. A
multi-process run is one writer: process 0 holds the lock
for all of them.

Written by hand because neither Orbax nor etils offers a lease on a
directory; Orbax's own `.lock` guards single saves, not runs.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time

import jax

from modassem import files
from modassem.errors import ModassemError

LOCK_FILE = "lock.json"
HEARTBEAT_S = 10.0
LEASE_S = 60.0


def _record(since: float) -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "since": since, "heartbeat": time.time()}


# A lock is created, then written: one that holds no holder record (empty, cut short, not JSON, not a record) is
# being written this instant, or was left so by a run that crashed or found the disk full in between. After this
# long it is the latter, and no live run holds it.
GARBLED_S = 2.0
_GARBLED = {"host": None, "pid": None, "garbled": True}


def _read(path) -> dict | None:
  """The holder the lock names; None when it is gone (or cannot be read this instant); `_GARBLED` when it names
  none."""
  try:
    text = files.read_text(path)
  except UnicodeDecodeError:
    return _GARBLED
  except OSError:
    return None   # gone, or being rewritten: read again
  if text is None:
    return None
  try:
    holder = json.loads(text)
  except ValueError:
    return _GARBLED
  if not (isinstance(holder, dict) and {"host", "pid", "heartbeat"} <= set(holder)):
    return _GARBLED
  return holder


def _ours(holder: dict | None) -> bool:
  return holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _alive(holder: dict) -> bool:
  """Whether the holder still writes: its heartbeat is fresh, and on this host its process exists too.

  The heartbeat decides on this host as well: a process id is no identity across restarts (a container restarted
  after SIGKILL runs as PID 1 again, and ids are reused), so a live process under the holder's id whose heartbeat
  has stopped is another process, and the lock is stale."""
  fresh = time.time() - float(holder.get("heartbeat", 0.0)) < LEASE_S
  if fresh and holder.get("host") == socket.gethostname():
    try:
      os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
      return False   # gone (as after kill -9): no need to wait out the lease
    except (PermissionError, ValueError, OverflowError):
      pass   # a process of another user: it exists
  return fresh


def _describe(holder: dict) -> str:
  if holder is _GARBLED:
    return "its lock file named no holder"
  since = datetime.datetime.fromtimestamp(float(holder.get("since", 0.0))).strftime("%Y-%m-%d %H:%M:%S")
  age = time.time() - float(holder.get("heartbeat", 0.0))
  return (f"pid {holder.get('pid')} on {holder.get('host')}, since {since}, last heartbeat {age:.0f} s ago")


class _Lock:
  """The lock of one run directory, held by this process."""

  def __init__(self, workdir):
    self.workdir = workdir
    self.path = files.path(workdir) / LOCK_FILE
    self._since = time.time()
    self._stop = threading.Event()
    self._thread = None

  def acquire(self) -> dict | None:
    """Takes the lock; returns the stale holder it took over, if any."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    stale, garbled_since = None, None
    for _ in range(100):
      if not files.create(self.path, json.dumps(_record(self._since))):
        holder = _read(self.path)
        if holder is _GARBLED:
          garbled_since = garbled_since or time.monotonic()
          if time.monotonic() - garbled_since < GARBLED_S:
            holder = None   # perhaps being written now: read again
        if holder is None:
          time.sleep(0.1)
          continue
        if holder is not _GARBLED and _alive(holder):
          raise ModassemError(f"{self.workdir} is being written by another run ({_describe(holder)}): "
                              f"wait for it to end, or stop it; a crashed run's lock ({self.path}) is taken over "
                              f"{LEASE_S:.0f} s after its last heartbeat, or as soon as its process is gone") from None
        # Stale. Two runs taking over the same stale lock at once is a race this does not close; then the
        # second one's exclusive create fails and it reads the first as the holder.
        stale = holder
        files.remove(self.path)
        continue
      self._thread = threading.Thread(target=self._beat, daemon=True)
      self._thread.start()
      return stale
    raise ModassemError(f"could not take the lock {self.path}: another run keeps taking it; check who writes "
                        f"{self.workdir}")

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      if not _ours(_read(self.path)):
        return   # taken over (this run was presumed dead): leave the new holder alone
      try:
        files.write_text(self.path, json.dumps(_record(self._since)))
      except OSError:
        pass   # a full disk, say: the run meets it too and stops with its own message; the next beat tries again

  def release(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if _ours(_read(self.path)):
      files.remove(self.path)


@contextlib.contextmanager
def writer(workdir, say=print):
  """Holds `workdir`'s lock for the block (process 0 for a multi-process run; every process fails together)."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = _Lock(workdir)
    try:
      stale = lock.acquire()
      if stale is not None:
        say(f"{workdir}: took over the lock of a run that is gone ({_describe(stale)})")
    except ModassemError as e:
      lock, error = None, e
  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
      error = error or ModassemError(f"{workdir} is being written by another run (see process 0)")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
