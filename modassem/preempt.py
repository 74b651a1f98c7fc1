"""Stopping cleanly: preemption (SIGTERM) and Ctrl-C (SIGINT) become "save at a step every process agrees on, then
exit with `EXIT_PREEMPTED`".

A TPU VM maintenance event, a preemptible GPU node or a cluster scheduler
sends SIGTERM some time before the machine goes. A run that then saves a
checkpoint at the step it has reached loses nothing, and the same command
resumes it. Ctrl-C is treated the same way, so it never lands in the middle of
an asynchronous checkpoint save (a `KeyboardInterrupt` raised there is caught
by the saving thread's machinery, or leaves a save half done); a second Ctrl-C
stops at once.

With one process, the signal handlers below set a flag that the training loop
reads after every step. With several, the processes must stop at the same step,
or their checkpoint would mix steps: JAX's distributed runtime already listens
for SIGTERM on every process, tells the others, and agrees on a step
(`multihost_utils.reached_preemption_sync_point`, called after every step);
SIGINT is turned into SIGTERM to this process so it takes the same path.
Where that service is turned off (`jax_enable_preemption_service`), a
multi-process run leaves signals as they are: processes stopping at steps of
their own would save a checkpoint of mixed steps.
"""

from __future__ import annotations

import contextlib
import os
import signal

# The exit status of a run stopped by SIGTERM or SIGINT after saving its checkpoint: EX_TEMPFAIL of sysexits.h
# ("a temporary failure; the same command may succeed later"). The launch scripts rerun a phase that exits with it.
EXIT_PREEMPTED = 75
# A second Ctrl-C stops at once, without a checkpoint: 128 + SIGINT, as shells report a command an interrupt ended.
# The launch scripts do not rerun it (the user asked to stop).
EXIT_INTERRUPTED = 128 + signal.SIGINT


class Preempted(Exception):
  """A run stopped by a signal after saving a checkpoint at `step`; the same command resumes it."""

  def __init__(self, signame: str, step: int, total: int, where: str):
    self.signame, self.step, self.total, self.where = signame, step, total, where
    super().__init__(f"stopped by {signame} at step {step}/{total}, checkpoint saved in {where}: rerun the same "
                     f"command to resume")


def _sync_manager():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  (no public accessor)
  state = distributed.global_state
  return state.preemption_sync_manager if state.client is not None else None


def _several_processes() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count() > 1


class Stop:
  """Whether the loop should stop after the step it just ran; `signame` says why."""

  def __init__(self):
    self.signame = None
    self.synced = _sync_manager() is not None

  def requested(self, step: int) -> bool:
    """Called after every step, by every process, with the same steps (the sync point counts calls)."""
    if self.synced:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.signame = self.signame or "SIGTERM"
        return True
      return False
    return self.signame is not None

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    first = self.signame is None
    self.signame = self.signame or signal.Signals(signum).name
    if signum == signal.SIGINT:
      if not first:
        raise KeyboardInterrupt   # a second Ctrl-C: stop now, without the checkpoint
      print("stopping after this step to save a checkpoint (Ctrl-C again to stop at once)", flush=True)
      if self.synced:
        # The distributed runtime's preemption notifier listens for SIGTERM: let it tell the other processes.
        os.kill(os.getpid(), signal.SIGTERM)


_active: Stop | None = None


@contextlib.contextmanager
def handling():
  """A `Stop` whose flag SIGTERM and SIGINT set while the block runs (the previous handlers come back after).

  Nested blocks share the outermost one's: a signal that arrives between two
  phases of a pipeline stops the next phase, not nothing.
  """
  global _active
  if _active is not None:
    yield _active
    return
  stop = _active = Stop()
  names = [signal.SIGINT] + ([] if stop.synced else [signal.SIGTERM])
  if not stop.synced and _several_processes():
    # Several processes but no preemption service (`jax_enable_preemption_service` off): they could not agree on
    # a step, and a checkpoint of mixed steps is worse than none. Signals keep their usual effect.
    names = []
  try:
    previous = {s: signal.signal(s, stop._on_signal) for s in names}  # pylint: disable=protected-access
  except ValueError:   # not the main thread (an embedding application): signals stay as they are
    previous = {}
  try:
    yield stop
  finally:
    _active = None
    for s, h in previous.items():
      signal.signal(s, h)
