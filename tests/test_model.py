"""The model, the presets and the recipe's pieces, checked against the paper's numbers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from modassem import config as config_lib, mixup, optim, phases, sharding
from modassem.models.vit import ViT, ViTModule, drop_path_rates, stack_blocks, unstack_blocks
from modassem.errors import ModassemError


def _params(model):
  image = jnp.zeros((1, model.image_size, model.image_size, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), image))["params"]


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("preset, millions", [
    ("vit_b", 87), ("vit_l", 304), ("vit_h", 632), ("deit_ti", 5.7), ("deit_t32_cifar", 14.5),
    ("deit_t128_cifar", 57.2)])
def test_preset_sizes_match_the_paper(preset, millions):
  config = config_lib.load(f"{REPO}/configs/{preset}.py:e2e")
  # Scanned: one traced block per module, so the 128-block preset traces in a moment; the count is the same.
  params = _params(phases.model_for(config, config.model.depths, scan=True))
  assert _count(params) / 1e6 == pytest.approx(millions, rel=0.02)
  assert set(params) == {f"module_{k}" for k in range(4)}


def _vit_b16_parameters(moe_blocks: int, experts: int = 8) -> int:
  """ViT-B/16's parameter count written out (timm's: 86,567,656), with `moe_blocks` MLPs made `experts` experts
  and a gate (a Linear with bias)."""
  w, hidden, tokens = 768, 3072, 14 * 14 + 1
  mlp = w * hidden + hidden + hidden * w + w
  block = 4 * w + (w * 3 * w + 3 * w) + (w * w + w) + mlp
  dense = (16 * 16 * 3 * w + w) + w + tokens * w + 12 * block + 2 * w + (w * 1000 + 1000)
  assert dense == 86_567_656
  return dense + moe_blocks * (experts * mlp + w * experts + experts - mlp)


def test_vmoe_presets_are_the_references():
  """m2mKD's V-MoE-B student and its recipe (configs/vmoe_b16.py), and Google's routing (vmoe_b16_google.py)."""
  c = config_lib.load(f"{REPO}/configs/vmoe_b16.py:incubate")
  assert dict(c.model.moe) == {"experts": 8, "k": 2, "every": 1, "blocks": (), "router": "topk_softmax",
                               "capacity_factor": 0.0, "noise_std": 0.0, "aux_weight": 0.0}
  assert c.model.depths == (3, 3, 3, 3) and c.stitch and (c.model.width, c.model.heads, c.model.patch) == (768, 12, 16)
  assert (c.batch_size, c.epochs, c.warmup_epochs, c.model.drop_path, c.optim.clip_norm) == (2048, 100, 20, 0.1, 0)
  assert optim.peak_lr(c) == pytest.approx(2e-3)
  for phase in ("assemble", "e2e"):
    c = config_lib.load(f"{REPO}/configs/vmoe_b16.py:{phase}")
    assert (c.batch_size, c.epochs, c.warmup_epochs, c.model.drop_path, c.optim.clip_norm) == (1024, 100, 0, 0.1, 1)
    assert optim.peak_lr(c) == pytest.approx(1e-3) and not c.stitch
  # Every block sparse: one kind of block, so the count can come from a scanned model.
  assert _count(_params(phases.model_for(c, c.model.depths, scan=True))) == _vit_b16_parameters(12)
  with pytest.raises(ModassemError, match="m2mKD's meta model is ViT-L's: train it with configs/vit_l.py:meta"):
    config_lib.load(f"{REPO}/configs/vmoe_b16.py:meta")
  g = config_lib.load(f"{REPO}/configs/vmoe_b16_google.py:e2e")
  assert (g.model.moe.router, g.model.moe.k, g.model.moe.capacity_factor, g.model.moe.noise_std,
          g.model.moe.aux_weight, g.model.moe.blocks) == ("softmax_topk", 2, 1.05, 0.125, 0.01, (1, 3, 5, 7, 9, 11))
  assert _count(_params(phases.model_for(g, g.model.depths))) == _vit_b16_parameters(6)


def test_vit_h_has_no_qkv_bias_and_eps_1e_5():
  config = config_lib.load(f"{REPO}/configs/vit_h.py:e2e")
  assert config.model.qkv_bias is False and config.model.ln_eps == 1e-5
  params = _params(phases.model_for(config, (1, 1, 1, 1)))
  assert "bias" not in params["module_1"]["blocks_0"]["attn"]["qkv"]


def test_module_0_owns_the_stem_and_the_last_module_the_head():
  model = ViT(depths=(2, 1, 3), image_size=8, patch=4, width=16, heads=2, num_classes=7)
  params = _params(model)
  assert set(params["module_0"]) == {"patch_embed", "cls_token", "pos_embed", "blocks_0", "blocks_1"}
  assert set(params["module_1"]) == {"blocks_0"}
  assert set(params["module_2"]) == {"blocks_0", "blocks_1", "blocks_2", "norm", "head"}
  assert params["module_0"]["pos_embed"].shape == (1, 5, 16)
  assert params["module_2"]["head"]["kernel"].shape == (16, 7)


def test_drop_path_is_linear_over_the_whole_model():
  assert drop_path_rates(0.1, 5) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
  model = ViT(depths=(1, 3, 1, 1), drop_path=0.5)
  # Module 2's only block is the fifth of six.
  assert model.module(2).block_offset == 4 and model.module(2).total_depth == 6


def test_drop_path_and_dropout_only_in_training():
  model = ViT(depths=(1, 1), image_size=8, patch=4, width=16, heads=2, num_classes=3, drop_path=0.5)
  x = jnp.ones((4, 8, 8, 3))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  train, evaluate = jax.jit(functools.partial(model.apply, train=True)), jax.jit(model.apply)
  a, b = (train({"params": params}, x, rngs={"dropout": jax.random.key(i)}) for i in (1, 2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(evaluate({"params": params}, x), evaluate({"params": params}, x))


def test_a_drop_path_of_one_always_drops_the_last_blocks_branches_with_finite_gradients():
  """The rates rise to `drop_path` at the last block: at 1 its branches never run, and get no gradient."""
  model = ViT(depths=(1, 1), image_size=8, patch=4, width=16, heads=2, num_classes=3, drop_path=1.0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, x, train=True,
                                                  rngs={"dropout": jax.random.key(1)}).sum()))(params)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
  last, first = grads["module_1"]["blocks_0"], grads["module_0"]["blocks_0"]
  assert all((np.asarray(g) == 0).all() for g in jax.tree_util.tree_leaves(last))
  assert any(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(first))


def test_bfloat16_compute_keeps_float32_params():
  model = ViT(depths=(1, 1), image_size=8, patch=4, width=16, heads=2, num_classes=3, dtype=jnp.bfloat16)
  x = jnp.ones((2, 8, 8, 3))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  assert jax.jit(model.apply)({"params": params}, x).dtype == jnp.float32


@pytest.mark.parametrize("phase, epochs, warmup, drop_path, clip", [
    ("meta", 300, 20, 0.0, 0.0), ("incubate", 100, 20, 0.1, 0.0), ("assemble", 100, 0, 0.1, 1.0),
    ("e2e", 300, 5, 0.1, 0.0)])
def test_phase_defaults_are_the_official_ones(phase, epochs, warmup, drop_path, clip):
  c = config_lib.load(f"{REPO}/configs/vit_b.py:{phase}")
  assert (c.epochs, c.warmup_epochs, c.model.drop_path, c.optim.clip_norm) == (epochs, warmup, drop_path, clip)
  assert optim.peak_lr(c) == pytest.approx(2e-3)
  assert c.batch_size == 2048 and c.label_smoothing == 0.1 and (c.mixup, c.cutmix) == (0.8, 1.0)
  assert config_lib.load(f"{REPO}/configs/vit_l.py:assemble").model.drop_path == 0.5
  assert config_lib.load(f"{REPO}/configs/vit_h.py:assemble").model.drop_path == 0.6


def official_lr(t, *, base, warmup_lr, min_lr, warmup, total):
  """timm's CosineLRScheduler as DeiT's `create_scheduler` builds it for the official runs (t_initial=total,
  warmup_t=warmup, warmup_lr_init=warmup_lr, lr_min=min_lr, cycle_limit=1, cycle_mul=1, cycle_decay=1,
  warmup_prefix=False), evaluated at time t; written from timm's formula, in float64."""
  if t < warmup:
    return warmup_lr + t * (base - warmup_lr) / warmup
  cycle, t_curr = divmod(t, total)   # warmup_prefix=False: the cosine's clock includes the warmup
  if cycle >= 1:                     # past the one cycle: lr_min
    return min_lr
  return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t_curr / total))


