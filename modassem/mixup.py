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


def mix(key, images, targets, *, mixup: float, cutmix: float, switch_prob: float, prob: float):
  """Returns (images, targets) after Mixup (alpha `mixup`) or CutMix (alpha `cutmix`).

  With both on, CutMix is chosen with `switch_prob`; the whole thing applies with `prob`.
  """
  if (mixup <= 0 and cutmix <= 0) or prob <= 0:
    return images, targets
  k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 6)
  b, h, w, _ = images.shape
  flipped, flipped_targets = images[::-1], targets[::-1]

  lam_mix = jax.random.beta(k_mix, mixup, mixup) if mixup > 0 else jnp.float32(1.0)
  mixed = lam_mix * images + (1.0 - lam_mix) * flipped

  # CutMix box: side ratio sqrt(1 - lam), centre uniform, clipped to the image;
  # lam is then corrected to the area actually pasted.
  lam_cut = jax.random.beta(k_cut, cutmix, cutmix) if cutmix > 0 else jnp.float32(1.0)
  ratio = jnp.sqrt(1.0 - lam_cut)
  ch, cw = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
  cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
  y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
  cut = jnp.where(box, flipped, images)
  lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)

  if mixup > 0 and cutmix > 0:
    use_cut = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cut = jnp.asarray(cutmix > 0)
  apply = jax.random.uniform(k_apply) < prob
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
