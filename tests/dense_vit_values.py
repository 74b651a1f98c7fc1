"""The dense ViT's numbers that the sparse MoE blocks must leave as they were, written as tests/data/dense_vit.json:

    XLA_FLAGS="$FLAGS" python tests/dense_vit_values.py CODE_DIR > tests/data/dense_vit.json

CODE_DIR is a checkout of the code to take them from (the file in tests/data was written from a2200c7^, the tree
before MoE blocks entered the ViT; `git worktree add /tmp/before a2200c7^`), and FLAGS the tests' XLA flags
(conftest._XLA_TEST_FLAGS: the fast-compile passes round float32 arithmetic otherwise than the default ones). For
the tiny preset's width, patch and image size, six blocks in modules of 2, 1, 2 and 1, per block and scanned:
- SHA-256 digests of Flax's initial parameters;
- the logits in evaluation and the gradients of a cross-entropy in train mode, with parameters drawn here by NumPy
  (so that they measure the model's arithmetic, whatever Flax's initializers do): their digests, and the logits'
  values for a comparison within float32 rounding where the digests cannot be compared.
test_moe.py compares today's code with it: bit for bit where JAX, Flax, the backend, the XLA flags and the CPU's
vector instructions are those that wrote it (XLA:CPU compiles for the host: other instructions may sum in another
order), the logits within a tolerance elsewhere.

Drop path is off: since 6653fab a module draws its blocks' stochastic-depth masks in one PRNG call, other masks
than the per-block draws before it, by design; what the MoE blocks must not change is the model's arithmetic.
"""

import hashlib
import json
import os
import sys

# The CPU features XLA:CPU's code generation depends on (vector width, fused multiply-add).
_ISA = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16",
        "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")


def _digest(tree) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for path, x in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda t: jax.tree_util.keystr(t[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()


def _drawn(params):
  """Parameters of the same tree drawn by NumPy: N(0, 0.1^2), and 1 + N(0, 0.1^2) for LayerNorm scales."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  drawn = {}
  for path, x in sorted(leaves, key=lambda t: jax.tree_util.keystr(t[0])):
    name = jax.tree_util.keystr(path)
    drawn[name] = ((1.0 if name.endswith("['scale']") else 0.0)
                   + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params),
                                      [drawn[jax.tree_util.keystr(p)] for p, _ in leaves])


def machine() -> dict:
  """What the digests depend on besides the code."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  flags = set()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
  return {"jax": jax.__version__, "flax": flax.__version__, "backend": jax.default_backend(),
          "xla_flags": sorted(os.environ.get("XLA_FLAGS", "").split()), "isa": sorted(flags & set(_ISA))}


def values() -> dict:
  """Computed with whatever `modassem` is importable."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from modassem.models import vit  # pylint: disable=g-import-not-at-top
  images = jax.random.normal(jax.random.PRNGKey(7), (4, 8, 8, 3))
  labels = jnp.arange(4) % 10
  out = {"machine": machine()}
  for scan in (False, True):
    model = vit.ViT(depths=(2, 1, 2, 1), image_size=8, patch=4, width=16, heads=2, num_classes=10, scan=scan)
    initial = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]
    params = _drawn(initial)
    logits = jax.jit(model.apply)({"params": params}, images)

    def loss(p):
      # The scanned blocks of that tree ask for the stream even at drop path 0.
      y = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(y), labels[:, None], axis=1))

    grads = jax.jit(jax.grad(loss))(params)
    out["scan" if scan else "blocks"] = {"initial": _digest(initial), "logits": _digest(logits),
                                         "grads": _digest(grads), "logit_values": logits.tolist()}
  return out


if __name__ == "__main__":
  sys.path.insert(0, sys.argv[1])
  print(json.dumps(values(), indent=1))
