"""Every file modassem reads or writes in a run directory, on a local disk or in a bucket.

Paths go through `etils.epath`, which Orbax uses too, so `--workdir=gs://bucket/runs/meta` and `runs/meta` work
alike: run.json, config.json, metrics, results, reports, TensorBoard events, the lock and the checks on modules and
checkpoints. A local path is made absolute once, here; a URL (`gs://...`, `s3://...`) is kept as it is.

Object stores differ from a disk in three ways that matter to a run, handled here:
- No rename of a whole folder in one step, but a single object is written whole or not at all: `write_text` writes
  a local file to a temporary name and renames it (a killed run never leaves half a file), an object in place.
- No append: `metrics.Writer` rewrites its file on a bucket (at most every 30 s, at each checkpoint and at the end).
- Exclusive create: `create` is `O_CREAT | O_EXCL` on a disk and a write conditional on the object not existing
  (`ifGenerationMatch=0`) on Cloud Storage; the run-directory lock rests on it.

On `gs://`, epath is told to use gcsfs (fsspec) rather than TensorFlow's file system, in `modassem/__init__.py`:
TensorFlow's Cloud Storage client has its endpoint compiled in, so it cannot be pointed at an emulator for tests,
and with gcsfs a run directory is reached the same way whether TensorFlow is installed or not. Orbax writes the
arrays themselves through TensorStore, in either case.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from typing import Any

from etils import epath

from modassem.errors import ModassemError

Path = epath.Path


def is_remote(p) -> bool:
  """Whether `p` is a URL (gs://, s3://, ...) rather than a local path."""
  return "://" in os.fspath(p)


def path(p) -> epath.Path:
  """`p` as an epath.Path: a URL as given, a local path made absolute."""
  if isinstance(p, epath.Path) and (is_remote(p) or os.path.isabs(os.fspath(p))):
    return p
  s = os.fspath(p)
  return epath.Path(s if is_remote(s) else os.path.abspath(s))


def absolute(value: str) -> str:
  """Comma-separated run paths as a run records them: local ones absolute, URLs as given, so that the record names
  the same runs wherever it is read from."""
  parts = [x.strip() for x in str(value).split(",")]
  return ",".join(x if not x or is_remote(x) else os.path.abspath(x) for x in parts)


def recorded(p: str, run_dir) -> str:
  """A run path that the run in `run_dir` recorded (in run.json or config.json), to read it from anywhere.

  Runs record absolute paths (or URLs). Runs of older versions recorded them as typed: a relative one is taken
  against the run directory that recorded it where that exists, else against the working directory, where such a
  run's command ran."""
  p = str(p)
  if not p or is_remote(p) or os.path.isabs(p):
    return p
  if not is_remote(run_dir):
    beside = os.path.normpath(os.path.join(os.path.abspath(os.fspath(run_dir)), p))
    if os.path.exists(beside):
      return beside
  return os.path.abspath(p)


def run_key(p: str) -> str:
  """What two paths of the same run directory have in common: a local path resolved (links, `..`), a URL
  normalised."""
  return os.path.normpath(p) if is_remote(p) else os.path.realpath(p)


def join(base, *parts) -> str:
  """`base/parts...` as a string, relative where `base` is (for names shown to the user)."""
  return os.fspath(epath.Path(base).joinpath(*parts))


def read_text(p) -> str | None:
  """The file's text, or None when it does not exist."""
  try:
    return path(p).read_text()
  except FileNotFoundError:
    return None


def write_bytes(p, data: bytes) -> None:
  p = path(p)
  if is_remote(p):
    p.write_bytes(data)   # an object is written whole or not at all
    return
  # Write-then-rename so a killed run never leaves a half-written file.
  tmp = p.parent / f"{p.name}.{os.getpid()}.tmp"
  try:
    tmp.write_bytes(data)
  except OSError:
    remove(tmp)   # a full disk, say: leave no part-written file behind
    raise
  tmp.replace(p)


def append(p, data: bytes) -> None:
  """Appends `data` to the local file `p` (made where missing). A failed write names the file, as a failed open
  does: Python's OSError from a write or a close (a full disk) names none, and the full-disk line names it."""
  try:
    with path(p).open("ab") as f:
      f.write(data)
  except OSError as e:
    if e.filename is not None:
      raise
    raise OSError(e.errno, e.strerror, os.fspath(p)) from e


def write_text(p, text: str) -> None:
  write_bytes(p, text.encode())


def create(p, text: str) -> bool:
  """Writes `text` to `p` only if `p` does not exist yet (atomically); whether it did."""
  p = path(p)
  try:
    if is_remote(p):
      # epath has no exclusive mode; fsspec's create mode is a write conditional on the object's absence
      # (ifGenerationMatch=0 on Cloud Storage).
      import fsspec  # pylint: disable=g-import-not-at-top
      fs, where = fsspec.core.url_to_fs(os.fspath(p))
      fs.pipe_file(where, text.encode(), mode="create")
    else:
      with open(p, "x") as f:
        try:
          f.write(text)
          f.flush()
        except OSError:
          remove(p)   # ours, and empty or part-written (a full disk): a file no reader could make sense of
          raise
  except FileExistsError:
    return False
  return True


def no_space_left(error: BaseException) -> str | None:
  """Whether `error`, or an error it was raised from, is a write that found the disk full: the path it names (""
  where it names none), or None for any other error. Orbax and TensorStore report it in their own exception types
  with the system's message inside ('Failed writing: "PATH": ... [os_error_code=\'28\']')."""
  stack, seen, full, named = [error], set(), False, ""
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    text = str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      full, named = True, named or (os.fspath(e.filename) if e.filename else "")
    elif "No space left on device" in text or "os_error_code='28'" in text:
      quoted = re.search(r'"([^"]+)"', text)
      full, named = True, named or (quoted.group(1) if quoted else "")
    stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return named if full else None


def free_bytes(p) -> int | None:
  """Free space on the file system that holds `p` (its nearest existing folder); None for a URL."""
  if is_remote(p):
    return None
  here = os.fspath(path(p))
  while not os.path.exists(here):
    here = os.path.dirname(here)
  return shutil.disk_usage(here).free


def files_under(folder) -> list:
  """Every file under `folder`, at any depth. (By `iterdir`: epath's `walk` of a bucket folder yields paths without
  their gs:// scheme.)"""
  out, folders = [], [path(folder)]
  while folders:
    for p in folders.pop().iterdir():
      (folders if p.is_dir() else out).append(p)
  return out


def size_of(folder) -> int:
  """The bytes of every file under `folder`."""
  return sum(p.stat().length for p in files_under(folder))


def megabytes(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def read_json(p) -> dict | None:
  """The JSON object in `p`, or None when there is no such file; a one-line error when it is unreadable, not
  UTF-8, not JSON or not an object (every run file modassem writes holds one object)."""
  try:
    text = read_text(p)
    obj = None if text is None else json.loads(text)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ModassemError(f"{p} is unreadable ({type(e).__name__}: {e}): restore it from a copy, or start in a new "
                        "--workdir") from None
  if text is not None and not isinstance(obj, dict):
    raise ModassemError(f"{p} holds a JSON {type(obj).__name__}, not the object modassem writes: restore it from a "
                        "copy, or start in a new --workdir")
  return obj


def write_json(p, obj: Any) -> None:
  write_text(p, json.dumps(obj, indent=2, sort_keys=True))


def remove(p) -> None:
  """Removes the file `p` if it is there."""
  try:
    path(p).unlink()
  except FileNotFoundError:
    pass


def relative(p, start) -> str:
  """`p` relative to the folder `start` (both in one tree)."""
  p, start = os.fspath(path(p)), os.fspath(path(start)).rstrip("/")
  if not p.startswith(start + "/"):
    raise ValueError(f"{p} is not inside {start}")
  return p[len(start) + 1:]