@pytest.mark.parametrize("phase", ["meta", "incubate", "assemble", "e2e"])
def test_schedule_is_the_official_schedulers_formula(phase):
  """Each phase's warmup and cosine, on the official scheduler's clock counted in steps (10 per epoch)."""
  c = config_lib.load(f"{REPO}/configs/vit_b.py:{phase}")
  total, warmup = int(c.epochs * 10), int(c.warmup_epochs * 10)
  sched = optim.lr_schedule(c, total_steps=total, warmup_steps=warmup)
  want = [official_lr(t, base=2e-3, warmup_lr=1e-6, min_lr=1e-5, warmup=warmup, total=total) for t in range(total + 5)]
  got = np.asarray(jax.vmap(sched)(jnp.arange(total + 5)))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9)
  # The cosine runs over the whole run: after incubation's warmup (20 of 100 epochs) the rate is 0.9 of the peak.
  if phase == "incubate":
    assert float(sched(warmup)) == pytest.approx(1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * 0.2)))


# A new value for every field the trainer treats as run-only (memo.RUN_ONLY), by the phase that has it.
_RUN_ONLY_CHANGES = {
    "e2e": {"seed": 7, "total_steps": 40, "warmup_steps": 5, "epochs": 3.0, "warmup_epochs": 1.0, "optim.lr": 1e-3,
            "optim.warmup_lr": 1e-5, "optim.min_lr": 1e-6, "optim.lr_base_batch": 256, "data.random_erase": 0.5,
            "data.path": "/elsewhere", "data.threads": 3, "eval_batch_size": 16, "eval_every_steps": 5,
            "log_every_steps": 1, "checkpoint_every_steps": 1, "keep_checkpoints": 1, "progress": "on"},
    "incubate": {"meta": "/meta/a", "teacher": "/teacher/a"},
    "assemble": {"modules": "/a,/b,/c,/d", "allow_mixed_meta": True},
}


