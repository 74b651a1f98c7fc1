"""A Vision Transformer built as a stack of K modules.

`ViT(depths=(d_0, ..., d_{K-1}))` has parameters
`{"module_0": ..., "module_{K-1}": ...}`: module 0 owns the patch embedding,
the class token and the position embedding, module K-1 the final norm and the
head. That one fact is what lets every phase of Deep Incubation be a statement
about subtrees: a module is saved, frozen, swapped or assembled on its own.

Parameter names inside a module follow the official code's state-dict keys
(`patch_embed`, `cls_token`, `pos_embed`, `blocks_{j}/attn/qkv`, `norm`,
`head`) so that checkpoint conversion is a renaming, not a puzzle.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from modassem.errors import ModassemError
from modassem.models.inits import timm_trunc_normal
from modassem.models.moe import MoeMlp, MoeSpec
from modassem.names import module_name


# timm initialises every Linear, the class token and the position embedding so; matching it keeps the official
# learning-rate recipe meaningful.
_dense_init = timm_trunc_normal(0.02)
_token_init = timm_trunc_normal(0.02)
# timm's ViT leaves the patch embedding's Conv2d to PyTorch's default init: kaiming_uniform(a=sqrt(5)) for the
# kernel and U(+-1/sqrt(fan_in)) for the bias, both uniform in +-1/sqrt(fan_in) (fan_in = patch * patch * 3).
_patch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _patch_bias_init(fan_in: int):
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# Rematerialisation per block: which activations the backward pass keeps
# rather than recomputes. "none" keeps all (fastest, most memory); "full"
# keeps only each block's input; "dots" keeps matmul outputs and recomputes
# the cheap elementwise work (GELU, norms, softmax) in between.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def block_class(remat: str, scan: bool = False):
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat={remat!r} is unknown: use one of {', '.join(REMAT_POLICIES)}")
  if remat == "none":
    return Block
  # `train` (argument 2, counting self) is a Python bool: static for the
  # rematerialised call. Inside a scan the loop already keeps XLA from merging
  # the recomputation into the forward pass, so the CSE barriers would only
  # cost fusion opportunities.
  return nn.remat(Block, policy=REMAT_POLICIES[remat], static_argnums=(2,), prevent_cse=not scan)


# Parameter layouts of a module's blocks. Checkpoints, conversion and every
# exchange between phases use the per-block layout (`blocks_{j}`, as in the
# official state dicts); a model built with `scan=True` holds them stacked
# under `blocks` with a leading axis of length depth, which is what `nn.scan`
# iterates over. These two functions are the only bridge between the two.
SCANNED = "blocks"


def stack_blocks(params):
  """{"module_k": {..., "blocks_j": tree}} -> {"module_k": {..., "blocks": tree with a leading depth axis}}."""
  def one(module):
    module = dict(module)
    names = sorted((n for n in module if n.startswith("blocks_")), key=lambda n: int(n.split("_")[1]))
    if not names:
      return module
    blocks = [module.pop(n) for n in names]
    module[SCANNED] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)
    return module
  return {name: one(module) for name, module in params.items()}


def unstack_blocks(params):
  """The inverse of `stack_blocks`."""
  def one(module):
    module = dict(module)
    if SCANNED not in module:
      return module
    stacked = module.pop(SCANNED)
    depth = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for j in range(depth):
      module[f"blocks_{j}"] = jax.tree_util.tree_map(lambda x: x[j], stacked)
    return module
  return {name: one(module) for name, module in params.items()}


def is_stacked(path) -> bool:
  """Whether the leaf at `path` (a tree path) lives in the scanned layout, its axis 0 being the block index."""
  return any(getattr(k, "key", None) == SCANNED for k in path)


def drop_path_rates(rate: float, total_depth: int) -> list[float]:
  """Stochastic depth grows linearly over the blocks of the whole model."""
  if total_depth <= 1:
    return [0.0] * total_depth
  return [rate * j / (total_depth - 1) for j in range(total_depth)]


def attention_implementation(choice: str, backend: str, dtype, head_dim: int) -> str:
  """Which kernel `jax.nn.dot_product_attention` runs: "xla" or "cudnn".

  "auto" takes cuDNN's fused flash attention where it applies (a GPU, half
  precision, head dims it supports) and XLA's everywhere else; JAX's own
  default is always XLA.
  """
  if choice in ("xla", "cudnn"):
    return choice
  if choice != "auto":
    raise ValueError(f"model.attention={choice!r} is unknown: use auto, xla or cudnn")
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if backend == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128 else "xla"


class Attention(nn.Module):
  width: int
  heads: int
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    b, n, _ = x.shape
    qkv = nn.Dense(3 * self.width, use_bias=self.qkv_bias, kernel_init=_dense_init,
                   dtype=self.dtype, name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.heads, self.width // self.heads), 3, axis=2)
    # `dot_product_attention` lets XLA (or cuDNN on GPU) pick a fused kernel.
    impl = attention_implementation(self.attention, jax.default_backend(), self.dtype, self.width // self.heads)
    out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], implementation=impl)
    out = out.reshape(b, n, self.width)
    return nn.Dense(self.width, kernel_init=_dense_init, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
  width: int
  hidden: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.hidden, kernel_init=_dense_init, dtype=self.dtype, name="fc1")(x)
    # timm's nn.GELU is the exact erf form, not the tanh approximation.
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = nn.Dense(self.width, kernel_init=_dense_init, dtype=self.dtype, name="fc2")(x)
    return nn.Dropout(self.dropout)(x, deterministic=not train)


class Block(nn.Module):
  """Pre-norm transformer block with per-sample stochastic depth."""
  width: int
  heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  ln_eps: float = 1e-6
  drop_path: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  attention: str = "auto"
  moe: MoeSpec | None = None   # an MoE MLP (moe.py) instead of the dense one

  @nn.compact
  def __call__(self, x, train: bool, rate=None, draws=None):
    """`rate`: a traced `drop_path` (under `nn.scan`). `draws`: stochastic depth's uniforms [2, batch] for the two
    branches, drawn by the module for all its blocks; without them (evaluation, all rates 0) nothing is dropped."""
    rate = self.drop_path if rate is None else rate
    drop = functools.partial(_drop_path, rate=rate, draws=draws if train else None)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm1")(x)
    y = Attention(self.width, self.heads, self.qkv_bias, self.dtype, self.attention, name="attn")(y)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    x = x + drop(y, 0)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm2")(x)
    hidden = int(self.width * self.mlp_ratio)
    if self.moe is None:
      y = Mlp(self.width, hidden, self.dropout, self.dtype, name="mlp")(y, train)
    else:
      m = self.moe
      y = MoeMlp(self.width, hidden, m.experts, m.k, m.router, m.capacity_factor, m.noise_std, self.dropout,
                 self.dtype, m.shards, name="mlp")(y, train)
    return x + drop(y, 1)


def _drop_path(y, branch: int, *, rate, draws):
  """Stochastic depth: a residual branch dropped per example with probability `rate`, the kept ones rescaled. The
  floor on `keep` keeps y / 0 (a rate of 1, where no example keeps the branch) out of the gradient as 0 * inf."""
  if draws is None or (isinstance(rate, (int, float)) and rate == 0):
    return y
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = (draws[branch] < keep).reshape((y.shape[0],) + (1,) * (y.ndim - 1))
  return jnp.where(mask, y / jnp.maximum(keep, 1e-6).astype(y.dtype), jnp.zeros_like(y))


class ViTModule(nn.Module):
  """Module `index` of `num_modules`: optional stem, `depth` blocks, optional head.

  `block_offset` and `total_depth` place the blocks in the whole model, which
  is all they need to know to pick their stochastic-depth rate.
  """
  index: int
  num_modules: int
  depth: int
  block_offset: int
  total_depth: int
  image_size: int
  patch: int
  width: int
  heads: int
  mlp_ratio: float
  qkv_bias: bool
  ln_eps: float
  num_classes: int
  drop_path: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: str = "none"
  attention: str = "auto"
  scan: bool = False
  moe: MoeSpec | None = None
  moe_blocks: tuple = ()   # which of its blocks (0 .. depth - 1) have an MoE MLP

  @property
  def is_first(self) -> bool:
    return self.index == 0

  @property
  def is_last(self) -> bool:
    return self.index == self.num_modules - 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Images [B, H, W, 3] -> tokens (module 0), tokens -> tokens, tokens -> logits (module K-1)."""
    if self.is_first:
      x = self._stem(x, train)
    rates = drop_path_rates(self.drop_path, self.total_depth)[self.block_offset:self.block_offset + self.depth]
    block = functools.partial(block_class(self.remat, self.scan), self.width, self.heads, self.mlp_ratio,
                              self.qkv_bias, self.ln_eps)
    moe_blocks = set(self.moe_blocks) if self.moe is not None else set()
    # Stochastic depth's uniforms for all blocks in one draw: each draw of JAX's PRNG is a loop XLA:CPU compiles
    # apart (two per branch were a fifth of a small step's compile), and a block gets the same masks scanned or not.
    draws = (jax.random.uniform(self.make_rng("dropout"), (self.depth, 2, x.shape[0]))
             if train and max(rates, default=0.0) > 0 else None)
    if self.scan:
      if moe_blocks and moe_blocks != set(range(self.depth)):
        raise ValueError(f"model.scan needs one kind of block per module, and module {self.index} has MoE blocks "
                         f"{sorted(moe_blocks)} of {self.depth}: set model.scan=False, or put an MoE MLP in every "
                         f"block (model.moe.every=1)")
      # One traced block applied `depth` times: the program (and its compile time) no longer grows with the
      # depth. Each block gets its own parameters (stacked on axis 0), its rate and its draws.
      blocks = nn.scan(lambda blk, x, rate, draws: (blk(x, train, rate, draws), None),
                       variable_axes={"params": 0, "moe": 0}, split_rngs={"params": True, "dropout": True},
                       length=self.depth)
      x, _ = blocks(block(0.0, self.dropout, self.dtype, self.attention, moe=self.moe if moe_blocks else None,
                          name=SCANNED), x, jnp.asarray(rates, jnp.float32), draws)
    else:
      for j in range(self.depth):
        x = block(rates[j], self.dropout, self.dtype, self.attention, moe=self.moe if j in moe_blocks else None,
                  name=f"blocks_{j}")(x, train, None, None if draws is None else draws[j])
    if self.is_last:
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm")(x)
      x = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype, name="head")(x[:, 0])
      x = x.astype(jnp.float32)
    return x

  def _stem(self, images, train):
    grid = self.image_size // self.patch
    x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch), padding="VALID",
                dtype=self.dtype, kernel_init=_patch_kernel_init, bias_init=_patch_bias_init(self.patch ** 2 * 3),
                name="patch_embed")(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, grid * grid, self.width)
    cls = self.param("cls_token", _token_init, (1, 1, self.width))
    pos = self.param("pos_embed", _token_init, (1, grid * grid + 1, self.width))
    # The residual stream is float32 whatever the compute dtype, as under PyTorch AMP and in big_vision: the
    # matmuls and their activations run in `dtype`, and each block adds its (bf16) output to a float32 stream.
    # A bf16 stream would round every block's contribution to 8 bits of mantissa, 128 times at depth 128.
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x.astype(jnp.float32)], axis=1)
    x = x + pos
    return nn.Dropout(self.dropout)(x, deterministic=not train)


