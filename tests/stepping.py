"""A few real train steps of tiny configs, in this process or in a subprocess with another device count.

    python tests/stepping.py CASES_JSON OUT_DIR    # {name: [phase, overrides(, "flops")]}; prints {name: summary}

Each case runs the trainer's own set-up, lowered and compiled step, and batches
(`prepare`), so what it reports is what a run would compute. The parameters
after the steps go to OUT_DIR/NAME.npz (one array per leaf, by tree path, in the
per-block layout whatever the model's), for leaf-by-leaf comparisons across
processes.
"""

from __future__ import annotations

import json
import os
import sys

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def leaves(tree) -> dict:
  """{tree path: NumPy array} of every leaf of `tree`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def run_steps(config, n: int):
  """(setup, state, [metrics of each step]) after `n` train steps of `config` from a fresh (or sourced) init."""
  from modassem import prepare  # pylint: disable=g-import-not-at-top
  s = prepare.setup(config, None)
  compiled, _, init_fn, _, key, schedule = prepare.compile_train_step(s)
  state = init_fn(key)
  batches = s.dataset.train_batches(config.batch_size, seed=config.seed)
  shard = prepare.sharding.batch_sharding(s.mesh)
  history = []
  for _ in range(n):
    state, metrics = compiled(state, s.frozen, prepare.place_batch(next(batches), shard), key, schedule)
    history.append(metrics)
  return s, state, history


def run_cases(cases: dict, out_dir: str, steps: int = 3) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from modassem import config as config_lib, prepare  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  out = {}
  for name, (phase, overrides, *options) in cases.items():
    config = config_lib.load(f"{TINY}:{phase}", overrides)
    s, state, history = run_steps(config, steps)
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    specs = sorted({str(x.sharding.spec) for _, x in flat})
    stacked = [x.sharding.spec for p, x in flat if "'blocks'" in jax.tree_util.keystr(p)]
    experts = {str(x.sharding.spec) for p, x in flat if jax.tree_util.keystr(p).endswith(("_kernel']", "_bias']"))}
    path = os.path.join(out_dir, name.replace("/", "_") + ".npz")
    np.savez(path, **leaves(prepare.saved_layout(config, state.params)))   # per block, whatever the model
    out[name] = {"devices": jax.device_count(), "losses": [float(m["loss"]) for m in history], "specs": specs,
                 "stacked": len(stacked), "block_axis_split": any(len(sp) and sp[0] is not None for sp in stacked),
                 "expert_specs": sorted(experts), "params": path}
    if "flops" in options:   # the step's FLOPs as the trainer counts them (modassem.cost)
      from modassem import cost  # pylint: disable=g-import-not-at-top
      out[name]["flops"] = cost.train_step_flops(s)
  return out


if __name__ == "__main__":
  from modassem.cli import collect_less  # pylint: disable=g-import-not-at-top
  collect_less()   # as the command line does
  print(json.dumps(run_cases(json.loads(sys.argv[1]), sys.argv[2])))
