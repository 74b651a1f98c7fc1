"""A write that finds the disk full ends a run in one line: the path, the space free and needed, and the checkpoint a
rerun resumes from. The write may be anywhere in the run (a checkpoint in Orbax's thread, TensorBoard, the metrics,
the lock), and is reported in many exception types: `files.no_space_left` recognises it in any of them."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading

import jax

from modassem import checkpoints, digests, files
from modassem.errors import ModassemError


@contextlib.contextmanager
def one_line(workdir: str, abstract_state):
  """A write that finds the disk full, wherever in the run (a checkpoint in Orbax's thread, TensorBoard, the
  metrics, the lock), ends the run with one line: the path, what is free and what one checkpoint needs, and the
  checkpoint a rerun resumes from (the newest one saved; where its digest pass had not run yet, the newest one sealed
  is named as well: a rerun falls back on it if the newer one turns out cut short). Orbax's own log of the
  failed write (a traceback from its thread per file it was writing) is left out: that line says it.
  `abstract_state()` gives the train state's ShapeDtypeStructs (what a first checkpoint needs), called only then."""
  hushed = _Hushed()
  full = False
  try:
    yield
  except BaseException as e:
    where = files.no_space_left(e)
    if where is None:
      raise
    full = True
    gc.collect()   # the failed writes' tasks go now, quietly
    steps = checkpoints.saved_steps(workdir)
    sealed = [step for step in steps if digests.is_sealed(checkpoints.state_dir(workdir) / str(step))]
    if steps:
      need, what = files.size_of(checkpoints.state_dir(workdir) / str(steps[0])), "one checkpoint of this run"
    else:
      abstract = jax.tree_util.tree_leaves(abstract_state())
      need, what = sum(a.size * a.dtype.itemsize for a in abstract), "this run's train state, one checkpoint"
    free = files.free_bytes(workdir)
    resume = f"resume from checkpoint {steps[0]}" if steps else "start it"
    if steps and steps[0] not in sealed:
      # Committed by Orbax, its digests not yet written: a rerun resumes from it where it reads back whole
      # (`checkpoints.restore_newest_intact`), from an older one where it does not.
      resume += f" (from {sealed[0]} if {steps[0]} turns out cut short)" if sealed else \
          f" (or start over if {steps[0]} turns out cut short)"
    raise ModassemError(
        f"no space left on the device of {workdir} (writing {where or 'a file of the run'}; "
        f"{files.megabytes(free) if free is not None else 'unknown'} free): free at least {files.megabytes(need)} "
        f"({what}) and rerun the same command to {resume}") from None
  finally:
    if not full:
      hushed.undo()
    # else: Orbax's remaining writes go on failing until the process ends, each with its traceback; the run is
    # over and its line says why, so they stay left out.


def _closed_loop(value) -> bool:
  return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


class _Hushed:
  """What a failed asynchronous write prints besides its error, left out for the run: Orbax's log of it (absl, and
  asyncio's "exception was never retrieved"; records naming a full disk only) and "Event loop is closed" from
  TensorStore's threads calling back into Orbax's finished event loop (through sys.excepthook, sys.unraisablehook
  or threading.excepthook, whichever the thread meets)."""

  def __init__(self):
    self.quiet = _NoSpaceLeftLogs()
    self.loggers = [logging.getLogger(), logging.getLogger("absl"), logging.getLogger("asyncio")]
    for logger in self.loggers:
      logger.addFilter(self.quiet)
    self.hooks = sys.excepthook, sys.unraisablehook, threading.excepthook
    excepthook, unraisablehook, thread_hook = self.hooks
    sys.excepthook = lambda kind, value, tb: None if _closed_loop(value) else excepthook(kind, value, tb)
    sys.unraisablehook = lambda u: None if _closed_loop(u.exc_value) else unraisablehook(u)
    threading.excepthook = lambda args: None if _closed_loop(args.exc_value) else thread_hook(args)

  def undo(self):
    for logger in self.loggers:
      logger.removeFilter(self.quiet)
    sys.excepthook, sys.unraisablehook, threading.excepthook = self.hooks


class _NoSpaceLeftLogs(logging.Filter):

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    return not ((error is not None and files.no_space_left(error) is not None)
                or "No space left on device" in record.getMessage())
