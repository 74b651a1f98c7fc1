"""A sparse Mixture-of-Experts MLP (V-MoE), in the two routings users run.

- `router="topk_softmax"`, m2mKD's V-MoE student (fastmoe's NaiveGate): a linear gate with bias, the top k of its
  logits, a softmax over those k; no noise, no capacity (no token is dropped), no auxiliary loss.
- `router="softmax_topk"`, Google's V-MoE: a softmax over all experts, optionally on logits with Gaussian noise
  while training, then the top k of those probabilities as the weights (not renormalised); with `capacity_factor`
  > 0 each expert takes at most round(capacity_factor * k * T / E) of the T tokens' k assignments, in batch-priority
  order (all first choices before any second one; within a choice, tokens with the larger top weight first), and
  an assignment past that is dropped (the token keeps the residual path alone).

The experts' work is grouped matmuls (`jax.lax.ragged_dot`) over the assignments sorted by expert: each token's
compute grows with k, not with the number of experts. The auxiliary load-balancing loss is GShard's and the Switch
Transformer's, E * sum_e f_e * P_e (f_e: the share of kept assignments expert e gets, P_e: its mean gate
probability), sown for the trainer to weigh (its weight is 0 in the reference presets).

Parameters follow fastmoe's layout, so that a reference `.pth` converts by renaming and transposing: `gate/{kernel,
bias}` and the experts' stacked `fc1_kernel` (E, width, hidden), `fc1_bias` (E, hidden), `fc2_kernel` (E, hidden,
width) and `fc2_bias` (E, width). They start as the reference's do: fastmoe's expert init with zero biases, and
timm's for the gate, an `nn.Linear` there (`inits.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from modassem.models.inits import fastmoe_expert_kernel, timm_trunc_normal

ROUTERS = ("topk_softmax", "softmax_topk")


@dataclasses.dataclass(frozen=True)
class MoeSpec:
  """What an MoE block's MLP is (hashable: a field of the Flax modules that build it)."""
  experts: int
  k: int
  router: str = "topk_softmax"
  capacity_factor: float = 0.0
  noise_std: float = 0.0
  shards: int = 1   # devices the experts are split over (`expert_shards`); 1: every device holds every expert

  def check(self) -> None:
    if self.experts < 1:
      raise ValueError(f"model.moe.experts={self.experts}: an MoE layer needs at least 1 expert")
    if not 1 <= self.k <= self.experts:
      raise ValueError(f"model.moe.k={self.k} must be between 1 and model.moe.experts={self.experts}")
    if self.router not in ROUTERS:
      raise ValueError(f"model.moe.router={self.router!r} is unknown: use one of {', '.join(ROUTERS)}")
    if self.capacity_factor < 0:
      raise ValueError(f"model.moe.capacity_factor={self.capacity_factor} must be 0 (no limit) or positive")
    if self.router == "topk_softmax" and (self.capacity_factor or self.noise_std):
      raise ValueError("model.moe.router='topk_softmax' (the m2mKD reference's) has no capacity and no noise: use "
                       "router='softmax_topk' (V-MoE's) for model.moe.capacity_factor or model.moe.noise_std")


# The experts' parameters (MoeMlp's), each with the expert axis first: what `sharding` splits over the devices.
EXPERT_PARAMS = ("fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias")
# The mesh axis the experts are split over: the data axis, as in V-MoE (modassem.sharding.AXIS).
EXPERT_AXIS = "data"


def expert_shards(experts: int, devices: int) -> int:
  """Devices the experts are split over on a mesh of `devices`: all of them where each gets the same number of
  experts, else none (each device holds every expert, as on one device)."""
  return devices if devices > 1 and experts % devices == 0 else 1


def moe_layout(depths: Sequence[int], *, every: int = 0, blocks: Sequence[int] = ()) -> tuple[tuple[int, ...], ...]:
  """Which blocks of each module have an MoE MLP, as indices within the module: `every`=n takes each module's
  n-th, 2n-th, ... block (1: all of them; V-MoE's "every other block" is 2), `blocks` lists blocks by their index
  in the whole model (0 .. sum(depths) - 1). One of the two, or neither (a dense model)."""
  if every and blocks:
    raise ValueError("model.moe.every and model.moe.blocks both set: give one of them")
  if every < 0:
    raise ValueError(f"model.moe.every={every} must be 0 (use model.moe.blocks) or positive")
  total = sum(depths)
  bad = [b for b in blocks if not 0 <= b < total]
  if bad:
    raise ValueError(f"model.moe.blocks={tuple(blocks)} names block(s) {bad} of a model of depth {total}: use "
                     f"indices 0 to {total - 1}")
  out, offset = [], 0
  for depth in depths:
    if every:
      out.append(tuple(j for j in range(depth) if (j + 1) % every == 0))
    else:
      out.append(tuple(b - offset for b in sorted(set(blocks)) if offset <= b < offset + depth))
    offset += depth
  return tuple(out)


