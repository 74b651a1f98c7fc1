"""The method: each phase of Deep Incubation as a plan over parameter subtrees.

A `Plan` says which model is trained, which of its modules are trained, and
how: jointly (meta, assemble, e2e: one model, one loss, one optimizer) or
incubated (each trained module sits in slot i of the frozen meta model, with
its own loss and its own optimizer). The trainer runs every plan with the same
step; nothing here touches a training loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from modassem.errors import ModassemError
from modassem.models.moe import MoeSpec, expert_shards, moe_layout
from modassem.models.vit import Stitch, ViT, stack_blocks
from modassem.names import module_name, teacher_name  # noqa: F401  (phases.module_name, as it was)

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Plan:
  phase: str                     # meta | incubate | assemble | e2e
  depths: tuple[int, ...]        # depths of the modules being trained
  trained: tuple[int, ...]       # indices of the trained modules
  incubate: bool                 # True: each trained module runs inside the frozen meta model
  # m2mKD: the depths of the teacher's modules (its module i runs in slot i of the meta model beside the student's
  # module i, frozen, and the student learns from that hybrid's logits too); None without a teacher.
  teacher_depths: tuple[int, ...] | None = None
  # Incubation in a meta model of another width than the target's: the meta run's (width, heads, mlp_ratio). Each
  # incubated module then gets stitch layers (`Stitch`) at its entry and exit, trained with it, dropped at assembly.
  meta_arch: tuple[tuple[str, Any], ...] | None = None
  # m2mKD's stochastic depth (`incubation_drop_path="module"`): each incubated module's rates rise over its own
  # blocks, and the meta modules have none.
  module_drop_path: bool = False

  @property
  def stitched(self) -> bool:
    return self.meta_arch is not None

  def param_names(self, group: str) -> list[str]:
    """The trained parameter subtrees of `group`: its modules, and their stitches."""
    ks = self.groups[group]
    return [module_name(k) for k in ks] + ([stitch_name(k) for k in ks] if self.stitched else [])

  @property
  def num_modules(self) -> int:
    return len(self.depths)

  @property
  def meta_depths(self) -> tuple[int, ...]:
    return (1,) * self.num_modules

  def hybrid_depths(self, i: int) -> tuple[int, ...]:
    """Depths of the model that incubates module i: target in slot i, meta elsewhere."""
    return tuple(self.depths[i] if k == i else 1 for k in range(self.num_modules))

  def teacher_hybrid_depths(self, i: int) -> tuple[int, ...]:
    """Depths of the teacher hybrid of slot i: the teacher's module i, meta elsewhere."""
    return tuple(self.teacher_depths[i] if k == i else 1 for k in range(self.num_modules))

  @property
  def groups(self) -> dict[str, tuple[int, ...]]:
    """Sets of modules that share a loss and an optimizer.

    Incubated modules are optimised apart, so that `module=all` gives each one
    exactly what a run of its own would (gradient clipping included).
    """
    if self.incubate:
      return {module_name(i): (i,) for i in self.trained}
    return {"model": self.trained}


def parse_module(value) -> str | int:
  if str(value).strip().lower() == "all":
    return "all"
  try:
    return int(value)
  except ValueError:
    raise ModassemError(f"config.module={value!r} is neither 'all' nor a module index") from None


def make_plan(config) -> Plan:
  """The plan of `config.phase`, with the depths checked against the preset."""
  m = config.model
  k = int(m.num_modules)
  depths = tuple(int(d) for d in m.depths)
  if len(depths) != k:
    raise ModassemError(f"model.depths={depths} has {len(depths)} entries but model.num_modules={k}: give one depth per module")
  if min(depths) < 1:
    raise ModassemError(f"model.depths={depths} has a module of depth {min(depths)}: every module needs at least "
                        f"one block; give {k} depths of 1 or more that sum to {m.depth}")
  if sum(depths) != m.depth:
    raise ModassemError(f"model.depths={depths} adds up to {sum(depths)} but preset {config.preset} has depth {m.depth}: "
                        f"give {k} positive depths that sum to {m.depth}")
  phase = config.phase
  if config.teacher and phase != "incubate":
    raise ModassemError(f"config.teacher is set, but a teacher only applies to incubation (this is a {phase} run): "
                        f"drop --config.teacher, or run the incubate phase")
  if phase == "meta":
    return Plan("meta", (1,) * k, tuple(range(k)), incubate=False)
  if phase in ("assemble", "e2e"):
    return Plan(phase, depths, tuple(range(k)), incubate=False)
  if phase == "incubate":
    module = parse_module(config.module)
    if module == "all":
      trained = tuple(range(k))
    elif 0 <= module < k:
      trained = (module,)
    else:
      raise ModassemError(f"config.module={module} is out of range: the model has modules 0..{k - 1}")
    return Plan("incubate", depths, trained, incubate=True,
                module_drop_path=config.incubation_drop_path == "module")
  raise ModassemError(f"unknown phase {phase!r}: use meta, incubate, assemble or e2e")


def scans(config) -> bool:
  """Whether `config`'s model runs each module's blocks under `nn.scan` (stacked parameter layout)."""
  return bool(config.model.scan)


