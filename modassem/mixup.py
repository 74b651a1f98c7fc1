"""Mixup and CutMix on device, as timm's `mode="batch"` runs in the official code: one draw per group.

The official runs mix each GPU's batch on its own: one lambda, one box and one Mixup-or-CutMix choice per GPU
and step, the partner of example n the example at the mirrored place of that GPU's batch (16 to 32 draws per
2048-image ImageNet step). Here the global batch is cut into fixed groups of `group` examples (the official
per-GPU batch, whatever the devices here), each drawn for on its own, so the mix is the same on one device or
many. `group=0` draws once for the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_labels(labels, num_classes: int, smoothing: float):
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def symmetric_beta(key, alpha: float, uniforms=None):
  """One draw of Beta(alpha, alpha), as `jax.random.beta(key, alpha, alpha)` draws it but without its loop.

  Ulrich's method (Devroye, Non-Uniform Random Variate Generation, 1986, IX.4), exact for alpha > 1/2: with U and V
  uniform on [0, 1), 1/2 (1 + sqrt(1 - U^(2 / (2 alpha - 1))) cos(2 pi V)) is Beta(alpha, alpha). Two uniforms and
  a closed form, where `jax.random.beta` runs a rejection loop for each of two gamma draws: that loop was a fifth of
  a small model's train step as XLA compiles it (and about a third of its CPU compile time). Mixup's 0.8 and
  CutMix's 1.0 are above 1/2; smaller alphas take `jax.random.beta` on `key`. `uniforms` (U, V) where the caller
  has drawn them already; else they are drawn from `key`.
  """
  if alpha <= 0.5:
    return jax.random.beta(key, alpha, alpha)
  u, v = jax.random.uniform(key, (2,)) if uniforms is None else uniforms
  return 0.5 * (1.0 + jnp.sqrt(1.0 - u ** (2.0 / (2.0 * alpha - 1.0))) * jnp.cos(2.0 * jnp.pi * v))


def mix(key, images, targets, *, mixup: float, cutmix: float, switch_prob: float, prob: float):
  """Returns (images, targets) after Mixup (alpha `mixup`) or CutMix (alpha `cutmix`).

  With both on, CutMix is chosen with `switch_prob`; the whole thing applies with `prob`.
  """
  if (mixup <= 0 and cutmix <= 0) or prob <= 0:
    return images, targets
  # Everything random here from one draw (each call of JAX's PRNG is a loop that XLA:CPU compiles apart): two
  # uniforms for each lambda, the box centre's row and column, the switch, and whether to mix at all.
  u = jax.random.uniform(key, (8,))
  b, h, w, _ = images.shape
  flipped, flipped_targets = images[::-1], targets[::-1]

  # A lambda from its two uniforms; an alpha of 1/2 or less draws from a key of its own (`symmetric_beta`).
  beta = lambda i, alpha: symmetric_beta(jax.random.fold_in(key, i) if alpha <= 0.5 else None, alpha,
                                         u[2 * i:2 * i + 2])

  lam_mix = beta(0, mixup) if mixup > 0 else jnp.float32(1.0)
  mixed = lam_mix * images + (1.0 - lam_mix) * flipped

  # CutMix box: side ratio sqrt(1 - lam), centre uniform, clipped to the image;
  # lam is then corrected to the area actually pasted.
  lam_cut = beta(1, cutmix) if cutmix > 0 else jnp.float32(1.0)
  ratio = jnp.sqrt(1.0 - lam_cut)
  ch, cw = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
  # Uniform over the rows and columns (the minimum guards against u * h rounding up to h in float32).
  cy = jnp.minimum((u[4] * h).astype(jnp.int32), h - 1)
  cx = jnp.minimum((u[5] * w).astype(jnp.int32), w - 1)
  y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
  cut = jnp.where(box, flipped, images)
  lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)

  use_cut = u[6] < switch_prob if mixup > 0 and cutmix > 0 else jnp.asarray(cutmix > 0)
  apply = u[7] < prob
  lam = jnp.where(apply, jnp.where(use_cut, lam_cut, lam_mix), 1.0).astype(targets.dtype)
  images = jnp.where(apply, jnp.where(use_cut, cut, mixed), images).astype(images.dtype)
  return images, lam * targets + (1.0 - lam) * flipped_targets


def mix_groups(key, images, targets, *, group: int, **kw):
  """`mix` on each consecutive `group` examples of the batch with its own draw (`group` divides the batch)."""
  b = images.shape[0]
  if group <= 0 or group >= b:
    return mix(key, images, targets, **kw)
  n = b // group
  split = lambda x: x.reshape((n, group) + x.shape[1:])
  images, targets = jax.vmap(lambda k, x, t: mix(k, x, t, **kw))(jax.random.split(key, n), split(images),
                                                                  split(targets))
  return images.reshape((b,) + images.shape[2:]), targets.reshape((b,) + targets.shape[2:])
