"""AdamW with the DeiT recipe: linear-scaled lr, the official warmup and cosine, decay mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


def schedule_values(config, total_steps: int, warmup_steps: int) -> dict:
  """The numbers that set a run's learning rate schedule (`lr_at`), as float32 scalars.

  The train step takes them as an argument rather than closing over them as constants: runs that differ only in
  length, warmup or learning rate then share one compiled step (from JAX's persistent compilation cache, when it is
  on), and a resume with a changed `optim.lr` compiles nothing new.
  """
  o = config.optim
  return {name: np.float32(value) for name, value in (
      ("peak", peak_lr(config)), ("warmup_lr", float(o.warmup_lr)), ("min_lr", float(o.min_lr)),
      ("total", max(int(total_steps), 1)), ("warmup", max(int(warmup_steps), 0)))}


def lr_at(step, values: dict):
  """The official scheduler's learning rate at `step`, from `schedule_values` (concrete or traced).

  The official runs use timm's `CosineLRScheduler` as DeiT builds it
  (`t_initial` = the run's length, `warmup_t`, `warmup_lr_init`, `lr_min`,
  one cycle, `warmup_prefix=False`): a linear warmup from `warmup_lr` to the
  peak, and one cosine from the peak at step 0 to `min_lr` at the last step,
  warmup included. So the cosine does not restart after the warmup: at its
  end the rate is already slightly below the peak (0.9 of it after 20 of 100
  incubation epochs). The official code steps it once per epoch; here `t` is
  the step, which is the same curve, sampled more finely. Written out rather
  than with `optax.join_schedules`, which restarts the count at each boundary.
  """
  v = {name: jnp.asarray(x, jnp.float32) for name, x in values.items()}
  t = jnp.asarray(step, jnp.float32)
  peak, warmup_lr, min_lr, total, warmup = v["peak"], v["warmup_lr"], v["min_lr"], v["total"], v["warmup"]
  cosine = min_lr + 0.5 * (peak - min_lr) * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t, total) / total))
  # With no warmup `t < warmup` never holds; the division is kept finite all the same.
  return jnp.where(t < warmup, warmup_lr + t * (peak - warmup_lr) / jnp.maximum(warmup, 1.0), cosine)


def lr_schedule(config, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """`lr_at` for this config and run length, as an optax schedule."""
  values = schedule_values(config, total_steps, warmup_steps)
  return lambda step: lr_at(step, values)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW (after clipping, where set) at `schedule`'s rate. Its state does not depend on the schedule: an optimizer
  built for the state's init and one built inside the step on the traced `schedule_values` share it."""
  o = config.optim
  adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay, mask=decay_mask)
  if o.clip_norm and o.clip_norm > 0:
    # Clipping acts whatever the precision (the official code only clips under AMP).
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
  return adamw
