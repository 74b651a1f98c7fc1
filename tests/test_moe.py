"""The sparse MoE MLP against a NumPy implementation of each routing, written from the method's description: the
reference's top-k-then-softmax with no drops, V-MoE's softmax-then-top-k with a capacity in batch-priority order,
the auxiliary load-balancing loss, and the mixture with every expert taken computed by hand; then the layer in the
ViT's blocks, where the layout puts it, with a dense ViT unchanged."""

import functools
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import SHALLOW, TINY, tiny
import modassem
from modassem import checkpoints, checks, cli, cost, phases, records, report, train
from modassem.errors import ModassemError
from modassem.models import moe, vit

T, WIDTH, HIDDEN, E = 24, 8, 12, 6


def _np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _np_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _np_route(logits, k, router, capacity_factor):
  """(experts (T, k), weights (T, k) with 0 where dropped, kept (T, k)), one token and one expert at a time."""
  t, e = logits.shape
  probs = _np_softmax(logits)
  experts = np.zeros((t, k), int)
  weights = np.zeros((t, k))
  for i in range(t):
    score = logits[i] if router == "topk_softmax" else probs[i]
    top = sorted(range(e), key=lambda j: (-score[j], j))[:k]
    experts[i] = top
    weights[i] = _np_softmax(logits[i, top]) if router == "topk_softmax" else probs[i, top]
  kept = np.ones((t, k), bool)
  if capacity_factor > 0:
    cap = max(1, round(capacity_factor * k * t / e))
    taken = [0] * e
    by_priority = sorted(range(t), key=lambda i: (-weights[i, 0], i))
    for choice in range(k):
      for i in by_priority:
        ex = experts[i, choice]
        kept[i, choice] = taken[ex] < cap
        taken[ex] += 1
  return experts, np.where(kept, weights, 0.0), kept, probs


def _np_layer(x, params, k, router, capacity_factor, noise=0.0):
  logits = x @ params["gate"]["kernel"] + params["gate"]["bias"] + noise
  experts, weights, kept, probs = _np_route(logits, k, router, capacity_factor)
  y = np.zeros_like(x)
  for i in range(x.shape[0]):
    for j in range(k):
      ex = experts[i, j]
      h = _np_gelu(x[i] @ params["fc1_kernel"][ex] + params["fc1_bias"][ex])
      y[i] += weights[i, j] * (h @ params["fc2_kernel"][ex] + params["fc2_bias"][ex])
  share = np.zeros(E)
  for i in range(x.shape[0]):
    for j in range(k):
      share[experts[i, j]] += kept[i, j]
  aux = E * np.sum(share / max(share.sum(), 1) * probs.mean(axis=0))
  return y, aux, share / experts.size, 1 - kept.mean()


def _layer(**kw):
  layer = moe.MoeMlp(width=WIDTH, hidden=HIDDEN, num_experts=E, **kw)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, T // 2, WIDTH))
  # Jitted, here and below: one compiled program, not one per operation.
  params = jax.jit(functools.partial(layer.init, train=False))(jax.random.PRNGKey(0), x)["params"]
  # A gate with a wide spread, so that the routing is far from ties and uneven across experts.
  params["gate"]["kernel"] = params["gate"]["kernel"] * 8.0
  return layer, params, x


@pytest.mark.parametrize("router, k, capacity_factor", [
    ("topk_softmax", 2, 0.0), ("topk_softmax", 1, 0.0), ("softmax_topk", 2, 0.0), ("softmax_topk", 2, 1.0),
    ("softmax_topk", 1, 0.5)])
def test_layer_against_numpy(router, k, capacity_factor):
  layer, params, x = _layer(k=k, router=router, capacity_factor=capacity_factor)
  y, state = jax.jit(functools.partial(layer.apply, train=False, mutable=["moe"]))({"params": params}, x)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  want, aux, share, dropped = _np_layer(np.asarray(x, np.float64).reshape(T, WIDTH), p, k, router, capacity_factor)
  np.testing.assert_allclose(np.asarray(y).reshape(T, WIDTH), want, atol=2e-5, rtol=1e-4)
  sown = {name: np.asarray(values[0]) for name, values in state["moe"].items()}
  np.testing.assert_allclose(sown["aux_loss"], aux, rtol=1e-5)
  np.testing.assert_allclose(sown["expert_share"], share, atol=1e-7)
  np.testing.assert_allclose(sown["dropped"], dropped, atol=1e-7)
  if capacity_factor > 0:
    assert dropped > 0   # the case checks dropping, not only the routing
  else:
    assert dropped == 0


