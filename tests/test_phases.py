"""The method's guarantees: what incubation freezes, trains and stores, and what assembly stacks."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stepping
from conftest import SHALLOW, tiny
from modassem import checkpoints, cost, phases, prepare, train
from modassem.errors import ModassemError


_leaves = stepping.leaves
# No mixing and no drop path: a loss a hand-built hybrid can recompute.
PLAIN = {"mixup": 0.0, "cutmix": 0.0, "model.drop_path": 0.0}


def _saved_tree(run_dir, k):
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(checkpoints.module_dir(run_dir, k))


def _saved_module(run_dir, k):
  return _leaves(_saved_tree(run_dir, k))


def _hybrid_loss(config, params, batch) -> float:
  """The train loss of one batch through a hybrid built by hand: a ViT of the hybrid's depths on `params`, and
  label-smoothed cross-entropy in NumPy (float64). Only for configs with no mixing and no drop path."""
  plan = phases.make_plan(config)
  (i,) = plan.trained
  model = phases.model_for(config, plan.hybrid_depths(i))
  logits = np.asarray(jax.jit(model.apply)({"params": params}, batch["image"]), np.float64)
  n = config.model.num_classes
  targets = np.eye(n)[batch["label"]] * (1 - config.label_smoothing) + config.label_smoothing / n
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  return float(-(targets * log_p).sum(-1).mean())


def test_incubation_leaves_meta_bit_for_bit_and_trains_only_module_i(runs):
  config = tiny("incubate", meta=runs["meta"], module="1", **PLAIN)
  s = prepare.setup(config, None)
  compiled, _, init_fn, _, key, schedule = prepare.compile_train_step(s)
  state = fresh = init_fn(key)
  fresh = _leaves(fresh.params)
  batches = s.dataset.train_batches(config.batch_size, seed=config.seed)
  shard = prepare.sharding.batch_sharding(s.mesh)
  for _ in range(4):
    batch, module_1 = next(batches), jax.device_get(state.params["module_1"])   # the state is donated
    state, metrics = compiled(state, s.frozen, prepare.place_batch(batch, shard), key, schedule)
  # The frozen meta modules survive the donated steps, and the last step computed its loss with exactly the
  # meta run's modules: the same loss comes out of a hybrid built by hand from the modules on disk and the
  # module 1 that step started from.
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(s.frozen))
  hybrid = {f"module_{k}": _saved_tree(runs["meta"], k) for k in (0, 2, 3)}
  hybrid["module_1"] = module_1
  # (The two agree to float32 rounding, about 4e-7; frozen modules off by 1e-4 everywhere, or scaled by 1.001,
  # would move the loss by 2.5e-6 or 5e-6.)
  assert float(metrics["loss"]) == pytest.approx(_hybrid_loss(config, hybrid, batch), rel=1e-6)
  frozen_after = _leaves(s.frozen)
  for k in (0, 2, 3):
    for name, x in _saved_module(runs["meta"], k).items():
      np.testing.assert_array_equal(frozen_after[f"['module_{k}']{name}"], x)
  assert "['module_1']" not in "".join(frozen_after)
  # Only module 1 has parameters and optimizer state in the train state ...
  after = jax.device_get(state)
  assert set(after.params) == {"module_1"}
  assert set(after.opt_state) == {"module_1"}
  opt_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(after.opt_state)[0]}
  assert all("module_1" in p for p in opt_paths if "mu" in p or "nu" in p)
  assert not any(f"module_{k}" in p for p in opt_paths for k in (0, 2, 3))
  # ... and it did train.
  assert any(not np.array_equal(fresh[n], x) for n, x in _leaves(after.params).items())


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
  # One block per module: what an incubation writes does not depend on its module's depth.
  train.train(tiny("incubate", meta=runs["meta"], module="3", **SHALLOW), str(tmp_path / "inc3"))
  assert snapshot(runs["meta"]) == before


def test_incubate_all_matches_single_module_runs(runs):
  """`module=all` trains each module as its own run would, on the same batches (module 1: a whole run; the others
  the same steps without the run around them)."""
  singles = {1: _saved_module(runs["inc_1"], 1)}
  for k in (0, 2, 3):
    config = tiny("incubate", meta=runs["meta"], module=str(k))
    singles[k] = _leaves(stepping.run_steps(config, config.total_steps)[1].params[f"module_{k}"])
  for k, alone in singles.items():
    together = _saved_module(runs["inc_all"], k)
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
  init_fn, key = prepare.state_spec(s).init_fn, jax.random.key(config.seed)
  params = _leaves(jax.device_get(init_fn(key).params))
  for k, run_dir in enumerate(sources):
    for name, x in _saved_module(run_dir, k).items():
      np.testing.assert_array_equal(params[f"['module_{k}']{name}"], x)


def test_assembly_init_takes_its_modules_as_arguments():
  """The compiled init of an assembly holds no parameter constants: its program is the same size for a model
  twice as wide (closed over, the sources would be written into it, four times as many for twice the width)."""
  sizes = {}
  for width in (16, 32):
    config = tiny("assemble", **{"model.width": width})
    plan, mesh = phases.make_plan(config), prepare.sharding.make_mesh()
    model_of = functools.partial(phases.model_for, config)
    sources = jax.eval_shape(model_of(plan.depths).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    s = prepare.Setup(config=config, plan=plan, dataset=None, mesh=mesh, model_of=model_of, run={}, total_steps=6,
                      warmup_steps=2, frozen={}, sources=sources)
    init_fn = prepare.state_spec(s).init_fn   # the jitted init, its sources bound as arguments
    sizes[width] = len(init_fn.func.lower(*init_fn.args, jax.random.key(0)).as_text())
  assert sizes[32] < 1.05 * sizes[16], sizes


def test_assembled_model_runs_as_one_vit(runs):
  config = tiny("assemble", modules=",".join([runs["inc_all"]] * 4))
  s = prepare.setup(config, None)
  model = phases.model_for(config, s.plan.depths)
  images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  whole = jax.jit(model.apply)({"params": s.sources}, images)
  x = images
  for k in range(4):
    x = jax.jit(model.module(k).apply)({"params": s.sources[f"module_{k}"]}, x)
  np.testing.assert_allclose(whole, x, rtol=1e-6, atol=1e-6)
  assert whole.shape == (2, 10)


# The tiny target has modules of two blocks; the meta model, one block per module.
@pytest.mark.parametrize("module, trained, first_hybrid", [("all", (0, 1, 2, 3), (2, 1, 1, 1)),
                                                           ("0", (0,), (2, 1, 1, 1)), ("3", (3,), (1, 1, 1, 2))])
def test_plans(module, trained, first_hybrid):
  plan = phases.make_plan(tiny("incubate", module=module))
  assert plan.trained == trained and plan.incubate
  assert plan.hybrid_depths(trained[0]) == first_hybrid
  if module == "all":
    assert [plan.hybrid_depths(i) for i in (1, 2)] == [(1, 2, 1, 1), (1, 1, 2, 1)]
  assert set(plan.groups) == {f"module_{i}" for i in trained}
  # Every meta module is read unless its slot is the only one trained.
  assert phases.frozen_slots(plan) == [k for k in range(4) if trained != (k,)]
  meta = phases.make_plan(tiny("meta"))
  assert meta.depths == (1, 1, 1, 1) and not meta.incubate and set(meta.groups) == {"model"}
  assert phases.frozen_slots(meta) == []
  with pytest.raises(ModassemError, match="out of range"):
    phases.make_plan(tiny("incubate", module="4"))


# The tiny preset's hybrids: its two-block module i among one-block meta modules.
HYBRIDS = {0: (2, 1, 1, 1), 1: (1, 2, 1, 1), 2: (1, 1, 2, 1), 3: (1, 1, 1, 2)}


def _branches(tree, keep):
  """`tree` with the output projections of every block's two branches (attn.proj, mlp.fc2) zeroed, except in
  blocks for which `keep(path)` holds, whose projections get large random weights instead."""
  rng = np.random.default_rng(0)
  def one(path, x):
    name = jax.tree_util.keystr(path)
    if "blocks_" not in name or not ("['proj']" in name or "['fc2']" in name):
      return x
    return rng.normal(0.0, 0.5, x.shape).astype(np.float32) if keep(name) else np.zeros_like(x)
  return jax.tree_util.tree_map_with_path(one, jax.device_get(tree))


def _unchanged(logits, identity):
  """Per example: did the logits come out as if the one live block were the identity (both branches dropped)?"""
  return np.asarray(jnp.all(jnp.abs(logits - identity) <= 1e-5, axis=-1))


@pytest.mark.parametrize("module", ["1", "all"])
def test_incubation_runs_meta_modules_in_train_mode_at_the_hybrids_drop_path_rates(module):
  """The frozen meta modules drop residual branches as they would in the hybrid model: at the stochastic-depth
  rate of their place in the hybrid (depths 1, 2, 1, 1 for module 1: meta module 2 is block 3 of 5, so
  p * 3/4), not at the meta model's own rates (p * 2/3), and not at none (eval mode).

  Every block's branches are zeroed but those of one meta module's block, which get large weights: an example's
  logits then equal those of the all-identity model exactly when that block dropped both branches, which
  happens with probability rate**2. For one module, the same fraction is measured on a hybrid built by hand as one
  ViT; `all` runs the meta modules before each slot once for every hybrid, and must give each its own rates.
  """
  p, n = 0.6, 4000
  config = tiny("incubate", module=module, **{"model.drop_path": p})
  plan = phases.make_plan(config)
  model_of = functools.partial(phases.model_for, config)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(n, 8, 8, 3)), jnp.float32)
  meta = jax.jit(model_of(plan.meta_depths).init)(jax.random.key(0), images[:1])["params"]
  target = jax.jit(model_of(plan.depths).init)(jax.random.key(1), images[:1])["params"]
  forward = jax.jit(lambda trained, frozen, key, train=True: phases.forward(plan, model_of, trained, frozen, images,
                                                                            train=train, key=key),
                    static_argnames="train")
  identity = forward(_branches({m: target[m] for m in map(phases.module_name, plan.trained)}, lambda _: False),
                     _branches(meta, lambda _: False), jax.random.key(0), train=False)
  checked = 0
  for k in range(plan.num_modules):
    live = lambda name, k=k: f"['module_{k}']" in name
    trained = _branches({m: target[m] for m in map(phases.module_name, plan.trained)}, lambda _: False)
    frozen = _branches(meta, live)
    logits = forward(trained, frozen, jax.random.key(7))
    for i in plan.trained:
      if i == k:
        continue
      depths = HYBRIDS[i]
      rate = p * sum(depths[:k]) / (sum(depths) - 1)   # linear in depth over the hybrid's blocks
      got = _unchanged(logits[f"module_{i}"], identity[f"module_{i}"]).mean()
      tol = 4 * np.sqrt(rate ** 2 * (1 - rate ** 2) / n) + 1e-3
      assert got == pytest.approx(rate ** 2, abs=tol), (i, k, got, rate ** 2)
      if module != "all":
        # A hybrid built by hand: one ViT of the hybrid's depths, applied whole in train mode.
        params = {**frozen, f"module_{i}": trained[f"module_{i}"]}
        by_hand = jax.jit(functools.partial(model_of(depths).apply, train=True))(
            {"params": params}, images, rngs={"dropout": jax.random.key(11)})
        by_hand = _unchanged(by_hand, identity[f"module_{i}"]).mean()
        assert by_hand == pytest.approx(rate ** 2, abs=tol), (i, k, by_hand, rate ** 2)
      checked += rate > 0
  assert checked >= (2 if module != "all" else 8)


@pytest.mark.parametrize("scope", ["module", "hybrid"])
def test_m2mkd_drop_path_rises_over_the_incubated_modules_own_blocks_and_spares_the_meta_model(scope):
  """`incubation_drop_path="module"`, m2mKD's: module 1 (3 blocks of a 1/3/2/2 cut) drops its last block's branches
  at the full rate, as the reference's student of depth 3 does (torch.linspace(0, p, 3)), and the meta modules
  drop nothing; Deep Incubation's "hybrid" places that block at 3 of 5 in the hybrid and drops meta blocks too.
  Measured as in the test above: every branch zeroed but one block's, an example unchanged when it drops both."""
  p, n = 0.6, 4000
  config = tiny("incubate", module="1", **{"model.drop_path": p, "model.depths": (1, 3, 2, 2),
                                           "incubation_drop_path": scope})
  plan = phases.make_plan(config)
  model_of = functools.partial(phases.model_for, config)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(n, 8, 8, 3)), jnp.float32)
  meta = jax.jit(model_of(plan.meta_depths).init)(jax.random.key(0), images[:1])["params"]
  target = {"module_1": jax.jit(model_of(plan.depths).init)(jax.random.key(1), images[:1])["params"]["module_1"]}
  forward = jax.jit(lambda trained, frozen, key, train=True: phases.forward(plan, model_of, trained, frozen, images,
                                                                            train=train, key=key)["module_1"],
                    static_argnames="train")
  none = lambda _: False
  identity = forward(_branches(target, none), _branches(meta, none), jax.random.key(0), train=False)
  own = forward(_branches(target, lambda name: "blocks_2" in name), _branches(meta, none), jax.random.key(7))
  want = (np.linspace(0.0, p, 3)[2] if scope == "module" else p * 3 / 5) ** 2
  got = _unchanged(own, identity).mean()
  assert got == pytest.approx(want, abs=4 * np.sqrt(want * (1 - want) / n) + 1e-3), (got, want)
  after = forward(_branches(target, none), _branches(meta, lambda name: "['module_3']" in name), jax.random.key(7))
  dropped = _unchanged(after, identity).mean()
  assert dropped == 0.0 if scope == "module" else dropped > 0.2


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
  """A scanned incubation reads the per-block meta run, trains as the per-block run does (mixing and drop path
  on: each block drops the same branches in both layouts) and saves per block; a scanned assembly stacks those
  modules."""
  scanned = str(tmp_path / "scanned")
  plain = tiny("incubate", meta=runs["meta"], module="1")
  train.train(tiny("incubate", meta=runs["meta"], module="1", **{"model.scan": True}), scanned)
  a = _leaves(stepping.run_steps(plain, plain.total_steps)[1].params["module_1"])
  b = _saved_module(scanned, 1)
  assert a.keys() == b.keys() and any("blocks_1" in n for n in b)
  for name in a:
    np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5, err_msg=name)

  sources = [runs["inc_all"], scanned, runs["inc_all"], runs["inc_all"]]
  config = tiny("assemble", modules=",".join(sources), **{"model.scan": True})
  s = prepare.setup(config, None)
  init_fn, key = prepare.state_spec(s).init_fn, jax.random.key(config.seed)
  params = _leaves(jax.device_get(prepare.saved_layout(config, init_fn(key).params)))
  assert "['module_1']['blocks']" not in "".join(params)
  for k, run_dir in enumerate(sources):
    for name, x in _saved_module(run_dir, k).items():
      np.testing.assert_array_equal(params[f"['module_{k}']{name}"], x)