def test_runs_that_differ_in_run_only_fields_share_one_lowered_step():
  """Every field kept out of a step's program key, changed at once, leaves the lowered program as it was (compared
  on fresh lowerings): the schedule's numbers are an argument of the step, not constants in it, and each run's own
  go in beside it. Through the key, such a run gets the very step lowered before; a field the step reads gets its
  own."""
  from conftest import SHALLOW, tiny
  from modassem import memo, prepare
  assert {"data" if k.startswith("data.") else k for c in _RUN_ONLY_CHANGES.values() for k in c} == memo.RUN_ONLY
  # One block per module: the key does not depend on the depth.
  lower = lambda phase, **kw: prepare.lower_train_step(prepare.abstract_setup(
      tiny(phase, **SHALLOW, **kw), kw.get("total_steps", 6), kw.get("warmup_steps", 2)))
  base = {"e2e": {}, "incubate": {"module": "1", "meta": "/meta/b", "teacher": "/teacher/b"},
          "assemble": {"modules": ""}}
  for phase, changes in _RUN_ONLY_CHANGES.items():
    memo.forget()
    first = lower(phase, **base[phase])
    memo.forget()
    other = lower(phase, **{**base[phase], **changes})
    assert other.step is not first.step and other.step.as_text() == first.step.as_text(), phase
    assert lower(phase, **base[phase]).step is other.step
    if phase == "e2e":
      assert {k: float(v) for k, v in other.schedule.items()} == pytest.approx(
          {"peak": 1e-3 * 32 / 256, "warmup_lr": 1e-5, "min_lr": 1e-6, "total": 40.0, "warmup": 5.0})
      assert float(first.schedule["total"]) == 6.0 and float(first.schedule["warmup"]) == 2.0
      reads = lower(phase, mixup=0.5)
      assert reads.step is not first.step and reads.step.as_text() != first.step.as_text()


