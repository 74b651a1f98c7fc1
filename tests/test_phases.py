"""The method's guarantees: what incubation freezes, trains and stores, and what assembly stacks."""

import os

import jax
import numpy as np
import pytest

from conftest import tiny
from modassem import checkpoints, cost, phases, prepare, train
from modassem.errors import ModassemError


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_module(run_dir, k):
  import orbax.checkpoint as ocp
  return _leaves(ocp.StandardCheckpointer().restore(checkpoints.module_dir(run_dir, k)))


def _steps(config, n):
  """Sets up `config`, runs n train steps; returns (setup, state before, state after)."""
  s = prepare.setup(config, None)
  compiled, init_fn, _, key = prepare.compile_train_step(s)
  state = init_fn(key)
  before = jax.device_get(state)
  shard = prepare.sharding.batch_sharding(s.mesh)
  it = s.dataset.train_batches(config.batch_size, seed=config.seed)
  for _ in range(n):
    state, metrics = compiled(state, s.frozen, prepare.place_batch(next(it), shard), key)
  return s, before, jax.device_get(state)


def test_incubation_leaves_meta_bit_for_bit_and_trains_only_module_i(runs):
  config = tiny("incubate", meta=runs["meta"], module="2")
  s, before, after = _steps(config, 3)
  # The frozen meta modules handed to the step are the meta run's, and stay so.
  frozen_after = _leaves(jax.device_get(s.frozen))
  for k in (0, 1, 3):
    saved = _saved_module(runs["meta"], k)
    for name, x in saved.items():
      np.testing.assert_array_equal(frozen_after[f"['module_{k}']{name}"], x)
  assert "['module_2']" not in "".join(frozen_after)
  # Only module 2 has parameters and optimizer state in the train state ...
  assert set(after.params) == {"module_2"}
  assert set(after.opt_state) == {"module_2"}
  opt_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(after.opt_state)[0]}
  assert all("module_2" in p for p in opt_paths if "mu" in p or "nu" in p)
  assert not any(f"module_{k}" in p for p in opt_paths for k in (0, 1, 3))
  # ... and it did train.
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before.params),
                                                     jax.tree_util.tree_leaves(after.params))]
  assert any(moved)


def test_incubation_does_not_touch_the_meta_run_on_disk(runs, tmp_path):
  def snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
      for f in files:
        p = os.path.join(root, f)
        with open(p, "rb") as fh:
          out[os.path.relpath(p, d)] = hash(fh.read())
    return out
  before = snapshot(runs["meta"])
  train.train(tiny("incubate", meta=runs["meta"], module="3", total_steps=2), str(tmp_path / "inc3"))
  assert snapshot(runs["meta"]) == before


def test_incubate_all_matches_single_module_runs(runs, tmp_path):
  """`module=all` trains each module as its own run would, on the same batches."""
  singles = {1: runs["inc_1"]}
  for k in (0, 2, 3):
    singles[k] = str(tmp_path / f"inc_{k}")
    train.train(tiny("incubate", meta=runs["meta"], module=str(k)), singles[k])
  for k, run_dir in singles.items():
    together, alone = _saved_module(runs["inc_all"], k), _saved_module(run_dir, k)
    assert together.keys() == alone.keys()
    for name in alone:
      np.testing.assert_allclose(together[name], alone[name], rtol=1e-5, atol=1e-6, err_msg=f"module_{k}{name}")


def test_incubated_module_has_the_target_depth(runs):
  saved = _saved_module(runs["inc_1"], 1)
  blocks = {n.split("']")[0] for n in saved if "blocks_" in n}
  assert len(blocks) == tiny("meta").model.depth // 4
  meta = _saved_module(runs["meta"], 1)
  assert len({n.split("']")[0] for n in meta if "blocks_" in n}) == 1


def test_assembly_places_module_i_of_run_i_in_slot_i(runs):
  sources = [runs["inc_all"], runs["inc_1"], runs["inc_all"], runs["inc_all"]]
  config = tiny("assemble", modules=",".join(sources))
  s = prepare.setup(config, None)
  _, init_fn, _, key = prepare.compile_train_step(s)
  params = _leaves(jax.device_get(init_fn(key).params))
  for k, run_dir in enumerate(sources):
    for name, x in _saved_module(run_dir, k).items():
      np.testing.assert_array_equal(params[f"['module_{k}']{name}"], x)


