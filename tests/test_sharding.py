"""The same train steps on 1 device and on 8 simulated CPU devices (data parallel and FSDP).

Each device count needs its own process (XLA reads the flag at start-up);
one process runs every case for its device count.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TINY

SCRIPT = r"""
import json, sys
import jax, numpy as np
from modassem import config as config_lib, prepare
out = {}
for name, (phase, overrides) in json.loads(sys.argv[1]).items():
  config = config_lib.load(f"%s:{phase}", overrides)
  s = prepare.setup(config, None)
  compiled, init_fn, _, key = prepare.compile_train_step(s)
  state = init_fn(key)
  it = s.dataset.train_batches(config.batch_size, seed=0)
  shard = prepare.sharding.batch_sharding(s.mesh)
  losses = []
  for _ in range(3):
    state, metrics = compiled(state, s.frozen, prepare.place_batch(next(it), shard), key)
    losses.append(float(metrics["loss"]))
  specs = sorted({str(x.sharding.spec) for x in jax.tree_util.tree_leaves(state.params)})
  stacked = [x.sharding.spec for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
             if "'blocks'" in jax.tree_util.keystr(p)]
  leaves = [np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(jax.device_get(state.params))]
  out[name] = {"devices": jax.device_count(), "losses": losses, "specs": specs, "stacked": len(stacked),
               "block_axis_split": any(len(sp) and sp[0] is not None for sp in stacked),
               "params": float(np.concatenate(leaves).astype(np.float64).sum())}
print(json.dumps(out))
""" % TINY

# Mixup, CutMix and drop path stay on in the e2e and incubate cases: their
# randomness must not depend on the device count. Accumulation is compared
# without them, since micro-batches draw their own drop-path masks.
PLAIN = {"mixup": 0.0, "cutmix": 0.0, "model.drop_path": 0.0}


def _start(devices, cases):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(cases)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
  stdout, stderr = proc.communicate(timeout=900)
  assert proc.returncode == 0, stderr[-3000:]
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(runs):
  inc = {"meta": runs["meta"], "module": "all"}
  # Both device counts at once: most of each process is tracing and compiling, which uses one core.
  one = _start(1, {"e2e": ["e2e", {"sharding": "data"}], "incubate": ["incubate", {"sharding": "data", **inc}],
                   "plain": ["e2e", {"sharding": "data", "accum_steps": 1, **PLAIN}]})
  eight = _start(8, {"e2e/data": ["e2e", {"sharding": "data"}], "e2e/fsdp": ["e2e", {"sharding": "fsdp"}],
                     "incubate/data": ["incubate", {"sharding": "data", **inc}],
                     "incubate/fsdp": ["incubate", {"sharding": "fsdp", **inc}],
                     "plain/accum2": ["e2e", {"sharding": "fsdp", "accum_steps": 2, **PLAIN}],
                     "plain/scan": ["e2e", {"sharding": "fsdp", "model.scan": True, **PLAIN}]})
  return _result(one), _result(eight)


@pytest.mark.parametrize("phase", ["e2e", "incubate"])
def test_one_device_and_eight_give_the_same_losses(phase, results):
  one, eight = results
  ref, data, fsdp = one[phase], eight[f"{phase}/data"], eight[f"{phase}/fsdp"]
  assert ref["devices"] == 1 and data["devices"] == 8 == fsdp["devices"]
  # Replicated vs sharded parameters: FSDP really splits them.
  assert not any("data" in s for s in data["specs"])
  assert any("data" in s for s in fsdp["specs"])
  for other in (data, fsdp):
    np.testing.assert_allclose(other["losses"], ref["losses"], rtol=2e-5)
    np.testing.assert_allclose(other["params"], ref["params"], rtol=1e-5)


def test_gradient_accumulation_matches_the_full_batch(results):
  one, eight = results
  np.testing.assert_allclose(eight["plain/accum2"]["losses"], one["plain"]["losses"], rtol=2e-5)
  np.testing.assert_allclose(eight["plain/accum2"]["params"], one["plain"]["params"], rtol=1e-5)


def test_scanned_blocks_under_fsdp_match_the_per_block_model_on_one_device(results):
  one, eight = results
  scan = eight["plain/scan"]
  assert scan["stacked"] > 0 and not scan["block_axis_split"]
  assert any("data" in s for s in scan["specs"])
  np.testing.assert_allclose(scan["losses"], one["plain"]["losses"], rtol=2e-5)
  np.testing.assert_allclose(scan["params"], one["plain"]["params"], rtol=1e-5)