def incubated_overrides(plan: Plan, i: int) -> dict:
  """How incubated module i's definition differs from its slot in the hybrid: with `module_drop_path`, its blocks
  are placed as in a model of its own depth (drop-path rates from 0 to model.drop_path over them)."""
  return {"block_offset": 0, "total_depth": plan.depths[i]} if plan.module_drop_path else {}


def frozen_overrides(plan: Plan) -> dict:
  """`frozen_arch` as the hybrid runs the meta modules: without drop path under `module_drop_path`."""
  return {**frozen_arch(plan), **({"drop_path": 0.0} if plan.module_drop_path else {})}


def frozen_arch(plan: Plan) -> dict:
  """The architecture overrides of the frozen modules of an incubation, meta and teacher alike: the meta model's
  width where it has another (`meta_arch`), and dense MLPs (a sparse student incubates in a dense meta model)."""
  return {**dict(plan.meta_arch or ()), "moe": None}


def moe_spec(config) -> tuple[MoeSpec | None, tuple]:
  """(the MoE MLP, which blocks of each module have it) of `config`'s target model; (None, ()) for a dense one.
  The layout is the target model's cut (`model.depths`) whatever hybrid runs a module: module i's blocks are the
  same in the target and in the hybrid that incubates it."""
  m = config.model.moe
  if not m.experts:
    return None, ()
  spec = MoeSpec(experts=m.experts, k=m.k, router=m.router, capacity_factor=m.capacity_factor,
                 noise_std=m.noise_std)
  return spec, moe_layout(tuple(config.model.depths), every=m.every, blocks=tuple(m.blocks))


def moe_of(config) -> tuple[MoeSpec | None, tuple]:
  """`moe_spec(config)` for the model `config.phase` trains: the meta phase's is dense whatever the target (the meta
  model that sparse modules incubate in is a ViT, as m2mKD's is)."""
  return (None, ()) if config.phase == "meta" else moe_spec(config)


def model_for(config, depths, *, dtype=None, scan=None, devices: int = 1, **arch) -> ViT:
  """The ViT of `config` with module depths `depths`; `arch` overrides width, heads or mlp_ratio (a meta model of
  another width). On a mesh of `devices`, an MoE MLP splits its experts over them where they divide evenly
  (moe.expert_shards; `sharding` places the expert parameters to match)."""
  m = config.model
  spec, layout = moe_of(config)
  spec = arch.pop("moe", spec)
  if spec is not None:
    spec = dataclasses.replace(spec, shards=expert_shards(spec.experts, devices))
  shape = {"width": m.width, "heads": m.heads, "mlp_ratio": m.mlp_ratio, **arch}
  return ViT(depths=tuple(depths), image_size=m.image_size, patch=m.patch, qkv_bias=m.qkv_bias, ln_eps=m.ln_eps,
             num_classes=m.num_classes, **shape,
             drop_path=m.drop_path, dropout=m.dropout, dtype=jnp.dtype(dtype or m.dtype), remat=m.remat,
             attention=m.attention, scan=scans(config) if scan is None else bool(scan), moe=spec,
             moe_layout=layout if len(layout) == len(depths) else ())


def init_trained(plan: Plan, model: ViT, key) -> dict:
  """Fresh parameters of the trained modules.

  The whole target is initialised and the trained slots are kept, so module i
  starts from the same values whether it is incubated alone or with the rest.
  It is initialised per block and stacked where the model scans, so that the
  layout changes how the step runs, never what it trains.
  """
  image = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  params = model.clone(scan=False).init(key, image)["params"]
  trained = {module_name(i): params[module_name(i)] for i in plan.trained}
  trained = stack_blocks(trained) if model.scan else trained
  if plan.stitched:
    tokens = (model.image_size // model.patch) ** 2 + 1
    meta_width = dict(plan.meta_arch)["width"]
    for i in plan.trained:
      k_in, k_out = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 0x5717C4), i))
      trained[stitch_name(i)] = {
          end: _stitch(model, width).init(k, jnp.zeros((1, tokens, other), jnp.float32))["params"]
          for end, width, other, k, needed in (("entry", model.width, meta_width, k_in, i > 0),
                                               ("exit", meta_width, model.width, k_out, i < plan.num_modules - 1))
          if needed}
  return trained


def _stitch(model: ViT, width: int) -> Stitch:
  return Stitch(width, ln_eps=model.ln_eps, dtype=model.dtype)


def stitch_name(k: int) -> str:
  """The stitch layers of incubated module k among the trained parameters: {"entry": ..., "exit": ...}."""
  return f"stitch_{k}"


def frozen_slots(plan: Plan) -> list[int]:
  """The meta modules an incubation run reads: slot k is needed while some other slot is trained."""
  if not plan.incubate:
    return []
  return [k for k in range(plan.num_modules) if any(i != k for i in plan.trained)]


