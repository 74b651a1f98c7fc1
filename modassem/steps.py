"""The compiled core: train state, one train step and one eval step for every plan.

Both steps are pure functions of (state, frozen meta modules, batch, key), the
train step also of the learning rate schedule's numbers; `train.py` jits them
against the mesh's shardings. The gradient is taken with respect to the
trained modules only, so frozen modules get no weight gradients and no
optimizer state, and the meta modules before the first trained slot get no
backward pass at all.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from modassem import optim, phases
from modassem.mixup import mix_groups, smooth_labels
from modassem.names import metric_name
from modassem.phases import Plan


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any        # {"module_k": ...} for the trained modules only
  opt_state: Any     # {group: optax state of that group's modules}


def group_params(tree, names):
  return {n: tree[n] for n in names}


def init_state(plan: Plan, tx: optax.GradientTransformation, params) -> TrainState:
  opt_state = {g: tx.init(group_params(params, plan.param_names(g))) for g in plan.groups}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def distill_loss(student, teacher, targets, *, alpha: float, tau: float):
  """m2mKD's loss, (total, cross-entropy, KL term): `(1 - alpha) * CE(student, targets) + alpha * tau^2 *
  KL(softmax(teacher / tau) || softmax(student / tau))`, the KL summed over the batch and the classes and divided
  by their number of elements (DeiT's soft distillation, which m2mKD keeps)."""
  ce = optax.softmax_cross_entropy(student, targets).mean()
  log_p_teacher = jax.nn.log_softmax(teacher / tau, axis=-1)
  log_p_student = jax.nn.log_softmax(student / tau, axis=-1)
  kl = (jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student)).sum() / student.size * tau ** 2
  return (1.0 - alpha) * ce + alpha * kl, ce, kl


def _losses(plan, model_of, distill, aux_weight, params, frozen, images, targets, key):
  """(sum of the groups' losses, ({group: loss}, {name: term} of the distillation terms and MoE layers' metrics)).
  An MoE module's loss adds `aux_weight` times its layers' load-balancing losses."""
  distilled = plan.teacher_depths is not None
  logits, sown = phases.forward(plan, model_of, params, frozen, images, train=True, key=key, teacher=distilled,
                                moe_stats=True)
  losses, terms = {}, {}
  for g in plan.groups:
    if distilled:
      losses[g], terms[metric_name(g, "ce")], terms[metric_name(g, "kl")] = distill_loss(
          logits[g], logits[f"teacher/{g}"], targets, alpha=distill.alpha, tau=distill.tau)
    else:
      losses[g] = optax.softmax_cross_entropy(logits[g], targets).mean()
    if g in sown:
      aux, layers = phases.moe_terms(sown[g])
      losses[g] = losses[g] + aux_weight * aux
      terms.update(layers)
  # Groups are independent (disjoint parameters), so the gradient of the sum
  # is each group's own gradient.
  return sum(losses.values()), (losses, terms)


def train_step(state: TrainState, frozen, batch, base_key, schedule_values: dict, *, config, plan: Plan,
               model_of: Callable):
  """One update of every group's modules. `schedule_values` (`optim.schedule_values`) are traced, not constants: the
  compiled step is the same for runs that differ only in length, warmup or learning rate."""
  schedule = functools.partial(optim.lr_at, values=schedule_values)
  tx = optim.make_optimizer(config, schedule)
  key = jax.random.fold_in(base_key, state.step)
  mix_key, drop_key = jax.random.split(key)
  targets = smooth_labels(batch["label"], config.model.num_classes, config.label_smoothing)
  images, targets = mix_groups(mix_key, batch["image"], targets, group=int(config.mixup_group),
                               mixup=config.mixup, cutmix=config.cutmix, switch_prob=config.mixup_switch_prob,
                               prob=config.mixup_prob)
  grad_fn = jax.value_and_grad(functools.partial(_losses, plan, model_of, config.distill,
                                                 config.model.moe.aux_weight), has_aux=True)

  accum = config.accum_steps
  if accum == 1:
    (_, (losses, terms)), grads = grad_fn(state.params, frozen, images, targets, drop_key)
  else:
    # Micro-batches in a scan: one compiled body, activations of one
    # micro-batch alive at a time.
    micro = lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:])

    def body(carry, xs):
      imgs, tgts, i = xs
      (_, l), g = grad_fn(state.params, frozen, imgs, tgts, jax.random.fold_in(drop_key, i))
      return jax.tree_util.tree_map(jnp.add, carry, (l, g)), None

    # The carry's structure is one micro-batch's: its losses, terms (distillation, MoE layers) and gradients.
    first = jax.eval_shape(grad_fn, state.params, frozen, micro(images)[0], micro(targets)[0], drop_key)
    zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), (first[0][1], first[1]))
    ((losses, terms), grads), _ = jax.lax.scan(body, zeros, (micro(images), micro(targets), jnp.arange(accum)))
    losses, terms, grads = jax.tree_util.tree_map(lambda x: x / accum, (losses, terms, grads))

  params, opt_state, metrics = dict(state.params), {}, {}
  for g in plan.groups:
    names = plan.param_names(g)
    p, gr = group_params(state.params, names), group_params(grads, names)
    updates, opt_state[g] = tx.update(gr, state.opt_state[g], p)
    params.update(optax.apply_updates(p, updates))
    if plan.incubate:
      metrics[metric_name(g, "loss")] = losses[g]
      metrics[metric_name(g, "grad_norm")] = optax.tree.norm(gr)
    else:
      metrics["grad_norm"] = optax.tree.norm(gr)
  metrics.update(terms)
  metrics["loss"] = sum(losses.values()) / len(losses)
  metrics["lr"] = schedule(state.step)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, frozen, batch, *, plan: Plan, model_of: Callable):
  """Sums over the batch (padding masked out): loss, top-1 and top-5 hits per group, and the count."""
  logits = phases.forward(plan, model_of, params, frozen, batch["image"], train=False, key=jax.random.key(0))
  labels, mask = batch["label"], batch["mask"]
  out = {"count": mask.sum()}
  for g, l in logits.items():
    k = min(5, l.shape[-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(l, labels)
    top = jax.lax.top_k(l, k)[1]
    out[metric_name(g, "loss")] = (ce * mask).sum()
    out[metric_name(g, "top1")] = ((top[:, 0] == labels) * mask).sum()
    out[metric_name(g, "top5")] = ((top == labels[:, None]).any(-1) * mask).sum()
  return out