def test_noisy_gating_adds_gaussian_noise_to_the_logits_in_training_only():
  """V-MoE's noisy gating: in training, noise_std x N(0, 1) on the gate's logits, drawn from the "dropout" stream,
  before the softmax, top-k and capacity (the NumPy layer given the same draws); in evaluation, none."""
  std, key = 0.7, jax.random.PRNGKey(5)
  layer, params, x = _layer(k=2, router="softmax_topk", capacity_factor=1.0, noise_std=std)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  tokens = np.asarray(x, np.float64).reshape(T, WIDTH)

  class Draw(nn.Module):   # the layer's one draw from the stream: a module at the same place makes the same one
    @nn.compact
    def __call__(self):
      return jax.random.normal(self.make_rng("dropout"), (T, E))

  noise = std * np.asarray(Draw().apply({}, rngs={"dropout": key}), np.float64)
  apply = jax.jit(functools.partial(layer.apply, mutable=["moe"]), static_argnames="train")
  for train, added in ((True, noise), (False, 0.0)):
    y, state = apply({"params": params}, x, train=train, rngs={"dropout": key})
    want, _, share, dropped = _np_layer(tokens, p, 2, "softmax_topk", 1.0, noise=added)
    np.testing.assert_allclose(np.asarray(y).reshape(T, WIDTH), want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(state["moe"]["expert_share"][0]), share, atol=1e-7)
    np.testing.assert_allclose(np.asarray(state["moe"]["dropped"][0]), dropped, atol=1e-7)
  # The noise changes the routing here: the test would not pass with the noise left out.
  logits = tokens @ p["gate"]["kernel"] + p["gate"]["bias"]
  assert not np.array_equal(_np_route(logits + noise, 2, "softmax_topk", 1.0)[0],
                            _np_route(logits, 2, "softmax_topk", 1.0)[0])


def test_k_equal_to_the_experts_without_capacity_is_the_dense_mixture():
  """Every expert taken, weighted by the softmax over all of them: sum_e softmax(gate(x))_e * mlp_e(x), by hand."""
  layer, params, x = _layer(k=E, router="topk_softmax")
  y = jax.jit(functools.partial(layer.apply, train=False))({"params": params}, x)

  @jax.jit
  def by_hand(params, tokens):
    probs = jax.nn.softmax(tokens @ params["gate"]["kernel"] + params["gate"]["bias"])
    return sum(probs[:, e:e + 1] * (jax.nn.gelu(tokens @ params["fc1_kernel"][e] + params["fc1_bias"][e],
                                                 approximate=False) @ params["fc2_kernel"][e] + params["fc2_bias"][e])
               for e in range(E))
  mixture = by_hand(params, x.reshape(T, WIDTH))
  np.testing.assert_allclose(np.asarray(y).reshape(T, WIDTH), np.asarray(mixture), atol=1e-5)


