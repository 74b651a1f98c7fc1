"""What the checkpoint digests cost: seconds per GB to seal a saved item and to check it, beside Orbax's own save
and restore of the same arrays.

    python benchmarks/digests.py [--gb=1] [--repeats=3] [--dir=/tmp] [--out=benchmarks/results/digests.json]

Saves a state of float32 arrays (`--gb` in all, in 64 MiB arrays, like a large model's parameters) with Orbax's
StandardCheckpointer, then times `digests.seal` and `digests.damage` on the saved folder and Orbax's restore of it;
prints the median of `--repeats` runs of each. The files are read back from the page cache where the machine's
memory holds them, as a checkpoint just written is: a cold read from disk or a bucket adds its transfer time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from modassem import digests  # noqa: E402


def _median_s(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gb", type=float, default=1.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default=tempfile.gettempdir())
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  per_array = 16 * 2**20   # float32 values: 64 MiB
  n = max(1, round(args.gb * 1e9 / (per_array * 4)))
  rng = np.random.default_rng(0)
  state = {f"w{i}": rng.standard_normal(per_array, dtype=np.float32) for i in range(n)}
  size = n * per_array * 4
  work = tempfile.mkdtemp(dir=args.dir, prefix="modassem-digests-")
  item = os.path.join(work, "item")
  try:
    ckptr = ocp.StandardCheckpointer()
    save_s = _median_s(lambda: (ckptr.save(item, state, force=True), ckptr.wait_until_finished()), args.repeats)
    on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(item) for f in fs)
    seal_s = _median_s(lambda: digests.seal(item), args.repeats)
    check_s = _median_s(lambda: digests.damage(item), args.repeats)
    restore_s = _median_s(lambda: ckptr.restore(item), args.repeats)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  gb = on_disk / 1e9
  result = {"arrays_gb": size / 1e9, "on_disk_gb": gb, "repeats": args.repeats,
            "orbax_save_s_per_gb": save_s / gb, "seal_s_per_gb": seal_s / gb, "check_s_per_gb": check_s / gb,
            "orbax_restore_s_per_gb": restore_s / gb}
  for k, v in result.items():
    print(f"{k:24s} {v:.3f}")
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
