"""The sparse MoE MLP against a NumPy implementation of each routing, written from the method's description: the
reference's top-k-then-softmax with no drops, V-MoE's softmax-then-top-k with a capacity in batch-priority order,
the auxiliary load-balancing loss, and the mixture with every expert taken computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modassem.models import moe

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


def _np_layer(x, params, k, router, capacity_factor):
  logits = x @ params["gate"]["kernel"] + params["gate"]["bias"]
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
  params = layer.init(jax.random.PRNGKey(0), x, train=False)["params"]
  # A gate with a wide spread, so that the routing is far from ties and uneven across experts.
  params["gate"]["kernel"] = params["gate"]["kernel"] * 8.0
  return layer, params, x


@pytest.mark.parametrize("router, k, capacity_factor", [
    ("topk_softmax", 2, 0.0), ("topk_softmax", 1, 0.0), ("softmax_topk", 2, 0.0), ("softmax_topk", 2, 1.0),
    ("softmax_topk", 1, 0.5)])
def test_layer_against_numpy(router, k, capacity_factor):
  layer, params, x = _layer(k=k, router=router, capacity_factor=capacity_factor)
  y, state = layer.apply({"params": params}, x, train=False, mutable=["moe"])
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


def test_k_equal_to_the_experts_without_capacity_is_the_dense_mixture():
  """Every expert taken, weighted by the softmax over all of them: sum_e softmax(gate(x))_e * mlp_e(x), by hand."""
  layer, params, x = _layer(k=E, router="topk_softmax")
  y = layer.apply({"params": params}, x, train=False)
  tokens = x.reshape(T, WIDTH)
  probs = jax.nn.softmax(tokens @ params["gate"]["kernel"] + params["gate"]["bias"])
  mixture = sum(probs[:, e:e + 1] * (jax.nn.gelu(tokens @ params["fc1_kernel"][e] + params["fc1_bias"][e],
                                                  approximate=False) @ params["fc2_kernel"][e] + params["fc2_bias"][e])
                for e in range(E))
  np.testing.assert_allclose(np.asarray(y).reshape(T, WIDTH), np.asarray(mixture), atol=1e-5)


def test_capacity_follows_batch_priority():
  """Four tokens all preferring expert 0, capacity 1 per expert: the most confident token keeps it."""
  logits = jnp.array([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
  routing = moe.route(logits, k=1, router="softmax_topk", capacity_factor=0.5)
  assert moe.capacity(4, 2, 1, 0.5) == 1
  np.testing.assert_array_equal(np.asarray(routing.kept[:, 0]), [False, True, False, False])


def test_bad_k_is_refused():
  layer = moe.MoeMlp(width=WIDTH, hidden=HIDDEN, num_experts=4, k=5)
  with pytest.raises(ValueError, match="moe k=5 must be between 1 and the number of experts"):
    layer.init(jax.random.PRNGKey(0), jnp.ones((1, 2, WIDTH)), train=False)