class Routing(NamedTuple):
  experts: jax.Array   # (T, k) int32: the expert of each token's j-th choice
  weights: jax.Array   # (T, k): its combine weight (0 where dropped)
  kept: jax.Array      # (T, k) bool: whether the expert took it (always, without a capacity)
  probs: jax.Array     # (T, E): the gate's probabilities over all experts (for the auxiliary loss)


def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """Assignments one expert takes: round(capacity_factor * k * T / E), at least 1 (V-MoE's rule)."""
  return max(1, int(round(capacity_factor * k * num_tokens / num_experts)))


def route(logits, *, k: int, router: str, capacity_factor: float = 0.0) -> Routing:
  """Routes T tokens given the gate's logits (T, E) (noise, where used, is already in them)."""
  num_tokens, num_experts = logits.shape
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  if router == "topk_softmax":
    top, experts = jax.lax.top_k(logits, k)
    weights = jax.nn.softmax(top, axis=-1)
  elif router == "softmax_topk":
    weights, experts = jax.lax.top_k(probs, k)
  else:
    raise ValueError(f"router {router!r} is unknown: use one of {', '.join(ROUTERS)}")
  if capacity_factor <= 0:
    return Routing(experts, weights, jnp.ones_like(experts, dtype=bool), probs)
  # Batch-priority routing: the assignments in the order (choice j, then tokens by their top weight, largest
  # first); each expert keeps the first `capacity` it receives in that order.
  priority = jnp.argsort(-weights[:, 0], stable=True)                       # tokens, most confident first
  ordered = experts[priority].T.reshape(-1)                                 # (k * T,) choice-major
  one_hot = jax.nn.one_hot(ordered, num_experts, dtype=jnp.int32)
  position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # arrival index at its expert
  kept_ordered = position < capacity(num_tokens, num_experts, k, capacity_factor)
  kept = jnp.zeros((num_tokens, k), bool).at[priority].set(kept_ordered.reshape(k, num_tokens).T)
  return Routing(experts, jnp.where(kept, weights, 0.0), kept, probs)


def _kept_counts(routing: Routing) -> jax.Array:
  """The kept assignments each expert takes, (E,)."""
  num_experts = routing.probs.shape[-1]
  return jnp.sum(jax.nn.one_hot(routing.experts, num_experts) * routing.kept[..., None], axis=(0, 1))


def load_balancing_loss(routing: Routing) -> jax.Array:
  """E * sum_e f_e * P_e: f_e the share of kept assignments at expert e, P_e the mean gate probability of e."""
  counts = _kept_counts(routing)
  share = counts / jnp.maximum(jnp.sum(counts), 1.0)
  return routing.probs.shape[-1] * jnp.sum(share * jnp.mean(routing.probs, axis=0))


def expert_shares(routing: Routing) -> jax.Array:
  """The share of the T * k assignments each expert takes (kept ones; they sum to 1 - the dropped share)."""
  return _kept_counts(routing) / routing.experts.size


def experts_apply(x, routing: Routing, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, activation):
  """sum_j weight_j * expert_{e_j}(x) for each token of x (T, width), every expert an MLP; grouped matmuls over
  the T * k assignments sorted by expert (dropped ones have weight 0 and add nothing)."""
  num_tokens, k = routing.experts.shape
  num_experts = fc1_kernel.shape[0]
  flat = routing.experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  expert_sorted = flat[order]
  token_sorted = order // k
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  h = jax.lax.ragged_dot(x[token_sorted], fc1_kernel, group_sizes) + fc1_bias[expert_sorted]
  h = activation(h)
  out = jax.lax.ragged_dot(h, fc2_kernel, group_sizes) + fc2_bias[expert_sorted]
  weights = routing.weights.reshape(-1)[order].astype(out.dtype)
  return jax.ops.segment_sum(out * weights[:, None], token_sorted, num_segments=num_tokens)