def test_assembled_model_runs_as_one_vit(runs):
  config = tiny("assemble", modules=",".join([runs["inc_all"]] * 4))
  s = prepare.setup(config, None)
  model = phases.model_for(config, s.plan.depths)
  images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  whole = model.apply({"params": s.sources}, images)
  x = images
  for k in range(4):
    x = model.module(k).apply({"params": s.sources[f"module_{k}"]}, x)
  np.testing.assert_allclose(whole, x, rtol=1e-6, atol=1e-6)
  assert whole.shape == (2, 10)


@pytest.mark.parametrize("module, trained", [("all", (0, 1, 2, 3)), ("0", (0,)), ("3", (3,))])
def test_plans(module, trained):
  plan = phases.make_plan(tiny("incubate", module=module))
  assert plan.trained == trained and plan.incubate
  assert plan.hybrid_depths(trained[0]) == tuple(2 if k == trained[0] else 1 for k in range(4))
  assert set(plan.groups) == {f"module_{i}" for i in trained}
  # Every meta module is read unless its slot is the only one trained.
  assert phases.frozen_slots(plan) == [k for k in range(4) if trained != (k,)]
  meta = phases.make_plan(tiny("meta"))
  assert meta.depths == (1, 1, 1, 1) and not meta.incubate and set(meta.groups) == {"model"}
  assert phases.frozen_slots(meta) == []
  with pytest.raises(ModassemError, match="out of range"):
    phases.make_plan(tiny("incubate", module="4"))


def test_incubation_step_costs_fall_with_the_slot_and_all_shares_the_prefix(runs):
  """XLA's own count: no backward pass before slot i, and `all` runs the shared meta prefix once."""
  flops = {m: cost.step_flops(tiny("incubate", meta=runs["meta"], module=m)) for m in ("0", "1", "2", "3", "all")}
  singles = [flops[str(i)] for i in range(4)]
  # Every hybrid has the same blocks; what differs is how many of them sit
  # before the trained slot, where only a forward pass runs.
  assert singles[0] > singles[1] > singles[2] > singles[3]
  assert flops["all"] < sum(singles)
  e2e = cost.step_flops(tiny("e2e"))
  assert singles[0] < e2e


def test_step_flops_count_every_iteration_of_a_loop():
  """XLA's cost analysis counts a loop body once; the trainer's count covers every block and micro-batch."""
  base = cost.step_flops(tiny("e2e"))
  # Counting each body once would give about a quarter: 1 of 2 micro-batches, 1 of 2 blocks per module.
  assert cost.step_flops(tiny("e2e", accum_steps=2, **{"model.scan": True})) == pytest.approx(base, rel=0.05)


def test_scanned_runs_exchange_modules_with_per_block_runs(runs, tmp_path):
  """A scanned incubation reads the per-block meta run, trains as the per-block run does and saves per block;
  a scanned assembly stacks those modules."""
  plain, scanned = str(tmp_path / "plain"), str(tmp_path / "scanned")
  no_drop = {"model.drop_path": 0.0}   # drop-path masks are drawn per block in one layout, per step in the other
  train.train(tiny("incubate", meta=runs["meta"], module="1", **no_drop), plain)
  train.train(tiny("incubate", meta=runs["meta"], module="1", **no_drop, **{"model.scan": True}), scanned)
  a, b = _saved_module(plain, 1), _saved_module(scanned, 1)
  assert a.keys() == b.keys() and any("blocks_1" in n for n in b)
  for name in a:
    np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5, err_msg=name)

  sources = [runs["inc_all"], scanned, runs["inc_all"], runs["inc_all"]]
  config = tiny("assemble", modules=",".join(sources), **{"model.scan": True})
  s = prepare.setup(config, None)
  _, init_fn, _, key = prepare.compile_train_step(s)
  params = _leaves(jax.device_get(prepare.saved_layout(config, init_fn(key).params)))
  assert "['module_1']['blocks']" not in "".join(params)
  for k, run_dir in enumerate(sources):
    for name, x in _saved_module(run_dir, k).items():
      np.testing.assert_array_equal(params[f"['module_{k}']{name}"], x)
