"""The checks of a config before anything is built: every numeric field in its range, and the combinations no run
can use (a batch the devices cannot share, a phase without its inputs), each a one-line error saying what to pass.
"""

from __future__ import annotations

import math

from modassem import phases
from modassem.errors import ModassemError
from modassem.models.moe import expert_shards
from modassem.models.vit import REMAT_POLICIES
from modassem.phases import Plan

_DTYPES = ("float32", "bfloat16", "float16")

# Numeric fields a user can set to a value no run can use: (field, lowest, highest, lowest allowed itself?); every
# number of every preset has one (test_bad_commands.py). Checked before anything is built, so `--config.optim.lr=nan`
# stops at once, not at the first NaN loss.
_RANGES = (
    # A preset's own field where it has one (cifar_study.py), before the epochs it scales: a bad value is named as
    # the user set it, not as the epochs computed from it.
    ("unit_epochs", 0.0, math.inf, False),
    ("optim.lr", 0.0, math.inf, False), ("optim.lr_base_batch", 0.0, math.inf, False),
    ("optim.warmup_lr", 0.0, math.inf, True), ("optim.min_lr", 0.0, math.inf, True),
    ("optim.weight_decay", 0.0, math.inf, True), ("optim.clip_norm", 0.0, math.inf, True),
    ("optim.b1", 0.0, 1.0, True), ("optim.b2", 0.0, 1.0, True), ("optim.eps", 0.0, math.inf, False),
    ("batch_size", 1, math.inf, True), ("eval_batch_size", 1, math.inf, True), ("accum_steps", 1, math.inf, True),
    ("total_steps", 0, math.inf, True), ("warmup_steps", -1, math.inf, True), ("epochs", 0.0, math.inf, False),
    ("warmup_epochs", 0.0, math.inf, True), ("log_every_steps", 1, math.inf, True),
    ("checkpoint_every_steps", 1, math.inf, True), ("eval_every_steps", 0, math.inf, True),
    ("keep_checkpoints", 1, math.inf, True), ("label_smoothing", 0.0, 1.0, True), ("mixup", 0.0, math.inf, True),
    ("cutmix", 0.0, math.inf, True), ("mixup_prob", 0.0, 1.0, True), ("mixup_group", 0, math.inf, True),
    ("mixup_switch_prob", 0.0, 1.0, True),
    ("model.width", 1, math.inf, True), ("model.heads", 1, math.inf, True), ("model.depth", 1, math.inf, True),
    ("model.patch", 1, math.inf, True), ("model.image_size", 1, math.inf, True),
    ("model.num_classes", 1, math.inf, True), ("model.mlp_ratio", 0.0, math.inf, False),
    ("model.drop_path", 0.0, 1.0, True), ("model.dropout", 0.0, 1.0, True), ("model.ln_eps", 0.0, math.inf, False),
    ("model.num_modules", 1, math.inf, True), ("model.moe.experts", 0, math.inf, True),
    ("model.moe.k", 1, math.inf, True), ("model.moe.every", 0, math.inf, True),
    ("model.moe.capacity_factor", 0.0, math.inf, True), ("model.moe.noise_std", 0.0, math.inf, True),
    ("model.moe.aux_weight", 0.0, math.inf, True),
    ("distill.alpha", 0.0, 1.0, True), ("distill.tau", 0.0, math.inf, False),
    ("data.random_erase", 0.0, 1.0, True), ("data.repeated_aug", 1, math.inf, True),
    ("data.crop_area_min", 0.0, 1.0, False), ("data.eval_crop_ratio", 0.0, 1.0, False),
    ("data.train_fraction", 0.0, 1.0, False), ("data.prefetch", 0, math.inf, True),
    ("data.threads", -1, math.inf, True),   # 0 or -1 (tf.data's AUTOTUNE): tf.data sizes its thread pool itself
    # JAX's keys take a signed 64-bit seed; the data order's NumPy generators a non-negative one.
    ("seed", 0, 2 ** 63 - 1, True), ("data.subset_seed", 0, 2 ** 63 - 1, True),
)