def test_capacity_follows_batch_priority():
  """Four tokens all preferring expert 0, capacity 1 per expert: the most confident token keeps it."""
  logits = jnp.array([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
  routing = jax.jit(functools.partial(moe.route, k=1, router="softmax_topk", capacity_factor=0.5))(logits)
  assert moe.capacity(4, 2, 1, 0.5) == 1
  np.testing.assert_array_equal(np.asarray(routing.kept[:, 0]), [False, True, False, False])


def test_bad_k_is_refused():
  layer = moe.MoeMlp(width=WIDTH, hidden=HIDDEN, num_experts=4, k=5)
  with pytest.raises(ValueError, match="moe k=5 must be between 1 and the number of experts"):
    layer.init(jax.random.PRNGKey(0), jnp.ones((1, 2, WIDTH)), train=False)


# --- In the ViT ------------------------------------------------------------------

_ARCH = dict(image_size=8, patch=4, width=16, heads=2, num_classes=10)
_SPEC = moe.MoeSpec(experts=4, k=2)


def _init_apply(model, images, **kw):
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]
  return params, jax.jit(functools.partial(model.apply, **kw))({"params": params}, images)


def test_a_model_with_no_moe_block_is_the_dense_vit_bit_for_bit():
  images = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3))
  dense_params, dense = _init_apply(vit.ViT(depths=(2, 2), **_ARCH), images)
  params, out = _init_apply(vit.ViT(depths=(2, 2), moe=_SPEC, moe_layout=((), ()), **_ARCH), images)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(dense_params)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(dense_params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(dense))


def test_the_dense_vit_computes_what_it_did_before_moe_blocks_entered_it():
  """The dense ViT's initial parameters, logits and train-mode gradients, per block and scanned, against the values
  the code before MoE blocks wrote (tests/dense_vit_values.py says how): bit for bit on a machine like the one that
  wrote them (JAX, Flax, backend, XLA flags, CPU vector instructions), the logits within float32 rounding on others."""
  import dense_vit_values  # pylint: disable=g-import-not-at-top
  before = json.load(open(os.path.join(os.path.dirname(__file__), "data", "dense_vit.json")))
  now = dense_vit_values.values()
  for layout in ("blocks", "scan"):
    np.testing.assert_allclose(now[layout]["logit_values"], before[layout]["logit_values"], rtol=1e-5, atol=1e-6)
    if now["machine"] == before["machine"]:
      assert {k: v for k, v in now[layout].items() if k != "logit_values"} == {
          k: v for k, v in before[layout].items() if k != "logit_values"}, layout


def test_the_layout_puts_moe_mlps_where_it_says():
  layout = moe.moe_layout((2, 3), every=2)
  assert layout == ((1,), (1,))
  assert moe.moe_layout((4, 2), blocks=(0, 5)) == ((0,), (1,))
  assert moe.moe_layout((2, 2), every=1) == ((0, 1), (0, 1))
  images = jnp.zeros((1, 8, 8, 3))
  model = vit.ViT(depths=(2, 3), moe=_SPEC, moe_layout=layout, **_ARCH)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
  kinds = {(m, b): sorted(params[m][b]["mlp"]) for m in params for b in params[m] if b.startswith("blocks_")}
  moe_keys = ["fc1_bias", "fc1_kernel", "fc2_bias", "fc2_kernel", "gate"]
  assert kinds == {("module_0", "blocks_0"): ["fc1", "fc2"], ("module_0", "blocks_1"): moe_keys,
                   ("module_1", "blocks_0"): ["fc1", "fc2"], ("module_1", "blocks_1"): moe_keys,
                   ("module_1", "blocks_2"): ["fc1", "fc2"]}
  assert params["module_1"]["blocks_1"]["mlp"]["fc1_kernel"].shape == (4, 16, 64)


def test_a_scanned_moe_module_matches_the_unrolled_one_and_sows_per_block():
  images = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3))
  layout = moe.moe_layout((3, 2), every=1)
  params, (out, sown) = _init_apply(vit.ViT(depths=(3, 2), moe=_SPEC, moe_layout=layout, **_ARCH), images,
                                    mutable=["moe"])
  scanned = vit.ViT(depths=(3, 2), moe=_SPEC, moe_layout=layout, scan=True, **_ARCH)
  out_s, sown_s = jax.jit(functools.partial(scanned.apply, mutable=["moe"]))({"params": vit.stack_blocks(params)},
                                                                           images)
  np.testing.assert_allclose(np.asarray(out_s), np.asarray(out), atol=1e-6)
  per_block = [np.asarray(sown["moe"]["module_0"][f"blocks_{j}"]["mlp"]["aux_loss"][0]) for j in range(3)]
  np.testing.assert_allclose(np.asarray(sown_s["moe"]["module_0"]["blocks"]["mlp"]["aux_loss"][0]), per_block,
                             rtol=1e-6)