def test_a_lowered_program_is_counted_once(monkeypatch):
  """XLA's count of a lowered step is kept with it: a run that gets a step lowered before gets its count too."""
  from modassem import cost
  low = jax.jit(lambda a, b: a @ b).trace(jnp.ones((8, 4)), jnp.ones((4, 3))).lower()
  assert cost.lowered_flops(low) == 2 * 8 * 4 * 3

  def recount():
    raise AssertionError("counted again")
  monkeypatch.setattr(low, "cost_analysis", recount)
  assert cost.lowered_flops(low) == 2 * 8 * 4 * 3


def test_a_models_shapes_are_traced_once_per_process_and_handed_out_as_copies():
  from modassem.models import vit
  kw = dict(image_size=8, patch=4, width=16, heads=2, num_classes=3)
  first = vit.abstract_params(ViT(depths=(1, 2), **kw))
  hits = vit._abstract_params.cache_info().hits
  first["module_0"] = None   # a caller's change stays its own
  again = vit.abstract_params(ViT(depths=(1, 2), **kw))
  assert vit._abstract_params.cache_info().hits == hits + 1
  fresh = jax.eval_shape(lambda: ViT(depths=(1, 2), **kw).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))["params"]
  assert again == fresh and again["module_1"]["blocks_1"]["mlp"]["fc1"]["kernel"].shape == (16, 64)
  assert vit.abstract_params(ViT(depths=[1, 2], **kw)) == fresh   # a list of depths: not hashable, traced afresh


def test_weight_decay_skips_biases_norms_and_tokens():
  params = _params(ViT(depths=(1, 1), image_size=8, patch=4, width=16, heads=2, num_classes=3))
  mask = optim.decay_mask(params)
  m0, m1 = mask["module_0"], mask["module_1"]
  assert m0["patch_embed"]["kernel"] and m0["blocks_0"]["attn"]["qkv"]["kernel"] and m1["head"]["kernel"]
  assert not (m0["pos_embed"] or m0["cls_token"] or m0["blocks_0"]["attn"]["qkv"]["bias"]
              or m0["blocks_0"]["norm1"]["scale"] or m1["norm"]["bias"])


@pytest.mark.parametrize("alpha_mix, alpha_cut", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_and_cutmix_mix_images_and_targets_consistently(alpha_mix, alpha_cut):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)
  labels = jnp.arange(8) % 4
  targets = mixup.smooth_labels(labels, 4, 0.1)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  assert float(targets.max()) == pytest.approx(0.925)
  changed = 0
  mix = jax.jit(functools.partial(mixup.mix, mixup=alpha_mix, cutmix=alpha_cut, switch_prob=0.5, prob=1.0))
  for seed in range(6):
    mixed, t = mix(jax.random.key(seed), images, targets)
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    # Every example is a blend of itself and its partner (B-1-n), with the target's weight.
    lam = (t[0] - targets[7]) / (targets[0] - targets[7])
    lam = float(lam[labels[0]])
    if alpha_cut and not alpha_mix:
      pasted = np.asarray(mixed[0] != images[0]).any(-1).mean()
      assert 1 - lam == pytest.approx(pasted, abs=1e-6)
    changed += not np.allclose(mixed, images)
  assert changed > 0
  same, t = mixup.mix(jax.random.key(0), images, targets, mixup=0.0, cutmix=0.0, switch_prob=0.5, prob=1.0)
  np.testing.assert_array_equal(same, images)
  np.testing.assert_array_equal(t, targets)


