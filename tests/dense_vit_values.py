"""The dense ViT's numbers that the sparse MoE blocks must leave as they were, written as tests/data/dense_vit.json:

    XLA_FLAGS="$FLAGS" python tests/dense_vit_values.py CODE_DIR > tests/data/dense_vit.json

CODE_DIR is a checkout of the code to take them from (the file in tests/data was written from a2200c7^, the tree
before MoE blocks entered the ViT; `git worktree add /tmp/before a2200c7^`). For the tiny preset's shape, per-block
and scanned: SHA-256 digests of the initial parameters, of the logits in evaluation, and of the gradients of a
cross-entropy in train mode, with the logits themselves to compare within a tolerance where JAX is another version
or XLA's flags other than the ones it was written under (XLA may then round differently). test_moe.py compares
today's code with it, under the tests' XLA flags (conftest._XLA_TEST_FLAGS, which FLAGS above should be: the
fast-compile passes round the initializers' and the model's float32 arithmetic otherwise than the default ones).

Drop path is off: since 6653fab a module draws its blocks' stochastic-depth masks in one PRNG call, other masks
than the per-block draws before it, by design; what the MoE blocks must not change is the model's arithmetic.
"""

import hashlib
import json
import os
import sys


def _digest(tree) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for path, x in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda t: jax.tree_util.keystr(t[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()


def values() -> dict:
  """Computed with whatever `modassem` is importable."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from modassem.models import vit  # pylint: disable=g-import-not-at-top
  images = jax.random.normal(jax.random.PRNGKey(7), (4, 8, 8, 3))
  labels = jnp.arange(4) % 10
  out = {"jax": jax.__version__, "xla_flags": sorted(os.environ.get("XLA_FLAGS", "").split())}
  for scan in (False, True):
    model = vit.ViT(depths=(2, 1, 2, 1), image_size=8, patch=4, width=16, heads=2, num_classes=10,
                    scan=scan)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]
    logits = jax.jit(model.apply)({"params": params}, images)

    def loss(p):
      y = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(y), labels[:, None], axis=1))

    grads = jax.jit(jax.grad(loss))(params)
    out["scan" if scan else "blocks"] = {"params": _digest(params), "logits": _digest(logits),
                                         "grads": _digest(grads), "logit_values": logits.tolist()}
  return out


if __name__ == "__main__":
  sys.path.insert(0, sys.argv[1])
  print(json.dumps(values(), indent=1))
