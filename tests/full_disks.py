"""Runs of one command on a device that fills up, then grows: `unshare --map-root-user --mount python full_disks.py
SPEC` (a mount namespace of its own, where a tmpfs needs no privileges).

SPEC (JSON): {"mnt": a folder to mount tmpfs filesystems on, "out": a folder for the results, "sizes": the tmpfs
sizes to start with, "argv": the `modassem` arguments (the run directory is MNT/run)}. For each size, in OUT/SIZE/:
the command's exit status, stdout and stderr (`rc1`, `out1`, `err1`) and a copy of its run directory (`run1`) on a
tmpfs of that size; the same again (`...2`) once the tmpfs has grown to 64 MiB. The runs are `modassem.cli.main`
calls in this one process, as the tests' other reruns are: a rerun reads only what the stopped run left on disk, so
it needs no process of its own, and one process imports and lowers the step once for all of them. Each run's
stdout and stderr are its file descriptors 1 and 2, so that whatever Orbax, absl or XLA print lands there too.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys

from modassem import cli


@contextlib.contextmanager
def _captured(stdout: str, stderr: str):
  sys.stdout.flush(), sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  with open(stdout, "w") as out, open(stderr, "w") as err:
    os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
    try:
      yield
    finally:
      sys.stdout.flush(), sys.stderr.flush()
      os.dup2(saved[0], 1), os.dup2(saved[1], 2)
      os.close(saved[0]), os.close(saved[1])


def _run(argv: list, out: str, i: int) -> None:
  with _captured(os.path.join(out, f"out{i}"), os.path.join(out, f"err{i}")):
    rc = cli.main(argv)   # an exit status, as the command line's entry point exits with
  with open(os.path.join(out, f"rc{i}"), "w") as f:
    f.write(f"{rc}\n")


def main(spec: dict) -> None:
  cli.quick_tensorflow_import()
  cli.collect_less()
  mnt = spec["mnt"]
  argv = [*spec["argv"], f"--workdir={os.path.join(mnt, 'run')}"]
  for size in spec["sizes"]:
    out = os.path.join(spec["out"], size)
    os.makedirs(out)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], check=True)
    _run(argv, out, 1)
    if os.path.exists(os.path.join(mnt, "run")):   # a disk full at the very start may leave none
      shutil.copytree(os.path.join(mnt, "run"), os.path.join(out, "run1"), symlinks=True)
    subprocess.run(["mount", "-o", "remount,size=64m", mnt], check=True)
    _run(argv, out, 2)
    shutil.copytree(os.path.join(mnt, "run"), os.path.join(out, "run2"), symlinks=True)
    subprocess.run(["umount", mnt], check=True)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