@pytest.mark.parametrize("alpha", [0.8, 1.0, 3.0, 0.4])
def test_the_mixing_weight_is_beta_distributed(alpha):
  """Mixup's and CutMix's lambda, Beta(alpha, alpha) (the official code draws it with NumPy), against SciPy's
  distribution: a Kolmogorov-Smirnov test of 20,000 draws, and the mean and variance; 0.4 takes JAX's sampler."""
  import scipy.stats  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: mixup.symmetric_beta(k, alpha)))(keys), np.float64)
  assert ((draws >= 0) & (draws <= 1)).all()
  assert scipy.stats.kstest(draws, scipy.stats.beta(alpha, alpha).cdf).pvalue > 0.01
  assert draws.mean() == pytest.approx(0.5, abs=0.01)
  assert draws.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.03)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_rematerialisation_gives_the_same_loss_and_gradients(remat):
  kwargs = dict(depths=(2, 1), image_size=8, patch=4, width=16, heads=2, num_classes=3, drop_path=0.2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
  params = jax.jit(ViT(**kwargs).init)(jax.random.key(0), x)["params"]

  def loss(model, p):
    return model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)}).sum()

  plain = jax.jit(jax.value_and_grad(lambda p: loss(ViT(**kwargs), p)))(params)
  remat_ = jax.jit(jax.value_and_grad(lambda p: loss(ViT(**kwargs, remat=remat), p)))(params)
  np.testing.assert_allclose(remat_[0], plain[0], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(remat_[1]), jax.tree_util.tree_leaves(plain[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="remat"):
    ViT(**kwargs, remat="some").init(jax.random.key(0), x)


def test_attention_takes_cudnn_only_where_it_applies():
  from modassem.models.vit import attention_implementation as impl
  assert impl("auto", "gpu", jnp.bfloat16, 64) == "cudnn"
  assert impl("auto", "gpu", jnp.bfloat16, 80) == "cudnn"      # ViT-H/14's head dim
  assert impl("auto", "gpu", jnp.float32, 64) == "xla"
  assert impl("auto", "gpu", jnp.bfloat16, 12) == "xla"
  assert impl("auto", "cpu", jnp.bfloat16, 64) == "xla"
  assert impl("auto", "tpu", jnp.bfloat16, 64) == "xla"
  assert impl("xla", "gpu", jnp.bfloat16, 64) == "xla"
  with pytest.raises(ValueError, match="attention"):
    impl("flash", "gpu", jnp.bfloat16, 64)


# --- nn.scan over a module's blocks -------------------------------------------

def test_scanned_blocks_compute_what_the_per_block_model_computes():
  # Rematerialised too: inside the scan it runs without CSE barriers. In training, each block drops the same
  # branches scanned or not: the module draws its blocks' stochastic depth at once.
  kwargs = dict(depths=(1, 3, 2, 2), image_size=8, patch=4, width=16, heads=2, num_classes=3, remat="full",
                drop_path=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
  plain, scanned = ViT(**kwargs), ViT(**kwargs, scan=True)
  params = jax.jit(plain.init)(jax.random.key(0), x)["params"]
  stacked = jax.jit(stack_blocks)(params)
  # The stacked layout is exactly what the scanned model declares, and converts back losslessly.
  want = jax.eval_shape(lambda: scanned.init(jax.random.key(0), x))["params"]
  assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(want)
  assert [a.shape for a in jax.tree_util.tree_leaves(stacked)] == [a.shape for a in jax.tree_util.tree_leaves(want)]
  assert stacked["module_1"]["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 16, 48)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.jit(unstack_blocks)(stacked), params)

  np.testing.assert_allclose(jax.jit(scanned.apply)({"params": stacked}, x),
                             jax.jit(plain.apply)({"params": params}, x), rtol=1e-5, atol=1e-6)

  def loss(model, p):
    return model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)}).sum()

  dropped = jax.jit(lambda p: loss(plain, p))(params)
  assert abs(dropped - jax.jit(plain.apply)({"params": params}, x).sum()) > 1e-3   # some branches were dropped
  np.testing.assert_allclose(jax.jit(lambda p: loss(scanned, p))(stacked), dropped, rtol=1e-5)
  g_plain = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
  g_scan = jax.jit(lambda p: unstack_blocks(jax.grad(lambda q: loss(scanned, q))(p)))(stacked)
  for a, b in zip(jax.tree_util.tree_leaves(g_scan), jax.tree_util.tree_leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_each_block_drops_its_branches_at_its_own_rate(scan):
  """Module 1 of 3 holds blocks 1 and 2 of a 3-block model: rates p/2 and p.

  Block 1's branches are zeroed, so it passes its input through whatever it
  drops; an example comes out unchanged exactly when block 2 drops both of
  its branches, which happens with probability p**2 (p/2 would give p**2/4).
  """
  p, n = 0.6, 4000
  module = ViTModule(index=1, num_modules=3, depth=2, block_offset=1, total_depth=3, image_size=8, patch=4,
                     width=16, heads=2, mlp_ratio=4.0, qkv_bias=True, ln_eps=1e-6, num_classes=3, drop_path=p,
                     scan=scan)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(n, 5, 16)), jnp.float32)
  params = jax.jit(lambda k: unstack_blocks({"m": module.init(k, x[:1])["params"]})["m"])(jax.random.key(0))
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: np.zeros_like(a) if "blocks_0" in jax.tree_util.keystr(path)
      and ("proj" in jax.tree_util.keystr(path) or "fc2" in jax.tree_util.keystr(path)) else a, params)
  if scan:
    params = jax.jit(stack_blocks)({"m": params})["m"]
  out = jax.jit(functools.partial(module.apply, train=True))({"params": params}, x, rngs={"dropout": jax.random.key(3)})
  unchanged = np.asarray((out == x).all(axis=(1, 2))).mean()
  assert unchanged == pytest.approx(p ** 2, abs=0.04)
  # In evaluation nothing is dropped.
  assert not np.asarray((jax.jit(module.apply)({"params": params}, x) == x).all(axis=(1, 2))).any()


def test_scanned_layout_keeps_decay_mask_and_never_splits_the_block_axis():
  model = ViT(depths=(2, 2), image_size=8, patch=4, width=16, heads=2, num_classes=3)
  params = _params(model)
  mask, stacked_mask = optim.decay_mask(params), optim.decay_mask(jax.eval_shape(stack_blocks, params))
  blocks = stacked_mask["module_0"]["blocks"]
  assert blocks["attn"]["qkv"]["kernel"] and blocks["mlp"]["fc1"]["kernel"]
  assert not (blocks["attn"]["qkv"]["bias"] or blocks["norm1"]["scale"] or blocks["mlp"]["fc2"]["bias"])
  assert stacked_mask["module_0"]["patch_embed"] == mask["module_0"]["patch_embed"]
  # FSDP splits the largest evenly divisible dimension, never a stack's block axis.
  assert sharding._fsdp_spec((16, 12), 8) == sharding.P("data", None)
  assert sharding._fsdp_spec((16, 12), 8, stacked=True) == sharding.P()
  assert sharding._fsdp_spec((8, 16, 48), 8, stacked=True) == sharding.P(None, None, "data")