def check_numbers(config) -> None:
  """Each field of `_RANGES` is a finite number in its range (an int where the default is one)."""
  for field, low, high, closed in _RANGES:
    node = config
    for part in field.split("."):
      node = node.get(part) if node is not None and hasattr(node, "get") else None
    if node is None:
      continue
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
      raise ModassemError(f"{field}={node!r} is not a finite number: pass one, e.g. --config.{field}=VALUE")
    above = node >= low if closed else node > low
    if not (above and node <= high):
      show = lambda v: str(v) if isinstance(v, int) else f"{v:g}"
      bound = f"{'>=' if closed else '>'} {show(low)}" + ("" if high == math.inf else f" and <= {show(high)}")
      raise ModassemError(f"{field}={node!r} is out of range: it must be {bound}")


def _check_moe(config) -> None:
  """The MoE settings build a model: the layer's own checks and the layout's, as one-line errors."""
  if not config.model.moe.experts:
    return
  try:
    spec, layout = phases.moe_spec(config)
    spec.check()
  except ValueError as e:
    raise ModassemError(str(e)) from None
  if not any(layout):
    raise ModassemError(f"model.moe.experts={spec.experts} but no block has an MoE MLP (model.moe.every="
                        f"{config.model.moe.every}, model.moe.blocks={tuple(config.model.moe.blocks)}): set "
                        f"model.moe.every=1 for every block, or model.moe.experts=0 for a dense model")
  if config.model.scan and any(0 < len(blocks) < depth for blocks, depth in zip(layout, config.model.depths)):
    raise ModassemError("model.scan needs one kind of block per module, and model.moe puts MoE MLPs in some blocks "
                        "of a module only: set model.scan=False, or model.moe.every=1")


def check_config(config, plan: Plan, num_devices: int, *, load_sources: bool = True) -> None:
  check_numbers(config)
  m = config.model
  if m.image_size % m.patch:
    raise ModassemError(f"model.image_size={m.image_size} is not divisible by model.patch={m.patch}: "
                        f"use an image size that is a multiple of {m.patch}")
  if m.width % m.heads:
    raise ModassemError(f"model.width={m.width} is not divisible by model.heads={m.heads}")
  if m.attention not in ("auto", "xla", "cudnn"):
    raise ModassemError(f"model.attention={m.attention!r} is unknown: use auto, xla or cudnn")
  if not isinstance(m.scan, bool):
    raise ModassemError(f"model.scan={m.scan!r} is not a boolean: use True or False")
  _check_moe(config)
  if config.incubation_drop_path not in ("hybrid", "module"):
    raise ModassemError(f"incubation_drop_path={config.incubation_drop_path!r} is unknown: use hybrid (Deep "
                        "Incubation's) or module (m2mKD's)")
  spec = phases.moe_of(config)[0]   # None where this phase's model is dense (a sparse config's meta phase)
  if spec is not None and m.dropout > 0 and expert_shards(spec.experts, num_devices) > 1:
    raise ModassemError(f"model.dropout={m.dropout:g} inside MoE experts split over {num_devices} devices is not "
                        "supported: set model.dropout=0 (as every preset does)")
  if m.remat not in REMAT_POLICIES:
    raise ModassemError(f"model.remat={m.remat!r} is unknown: use one of {', '.join(REMAT_POLICIES)}")
  if str(m.dtype) not in _DTYPES:
    raise ModassemError(f"model.dtype={m.dtype!r} is unknown: use one of {', '.join(_DTYPES)}")
  per = num_devices * config.accum_steps
  if config.batch_size % per:
    raise ModassemError(f"batch_size={config.batch_size} is not divisible by devices x accum_steps = "
                        f"{num_devices} x {config.accum_steps}: use a multiple of {per}")
  group = int(config.mixup_group)
  if (config.mixup > 0 or config.cutmix > 0) and 0 < group < config.batch_size and config.batch_size % group:
    raise ModassemError(f"batch_size={config.batch_size} is not a multiple of mixup_group={group} (examples per "
                        f"Mixup/CutMix draw): use a multiple of {group}, or set mixup_group to 0 (one draw per batch)")
  if config.eval_batch_size % num_devices:
    raise ModassemError(f"eval_batch_size={config.eval_batch_size} is not divisible by the {num_devices} devices")
  if plan.phase == "incubate" and not config.meta:
    raise ModassemError("incubation needs the meta run: pass --config.meta=WORKDIR_OF_THE_META_RUN")
  if plan.phase == "assemble" and load_sources:
    listed = [s for s in str(config.modules).split(",") if s]
    if len(listed) != plan.num_modules:
      raise ModassemError(f"config.modules lists {len(listed)} run(s), the model has {plan.num_modules} modules: "
                          f"pass one incubation run per module, comma-separated, in module order")