def test_bad_moe_settings_are_refused():
  with pytest.raises(ValueError, match=r"model.moe.k=3 must be between 1 and model.moe.experts=2"):
    moe.MoeSpec(experts=2, k=3).check()
  with pytest.raises(ValueError, match=r"model.moe.capacity_factor=-1.0 must be 0 \(no limit\) or positive"):
    moe.MoeSpec(experts=2, k=1, router="softmax_topk", capacity_factor=-1.0).check()
  with pytest.raises(ValueError, match=r"has no capacity and no noise"):
    moe.MoeSpec(experts=2, k=1, capacity_factor=1.0).check()
  with pytest.raises(ValueError, match=r"model.moe.blocks=\(0, 9\) names block\(s\) \[9\] of a model of depth 4"):
    moe.moe_layout((2, 2), blocks=(0, 9))
  with pytest.raises(ValueError, match=r"module 0 has MoE blocks \[1\] of 2: set model.scan=False"):
    vit.ViT(depths=(2, 2), moe=_SPEC, moe_layout=moe.moe_layout((2, 2), every=2), scan=True, **_ARCH).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))


# --- In every phase ----------------------------------------------------------------

# Every other block (the second of each module's two): modules of dense and MoE blocks side by side.
_SPARSE = {"model.moe.experts": 4, "model.moe.every": 2, "model.moe.aux_weight": 0.01}


def _module(run_dir, k):
  tree = ocp.StandardCheckpointer().restore(checkpoints.module_dir(run_dir, k))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_ragged_dots_are_counted_as_what_they_compute():
  """XLA counts a ragged dot as the dense work it is lowered to (every row against every group); the step's count
  puts 2 x rows x inner x outer in its place for the forward dot and for each of its two transposes (a dot whose
  result goes unused, as the forward one of a VJP here, is left out of the program, and of the count)."""
  m, inner, outer, groups = 6, 4, 5, 3
  x, w = jax.ShapeDtypeStruct((m, inner), jnp.float32), jax.ShapeDtypeStruct((groups, inner, outer), jnp.float32)
  sizes, ct = jax.ShapeDtypeStruct((groups,), jnp.int32), jax.ShapeDtypeStruct((m, outer), jnp.float32)
  forward = lambda x, w, sizes: jax.lax.ragged_dot(x, w, sizes)
  backward = lambda x, w, sizes, ct: jax.vjp(lambda x, w: forward(x, w, sizes), x, w)[1](ct)
  for f, args, dots in ((forward, (x, w, sizes), 1), (backward, (x, w, sizes, ct), 2)):
    traced = jax.jit(f).trace(*args)
    counted = cost.lowered_flops(traced.lower())
    want = dots * 2 * m * inner * outer
    assert counted > 2 * want, (counted, want)
    assert counted + cost.ragged_dot_correction(traced.jaxpr) == pytest.approx(want, abs=1e-6), f