def experts_apply_sharded(x, routing: Routing, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, activation, *,
                          shards: int):
  """`experts_apply` with the tokens and the experts split over the `shards` devices of the mesh axis EXPERT_AXIS
  (each device holds E / shards experts and T / shards tokens): every device sends each of its assignments to the
  device that holds its expert (an all-to-all), runs its experts on what it receives, and sends the outputs back
  (a second all-to-all), where they are weighed and summed per token as on one device.

  No assignment is dropped, with static shapes: a device's send buffer has room for all its assignments at every
  destination (the worst case, all of them to one device), so the rows each device's experts take are T * k in all,
  of which T * k / shards on average are real; padding rows go through no expert's group and are zeroed. `activation` must be a pure function (no Flax module): it runs inside
  `shard_map`.
  """
  spec = jax.sharding.PartitionSpec(EXPERT_AXIS)
  mesh = jax.sharding.AbstractMesh((shards,), (EXPERT_AXIS,))

  def local(x, experts, weights, w1, b1, w2, b2):
    num_tokens, k = experts.shape
    per_device = w1.shape[0]
    room = num_tokens * k
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)        # by expert, so by the device that holds it
    expert_sorted = flat[order]
    dest = expert_sorted // per_device
    counts = jnp.bincount(dest, length=shards)
    slot = jnp.arange(room) - (jnp.cumsum(counts) - counts)[dest]   # its place in the rows sent to `dest`
    send = jnp.zeros((shards, room, x.shape[-1]), x.dtype).at[dest, slot].set(x[order // k])
    # The local expert of each row sent; `per_device` marks a padding row.
    send_ids = jnp.full((shards, room), per_device, jnp.int32).at[dest, slot].set(expert_sorted % per_device)
    rows = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0).reshape(shards * room, -1)   # [source] = what it sent
    ids = jax.lax.all_to_all(send_ids, EXPERT_AXIS, 0, 0).reshape(-1)
    by_expert = jnp.argsort(ids, stable=True)    # padding rows last, past every group
    ids_sorted = ids[by_expert]
    sizes = jnp.sum(jax.nn.one_hot(ids, per_device, dtype=jnp.int32), axis=0)
    safe = jnp.minimum(ids_sorted, per_device - 1)
    real = (ids_sorted < per_device)[:, None]
    # Padding rows are zeroed at each step, not left to what a grouped matmul does with rows past its groups.
    h = jnp.where(real, activation(jax.lax.ragged_dot(rows[by_expert], w1, sizes) + b1[safe]), 0)
    out = jnp.where(real, jax.lax.ragged_dot(h, w2, sizes) + b2[safe], 0).astype(x.dtype)
    out = jnp.zeros_like(out).at[by_expert].set(out)                    # back in the order received
    back = jax.lax.all_to_all(out.reshape(shards, room, -1), EXPERT_AXIS, 0, 0)   # [dest] = its outputs
    mine = back[dest, slot]
    w = weights.reshape(-1)[order].astype(mine.dtype)
    return jax.ops.segment_sum(mine * w[:, None], order // k, num_segments=num_tokens)

  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 7, out_specs=spec)(
      x, routing.experts, routing.weights, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias)


class MoeMlp(nn.Module):
  """The MLP of a transformer block as `num_experts` expert MLPs, `k` of them per token (see the module doc)."""
  width: int
  hidden: int
  num_experts: int
  k: int
  router: str = "topk_softmax"
  capacity_factor: float = 0.0
  noise_std: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  shards: int = 1   # devices the experts are split over (experts_apply_sharded)

  @nn.compact
  def __call__(self, x, train: bool):
    if not 1 <= self.k <= self.num_experts:
      raise ValueError(f"moe k={self.k} must be between 1 and the number of experts ({self.num_experts})")
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    # The gate is an nn.Linear in the reference, so timm's init draws its kernel and zeroes its bias.
    logits = nn.Dense(self.num_experts, dtype=jnp.float32, kernel_init=timm_trunc_normal(0.02),
                      bias_init=nn.initializers.zeros, name="gate")(tokens)
    if train and self.noise_std > 0:
      logits = logits + self.noise_std * jax.random.normal(self.make_rng("dropout"), logits.shape)
    routing = route(logits, k=self.k, router=self.router, capacity_factor=self.capacity_factor)
    e, w, h = self.num_experts, self.width, self.hidden
    # fastmoe's expert init (inits.fastmoe_expert_kernel), its biases zero.
    fc1_kernel = self.param("fc1_kernel", fastmoe_expert_kernel(w, h), (e, w, h))
    fc1_bias = self.param("fc1_bias", nn.initializers.zeros, (e, h))
    fc2_kernel = self.param("fc2_kernel", fastmoe_expert_kernel(w, h), (e, h, w))
    fc2_bias = self.param("fc2_bias", nn.initializers.zeros, (e, w))
    cast = lambda a: a.astype(self.dtype)
    params = (cast(fc1_kernel), cast(fc1_bias), cast(fc2_kernel), cast(fc2_bias))
    # timm's GELU, the exact erf form, as in the dense MLP.
    gelu = lambda a: nn.gelu(a, approximate=False)
    # Split over the devices where the tokens split evenly too, as a train or eval batch's always do (it is split
    # over the devices); elsewhere (`init`'s one image, say) every device runs all experts, with the same result.
    if self.shards > 1 and tokens.shape[0] % self.shards == 0:
      if train and self.dropout > 0:
        raise ValueError("model.dropout inside experts split over devices is not supported: set model.dropout=0 "
                         "(as every preset does), or use a device count the experts do not divide")
      y = experts_apply_sharded(cast(tokens), routing, *params, gelu, shards=self.shards)
    else:
      activation = lambda a: nn.Dropout(self.dropout)(gelu(a), deterministic=not train)
      y = experts_apply(cast(tokens), routing, *params, activation)
    self.sow("moe", "aux_loss", load_balancing_loss(routing))
    self.sow("moe", "expert_share", expert_shares(routing))
    self.sow("moe", "dropped", 1.0 - jnp.mean(routing.kept.astype(jnp.float32)))
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    return y.reshape(shape).astype(x.dtype)