class ViT(nn.Module):
  """The whole model: `len(depths)` modules applied in order.

  `depths=(1, 1, 1, 1)` is a meta model, `(3, 3, 3, 3)` a ViT-B cut into four
  modules, `(1, 3, 1, 1)` the hybrid that incubates module 1.
  """
  depths: Sequence[int]
  image_size: int = 224
  patch: int = 16
  width: int = 768
  heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  ln_eps: float = 1e-6
  num_classes: int = 1000
  drop_path: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: str = "none"
  attention: str = "auto"
  scan: bool = False   # nn.scan over each module's blocks: parameters in the stacked layout (see stack_blocks)
  moe: MoeSpec | None = None   # the MoE MLP of the blocks `moe_layout` names (moe.moe_layout); None: a dense ViT
  moe_layout: tuple = ()       # per module, which of its blocks have an MoE MLP; () for none

  @property
  def num_modules(self) -> int:
    return len(self.depths)

  @nn.nowrap
  def module(self, k: int, **overrides) -> ViTModule:
    """Module k's definition: unbound when called from outside, a child inside `__call__`.

    Applying it to `params[f"module_{k}"]` on its own is how the trainer runs
    frozen and trained modules side by side.
    """
    depths = tuple(self.depths)
    kwargs = dict(
        index=k, num_modules=len(depths), depth=depths[k], block_offset=sum(depths[:k]),
        total_depth=sum(depths), image_size=self.image_size, patch=self.patch, width=self.width,
        heads=self.heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, ln_eps=self.ln_eps,
        num_classes=self.num_classes, drop_path=self.drop_path, dropout=self.dropout,
        dtype=self.dtype, remat=self.remat, attention=self.attention, scan=self.scan, moe=self.moe,
        moe_blocks=tuple(self.moe_layout[k]) if self.moe_layout else ())
    kwargs.update(overrides)
    return ViTModule(**kwargs)

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = images
    for k in range(self.num_modules):
      x = self.module(k, name=module_name(k))(x, train)
    return x