def forward(plan: Plan, model_of, trained: Params, frozen: Params, images, *, train: bool, key, teacher=False,
            moe_stats=False):
  """Logits of every group: {group: [B, classes]}; with `teacher`, also the teacher hybrids' logits, under
  `teacher/{group}`.

  Joint plans run the trained model. Incubation runs the meta modules before
  the highest trained slot once (and outside any gradient: nothing before
  module i is trained, so no backward pass should go there), then for each
  trained module i its target module and the frozen meta modules after it.
  Per-module keys make `module=all` reproduce the single-module runs. In a
  meta model of another width, module i's input and output pass through its
  stitch layers. The teacher hybrid of slot i takes the same meta prefix
  activations, runs the teacher's module i and the meta modules after it
  deterministically (as evaluated), outside any gradient.

  With `moe_stats`, returns (logits, {group: what the trained modules' MoE layers sowed}) (moe.MoeMlp: the
  auxiliary loss, each expert's share, the dropped share), {} for a dense model.
  """
  if not plan.incubate:
    model = model_of(plan.depths)
    rngs = {"dropout": key} if train else {}
    if model.moe is None or not moe_stats:
      logits = {"model": model.apply({"params": trained}, images, train=train, rngs=rngs)}
      return (logits, {}) if moe_stats else logits
    out, sown = model.apply({"params": trained}, images, train=train, rngs=rngs, mutable=["moe"])
    return {"model": out}, {"model": sown["moe"]}

  meta = frozen_arch(plan)
  frozen_run = frozen_overrides(plan)

  stats = {}

  def run(model, k, params, x, k_key, in_train=train, arch=frozen_run):
    """Module k of `model` (by default a meta module, at the meta model's width)."""
    rngs = {"dropout": jax.random.fold_in(k_key, k)} if in_train else {}
    module = model.module(k, **arch)
    if not (moe_stats and arch is not frozen_run and module.moe is not None and module.moe_blocks):
      return module.apply({"params": params}, x, train=in_train, rngs=rngs)
    out, sown = module.apply({"params": params}, x, train=in_train, rngs=rngs, mutable=["moe"])
    stats[module_name(k)] = {module_name(k): sown["moe"]}
    return out

  def stitch(i, end, width, x):
    if not plan.stitched or end not in trained[stitch_name(i)]:
      return x
    return _stitch(model_of(plan.depths), width).apply({"params": trained[stitch_name(i)][end]}, x)

  prefix_key, _ = jax.random.split(key)
  # The meta modules before slot i are shared by every hybrid that incubates a
  # later slot; they run once per distinct total depth (once for an even cut),
  # since the total depth sets their drop-path rates (where they have any: not under `module_drop_path`).
  prefixes = {}
  for i in plan.trained:
    depths = plan.hybrid_depths(i)
    acts = prefixes.setdefault(sum(depths), [images])
    for k in range(len(acts) - 1, i):
      acts.append(jax.lax.stop_gradient(run(model_of(depths), k, frozen[module_name(k)], acts[-1], prefix_key)))

  logits = {}
  for i in plan.trained:
    model = model_of(plan.hybrid_depths(i))
    module_key = jax.random.fold_in(key, 1 + i)
    x = stitch(i, "entry", model.width, prefixes[sum(plan.hybrid_depths(i))][i])
    x = run(model, i, trained[module_name(i)], x, module_key, arch=incubated_overrides(plan, i))
    x = stitch(i, "exit", meta.get("width"), x)
    for k in range(i + 1, plan.num_modules):
      x = run(model, k, frozen[module_name(k)], x, module_key)
    logits[module_name(i)] = x
    if teacher:
      t_model = model_of(plan.teacher_hybrid_depths(i))
      t = run(t_model, i, frozen[teacher_name(i)], prefixes[sum(plan.hybrid_depths(i))][i], module_key, False)
      for k in range(i + 1, plan.num_modules):
        t = run(t_model, k, frozen[module_name(k)], t, module_key, False)
      logits[f"teacher/{module_name(i)}"] = jax.lax.stop_gradient(t)
  return (logits, stats) if moe_stats else logits


def moe_terms(sown) -> tuple[Any, dict]:
  """(the auxiliary losses summed over the MoE layers, {metric: value} per layer) of what MoE layers sowed:
  `moe/{module}/{block}/aux`, `.../dropped` and `.../expert_{e}` (its share of the assignments)."""
  total, metrics = jnp.zeros((), jnp.float32), {}
  for path, values in jax.tree_util.tree_flatten_with_path(sown, is_leaf=lambda x: isinstance(x, tuple))[0]:
    keys = [getattr(p, "key", str(p)) for p in path]
    name, value = keys[-1], values[0]
    where = keys[:-2]   # module, block ("blocks" under a scan: one row per block)
    rows = value if "blocks" in where else value[None]
    for j, row in enumerate(rows):
      layer = "/".join(where[:-1] + [f"blocks_{j}"]) if "blocks" in where else "/".join(where)
      if name == "aux_loss":
        total = total + row
        metrics[f"moe/{layer}/aux"] = row
      elif name == "dropped":
        metrics[f"moe/{layer}/dropped"] = row
      elif name == "expert_share":
        metrics.update({f"moe/{layer}/expert_{e}": row[e] for e in range(row.shape[0])})
  return total, metrics
