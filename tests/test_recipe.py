"""Where the recipe follows the official code, checked against an independent computation of what that code does:
the float32 residual stream under bf16 (PyTorch AMP), PyTorch's Conv2d init for the patch embedding (timm's ViT
leaves it to PyTorch), and Mixup/CutMix drawn per GPU batch (timm's `mode="batch"` on each GPU). The learning-rate
schedule against timm's formula is in test_model.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modassem.mixup import mix_groups
from modassem.models.vit import ViT



def test_the_residual_stream_is_float32_under_bf16():
  """Twelve blocks that each add 2 * 2^-10 to every element of a stream of ones: a bf16 stream (8 bits of mantissa,
  steps of 2^-7 near 1) would round every addition away and stay at 1; float32 ends at 1 + 24 * 2^-10."""
  depth, delta = 12, 2.0 ** -10   # exact in bf16
  model = ViT(depths=(depth, 1), image_size=8, patch=4, width=16, heads=2, num_classes=3, dtype=jnp.bfloat16)
  images = jnp.zeros((2, 8, 8, 3), jnp.float32)
  params = jax.tree_util.tree_map(np.asarray, jax.jit(model.init)(jax.random.key(0), images)["params"])

  def edit(path, x):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if name.startswith("module_0/") and ("attn/proj" in name or "mlp/fc2" in name):
      return np.full_like(x, delta) if name.endswith("bias") else np.zeros_like(x)
    if name in ("module_0/patch_embed/kernel", "module_0/patch_embed/bias", "module_0/cls_token"):
      return np.zeros_like(x)
    if name == "module_0/pos_embed":
      return np.ones_like(x)
    return x
  params = jax.tree_util.tree_map_with_path(edit, params)
  stream = jax.jit(model.module(0).apply)({"params": params["module_0"]}, images)
  assert stream.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(stream), 1.0 + depth * 2 * delta, rtol=0, atol=1e-5)


def test_the_patch_embedding_starts_as_pytorchs_conv2d():
  """Kernel and bias uniform in +-1/sqrt(fan_in), as `torch.nn.Conv2d(3, width, p, stride=p)` initialises them."""
  torch = pytest.importorskip("torch")   # the reference; the tests of this file without it run without torch
  width, patch = 768, 8
  model = ViT(depths=(1,), image_size=16, patch=patch, width=width, heads=12, num_classes=2)
  conv = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))["params"]["module_0"]["patch_embed"]
  ours = {"kernel": np.asarray(conv["kernel"]), "bias": np.asarray(conv["bias"])}
  torch.manual_seed(0)
  ref = torch.nn.Conv2d(3, width, patch, stride=patch)
  theirs = {"kernel": ref.weight.detach().numpy(), "bias": ref.bias.detach().numpy()}
  bound = (3 * patch * patch) ** -0.5
  for name in ("kernel", "bias"):
    a, b = ours[name], theirs[name]
    assert np.abs(a).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(a).max() > 0.99 * bound and np.abs(b).max() > 0.99 * bound
    assert a.std() == pytest.approx(b.std(), rel=0.1 if name == "bias" else 0.03), name
    assert abs(a.mean()) < 0.1 * bound


def test_dense_kernels_and_tokens_start_as_timms_trunc_normal():
  """Every Dense kernel, the class token and the position embedding are drawn as timm's `trunc_normal_(std=.02)`
  draws them: cut at +-2 in absolute value, i.e. at +-100 sigma, so a normal of std 0.02 (a cut at +-2 sigma, as
  Flax's default truncated normal makes, leaves 0.0176). Compared with PyTorch's own sampler: the standard
  deviations, and a two-sample Kolmogorov-Smirnov test of the whole distribution."""
  stats = pytest.importorskip("scipy.stats")
  torch = pytest.importorskip("torch")
  model = ViT(depths=(1,), image_size=16, patch=8, width=192, heads=3, num_classes=10)
  p = jax.jit(model.init)(jax.random.key(2), jnp.zeros((1, 16, 16, 3)))["params"]["module_0"]
  leaves = {"qkv": p["blocks_0"]["attn"]["qkv"]["kernel"], "proj": p["blocks_0"]["attn"]["proj"]["kernel"],
            "fc1": p["blocks_0"]["mlp"]["fc1"]["kernel"], "fc2": p["blocks_0"]["mlp"]["fc2"]["kernel"],
            "head": p["head"]["kernel"], "tokens": jnp.concatenate([p["cls_token"].ravel(), p["pos_embed"].ravel()])}
  torch.manual_seed(0)
  for name, leaf in leaves.items():
    ours = np.asarray(leaf, np.float64).ravel()
    theirs = torch.nn.init.trunc_normal_(torch.empty(ours.size, dtype=torch.float64), std=0.02).numpy()
    # The standard error of a std estimated from n normal draws is std / sqrt(2n).
    tol = 4 * 0.02 / np.sqrt(2 * min(ours.size, theirs.size))
    assert abs(ours.std() - theirs.std()) < 2 * tol, (name, ours.std(), theirs.std())
    assert abs(ours.std() - 0.02) < tol, (name, ours.std())
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3, name


def test_moe_experts_and_gate_start_as_the_reference_draws_them():
  """m2mKD's V-MoE: the experts keep fastmoe's init, `kaiming_uniform_(a=sqrt(5))` on the (experts, out, in)
  stack with zero biases; the gate is an `nn.Linear`, which timm's init draws as `trunc_normal_(std=.02)` with a
  zero bias. Compared with PyTorch's own samplers on tensors of the reference's shapes: the bounds, the standard
  deviations, and a two-sample Kolmogorov-Smirnov test."""
  from modassem.models.moe import MoeMlp  # pylint: disable=g-import-not-at-top
  stats = pytest.importorskip("scipy.stats")
  torch = pytest.importorskip("torch")
  experts, width, hidden = 4, 64, 256
  layer = MoeMlp(width=width, hidden=hidden, num_experts=experts, k=2)
  p = jax.jit(functools.partial(layer.init, train=False))(jax.random.key(0), jnp.zeros((2, 3, width)))["params"]
  torch.manual_seed(0)
  # fastmoe's FMoELinear: weight (experts, out, in), bias zeros; htoh4 is width -> hidden, h4toh hidden -> width.
  for name, (out, inp) in (("fc1_kernel", (hidden, width)), ("fc2_kernel", (width, hidden))):
    theirs = torch.empty(experts, out, inp, dtype=torch.float64)
    torch.nn.init.kaiming_uniform_(theirs, a=np.sqrt(5))
    ours, theirs = np.asarray(p[name], np.float64).ravel(), theirs.numpy().ravel()
    bound = 1 / np.sqrt(width * hidden)
    assert np.abs(ours).max() <= bound and np.abs(ours).max() > 0.99 * bound, name
    assert ours.std() == pytest.approx(theirs.std(), rel=0.02), name
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3, name
  for name in ("fc1_bias", "fc2_bias"):
    assert not np.asarray(p[name]).any(), name
  gate = np.asarray(p["gate"]["kernel"], np.float64).ravel()
  theirs = torch.nn.init.trunc_normal_(torch.empty(gate.size * 50, dtype=torch.float64), std=0.02).numpy()
  assert gate.std() == pytest.approx(0.02, rel=0.15) and stats.ks_2samp(gate, theirs).pvalue > 1e-3
  assert not np.asarray(p["gate"]["bias"]).any()


def batch(b=12, hw=8, classes=5):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(b, hw, hw, 3)).astype(np.float32)
  targets = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, b)]
  return images, targets


def _mixed(key, images, targets, **settings):
  """`mix_groups` as the train step runs it: compiled, the settings fixed."""
  return jax.jit(functools.partial(mix_groups, switch_prob=0.5, prob=1.0, **settings))(key, images, targets)


def test_mixup_draws_one_lambda_per_group_and_mixes_within_it():
  """timm's Mixup on each GPU's batch of 4: x * lam + x.flip(0) * (1 - lam), one lam per GPU batch."""
  images, targets = batch()
  out, t = map(np.asarray, _mixed(jax.random.key(3), images, targets, group=4, mixup=0.8, cutmix=0.0))
  lams = []
  for g in range(3):
    x, y = images[4 * g:4 * g + 4], targets[4 * g:4 * g + 4]
    partner, partner_t = x[::-1], y[::-1]
    lam = ((out[4 * g:4 * g + 4] - partner) / (x - partner))[0, 0, 0, 0]
    np.testing.assert_allclose(out[4 * g:4 * g + 4], lam * x + (1 - lam) * partner, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t[4 * g:4 * g + 4], lam * y + (1 - lam) * partner_t, rtol=1e-5, atol=1e-5)
    lams.append(float(lam))
  assert len({round(v, 6) for v in lams}) == 3, lams


def test_cutmix_draws_one_box_per_group():
  """timm's CutMix on each GPU's batch: one box pasted from the mirrored partner, target weight = uncovered area."""
  images, targets = batch(b=16, hw=16)
  out, t = map(np.asarray, _mixed(jax.random.key(5), images, targets, group=4, mixup=0.0, cutmix=1.0))
  boxes = []
  for g in range(4):
    x, y = images[4 * g:4 * g + 4], targets[4 * g:4 * g + 4]
    o = out[4 * g:4 * g + 4]
    pasted = np.all(o == x[::-1], axis=-1) & ~np.all(o == x, axis=-1)
    kept = np.all(o == x, axis=-1)
    assert np.all(pasted | kept)
    assert np.all(pasted == pasted[:1])                 # the same box for the whole group
    lam = 1.0 - pasted[0].mean()
    np.testing.assert_allclose(t[4 * g:4 * g + 4], lam * y + (1 - lam) * y[::-1], rtol=1e-5, atol=1e-6)
    boxes.append(pasted[0].tobytes())
  assert len(set(boxes)) > 1


def test_mixup_or_cutmix_is_chosen_and_applied_at_their_rates():
  """Over 4000 draws: the whole thing applies with `prob` (0.6) and, where it applies, CutMix is chosen with
  `switch_prob` (0.5), the two choices independent; a CutMix output is a paste (each pixel the example's or its
  partner's), a Mixup output a blend. Binomial bounds of 4 standard deviations."""
  n, rng = 4000, np.random.default_rng(0)
  images = rng.normal(size=(2, 32, 32, 1)).astype(np.float32)
  targets = np.eye(2, dtype=np.float32)
  mix = jax.jit(jax.vmap(lambda k: mix_groups(k, images, targets, group=0, mixup=0.8, cutmix=1.0, switch_prob=0.5,
                                              prob=0.6)[0]))
  out = np.asarray(mix(jax.random.split(jax.random.key(0), n)))
  own, partner = out == images, out == images[::-1]
  unchanged = own.all(axis=(1, 2, 3, 4))
  pasted = ~unchanged & (own | partner).all(axis=(1, 2, 3, 4))
  bound = lambda p, m: 4 * np.sqrt(p * (1 - p) / m)
  # An empty box (a lambda within 4/32**2 of 1) also leaves a CutMix unchanged: about 0.4 % of CutMixes.
  assert unchanged.mean() == pytest.approx(0.4 + 0.6 * 0.5 * 0.004, abs=bound(0.4, n))
  assert pasted[~unchanged].mean() == pytest.approx(0.5, abs=bound(0.5, (~unchanged).sum()))


def test_group_zero_is_one_draw_for_the_whole_batch():
  images, targets = batch()
  out = np.asarray(_mixed(jax.random.key(3), images, targets, group=0, mixup=0.8, cutmix=0.0)[0])
  lam = ((out - images[::-1]) / (images - images[::-1]))[0, 0, 0, 0]
  np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-5)