class Stitch(nn.Module):
  """LayerNorm and a linear map to `width`: joins a module to a meta model of another width (m2mKD's stitch
  layers), at the module's entry (meta width -> module width) or exit (module width -> meta width)."""
  width: int
  ln_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm")(x)
    # Its output is the residual stream of the module it feeds: float32, as everywhere else.
    return nn.Dense(self.width, kernel_init=_dense_init, dtype=self.dtype, name="proj")(x).astype(jnp.float32)


def abstract_params(model: ViT) -> dict:
  """`model`'s parameters as ShapeDtypeStructs: their shapes, with nothing allocated."""
  try:
    hash(model)
  except TypeError:   # a field that cannot be hashed (depths as a list): traced every time
    shapes = _abstract_params.__wrapped__(model)
  else:
    shapes = _abstract_params(model)
  return jax.tree_util.tree_map(lambda x: x, shapes)   # fresh containers: the caller may change them


# A process asks for one model's shapes again and again (meta model, sources, teacher, checks, `modassem.load`: 108
# of 149 asks in a test session), and tracing its init is costly. Modules are equal when their fields are.
@functools.lru_cache(maxsize=64)
def _abstract_params(model: ViT) -> dict:
  image = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), image))["params"]


def vit_of(arch: dict, depths: Sequence[int]) -> ViT:
  """The ViT of run.json's "arch" (records.arch_of) with module depths `depths`: its "moe", where present, gives the
  MoE MLP and the blocks of each module that have one ("layout"; a module with none is dense)."""
  arch = dict(arch)
  moe = arch.pop("moe", None)
  if not moe:
    return ViT(depths=tuple(depths), **arch)
  if "layout" not in moe:
    raise ModassemError("this run.json records MoE experts but not which blocks have them (a run of an earlier "
                        "development version of modassem's MoE support): train it again with this version")
  spec = MoeSpec(experts=int(moe["experts"]), k=int(moe["k"]), router=str(moe["router"]),
                 capacity_factor=float(moe.get("capacity_factor", 0.0)))
  return ViT(depths=tuple(depths), **arch, moe=spec, moe_layout=tuple(tuple(b) for b in moe["layout"]))


def dense_arch(arch: dict) -> dict:
  """`arch` without its MoE MLP: the dense model of the same shape (a meta model that sparse modules incubate in)."""
  return {k: v for k, v in arch.items() if k != "moe"}
