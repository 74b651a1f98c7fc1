"""AdamW with the DeiT recipe: linear-scaled lr, warmup then cosine, decay mask."""

from __future__ import annotations

import jax
import optax

from modassem.models.vit import is_stacked

# Parameters that are not decayed besides biases and norm scales (DeiT's `no_weight_decay`).
_NO_DECAY = ("pos_embed", "cls_token")


def decay_mask(params):
  """True where weight decay applies: matrices and conv kernels, not embeddings' tokens."""
  def decays(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    # A scanned module's block parameters carry a leading block axis: a
    # stacked bias is 2-D and still a bias.
    ndim = x.ndim - 1 if is_stacked(path) else x.ndim
    return ndim > 1 and name not in _NO_DECAY
  return jax.tree_util.tree_map_with_path(decays, params)


def peak_lr(config) -> float:
  return config.optim.lr * config.batch_size / config.optim.lr_base_batch


def lr_schedule(config, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warmup from `warmup_lr`, then cosine down to `min_lr`, stepped every step.

  (The official code steps the schedule once per epoch; per step is what the
  recipe means and is smoother for short runs.)
  """
  o = config.optim
  peak = peak_lr(config)
  decay_steps = max(total_steps - warmup_steps, 1)
  cosine = optax.cosine_decay_schedule(peak, decay_steps, alpha=min(o.min_lr / peak, 1.0) if peak > 0 else 0.0)
  if warmup_steps <= 0:
    return cosine
  warmup = optax.linear_schedule(o.warmup_lr, peak, warmup_steps)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def make_optimizer(config, total_steps: int, warmup_steps: int) -> optax.GradientTransformation:
  o = config.optim
  adamw = optax.adamw(lr_schedule(config, total_steps, warmup_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay, mask=decay_mask)
  if o.clip_norm and o.clip_norm > 0:
    # Clipping acts whatever the precision (the official code only clips under AMP).
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
  return adamw