def test_a_sparse_step_counts_its_tokens_k_experts_and_router_not_every_expert():
  """The FLOPs of a whole sparse train step as `plan`, the equal-FLOPs baseline and MFU read them (`cost.step_flops`)
  against a count by hand. Each token runs k experts of the MLP's shape: the matmuls, biases and GELU of a dense MLP
  k times wider, whose step XLA counts as it is (plain dots, nothing corrected); the router is a dense layer width ->
  experts with bias, 2 x width x experts FLOPs a token forward and twice that backward (its input's and its
  kernel's gradients). Every expert taken is the dense MLP E times wider. At width 64 and 512 images the tokens'
  work outweighs what does not scale with them (the optimizer on the experts idle in a step, the routing's own
  bookkeeping), which the hand count leaves out. What the 2 % pins is the k experts a token is counted for (one
  more would be some 40 % more): the router is 0.6 % of this step, within the tolerance. Lowered only, nothing
  compiled."""
  experts, k, width, batch = 8, 2, 64, 512
  shape = {**SHALLOW, "model.width": width, "batch_size": batch}
  sparse = cost.step_flops(tiny("e2e", **shape, **{"model.moe.experts": experts, "model.moe.k": k,
                                                   "model.moe.every": 1}))
  k_wider, all_wider = (cost.step_flops(tiny("e2e", **shape, **{"model.mlp_ratio": 4.0 * n})) for n in (k, experts))
  tokens = batch * ((8 // 4) ** 2 + 1)   # the tiny preset: 8-px images, 4-px patches, and the class token
  router = SHALLOW["model.depth"] * 3 * 2 * tokens * width * experts   # an MoE MLP in each of the 4 blocks
  assert sparse == pytest.approx(k_wider + router, rel=0.02)
  assert sparse < 0.4 * all_wider


# One block per module (conftest.SHALLOW), the second and the fourth sparse: modules of both kinds.
_SHALLOW_SPARSE = {**_SPARSE, **SHALLOW, "model.moe.every": 0, "model.moe.blocks": (1, 3)}


def test_sparse_modules_incubate_in_the_dense_meta_model_and_assemble(runs, tmp_path):
  """V-MoE modules (every other block: 4 experts, top 2, the load-balancing loss weighed in) incubated all at once in
  the tiny dense meta run, with the router's health logged; assembly stacks them and trains on; a dense config
  refuses them in one line naming the difference; `eval` reads the sparse assembly back to its result. (That a
  sparse module of `module=all` is the one its single-module run trains is checked on stitched students, in
  test_distill.py.)"""
  inc, asm = str(tmp_path / "inc"), str(tmp_path / "asm")
  modules = ",".join([inc] * 4)
  train.train(tiny("incubate", meta=runs["meta"], module="all", **_SHALLOW_SPARSE), inc)
  assert any("fc1_kernel" in name for name in _module(inc, 1))
  assert not any("fc1_kernel" in name for name in _module(inc, 2))
  with open(os.path.join(inc, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f if '"train"' in line][-1]
  shares = [logged[f"moe/module_1/blocks_0/expert_{e}"] for e in range(4)]
  assert abs(sum(shares) - 1.0) < 1e-6 and logged["moe/module_1/blocks_0/dropped"] == 0.0
  assert not any(key.startswith(("moe/module_0/", "moe/module_2/")) for key in logged)
  assert any(key.startswith("moe/module_3/blocks_0/") for key in logged)
  result = train.train(tiny("assemble", modules=modules, **_SHALLOW_SPARSE), asm)
  assert math.isfinite(result["loss"])
  # `eval` reads the sparse run back to its own result.
  again = train.evaluate_run(tiny("assemble", modules=modules, **_SHALLOW_SPARSE), asm)
  assert again["top1"] == pytest.approx(result["top1"]) and again["loss"] == pytest.approx(result["loss"], rel=1e-5)
  assert json.load(open(os.path.join(asm, records.RUN_FILE)))["arch"]["moe"] == {
      "experts": 4, "k": 2, "router": "topk_softmax", "capacity_factor": 0.0, "layout": [[], [0], [], [0]]}
  # `modassem.load` builds the sparse model the run trained: its logits are the ones evaluation computes.
  model, params = modassem.load(asm)
  assert params["module_1"]["blocks_0"]["mlp"]["fc1_kernel"].shape[0] == 4
  assert params["module_2"]["blocks_0"]["mlp"]["fc1"]["kernel"].ndim == 2
  images = jax.random.normal(jax.random.key(0), (3, model.image_size, model.image_size, 3))
  # Both jitted: one compilation each, where running them op by op compiles every operation of the model apart.
  sparse = tiny("assemble", **_SHALLOW_SPARSE)
  mine = jax.jit(lambda p, x: phases.forward(phases.make_plan(sparse), functools.partial(phases.model_for, sparse), p,
                                             {}, x, train=False, key=None)["model"])(params, images)
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, images), mine, rtol=1e-5, atol=1e-5)
  # And an incubated module's hybrid: module 1 sparse, the meta run's modules dense.
  model, params = modassem.load(inc, module=1)
  assert params["module_1"]["blocks_0"]["mlp"]["fc1_kernel"].shape[0] == 4
  assert params["module_2"]["blocks_0"]["mlp"]["fc1"]["kernel"].ndim == 2
  assert np.isfinite(np.asarray(jax.jit(model.apply)({"params": params}, images))).all()
  with pytest.raises(ModassemError, match=r"another architecture than this config \(moe \{.*'experts': 4.* vs None\)"):
    train.train(tiny("assemble", modules=modules, **SHALLOW), str(tmp_path / "dense"))
  # `report` on the sparse chain (against the session's dense e2e run): its numbers are the runs' own.
  r = report.make_report(*report.collect([asm, os.path.join(os.path.dirname(runs["meta"]), "e2e")]))
  with open(os.path.join(inc, records.RESULTS_FILE)) as f:
    incubated = json.load(f)
  assert r["phases"]["incubate"]["workdir"] == inc and r["phases"]["meta"]["workdir"] == runs["meta"]
  assert r["assembled"]["top1"] == result["top1"] and r["phases"]["incubate"]["top1"] == incubated["top1"]
  assert r["incubated_modules"]["module_1/top1"] == incubated["module_1/top1"]


def test_the_meta_phase_of_a_sparse_config_is_dense():
  """A sparse target's meta model is a ViT, as m2mKD's is: its meta phase builds and records the dense config's
  meta model, which that config's incubations read; its other phases are sparse where the layout says."""
  sparse, dense = tiny("meta", **_SPARSE), tiny("meta")
  assert records.arch_of(sparse) == records.arch_of(dense) and "moe" not in records.arch_of(sparse)
  assert phases.model_for(sparse, (1, 1, 1, 1)) == phases.model_for(dense, (1, 1, 1, 1))
  e2e = tiny("e2e", **_SPARSE)
  assert records.arch_of(e2e)["moe"]["layout"] == [[1], [1], [1], [1]]
  assert phases.model_for(e2e, e2e.model.depths).moe == moe.MoeSpec(experts=4, k=2)


@pytest.mark.parametrize("overrides, needle", [
    ({"model.moe.experts": 2, "model.moe.k": 3}, "model.moe.k=3 must be between 1 and model.moe.experts=2"),
    ({"model.moe.experts": 2, "model.moe.router": "softmax_topk", "model.moe.capacity_factor": -0.5},
     "model.moe.capacity_factor=-0.5 is out of range: it must be >= 0"),
    ({"model.moe.experts": 2, "model.moe.every": 0, "model.moe.blocks": (3, 8)},
     "model.moe.blocks=(3, 8) names block(s) [8] of a model of depth 8: use indices 0 to 7"),
    ({"model.moe.experts": 2, "model.moe.every": 3}, "no block has an MoE MLP"),
    ({"model.moe.experts": 2, "model.moe.every": 2, "model.scan": True}, "model.scan needs one kind of block"),
], ids=["k_above_experts", "capacity_below_0", "block_outside", "no_block", "scan_mixed"])
def test_bad_moe_settings_are_one_line(capsys, tmp_path, overrides, needle):
  args = [f"--config.{k}={v}" for k, v in overrides.items()]
  capsys.readouterr()
  assert cli.main(["train", f"--config={TINY}:e2e", *args, f"--workdir={tmp_path / 'run'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("modassem train: error: ") and needle in err and "\n" not in err, err
  assert not os.path.exists(tmp_path / "run")


def test_dropout_in_experts_split_over_devices_is_refused_in_one_line():
  """The experts' all-to-all runs no Flax module: dropout there is refused before anything is built, where the
  devices split the experts (8 experts on 8 devices), and allowed where they do not (on 3, each holds all)."""
  config = tiny("e2e", **{**_SPARSE, "model.moe.experts": 8, "model.dropout": 0.1, "batch_size": 24, "eval_batch_size": 24})
  plan = phases.make_plan(config)
  with pytest.raises(ModassemError, match=r"^model.dropout=0.1 inside MoE experts split over 8 devices"):
    checks.check_config(config, plan, 8, load_sources=False)
  checks.check_config(config, plan, 3, load_sources=False)

