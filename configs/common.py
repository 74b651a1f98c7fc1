"""The training recipe shared by every preset: DeiT's, as the official runs use it.

A preset file calls `get_config(preset, phase)` and changes what differs.
Every field can be overridden on the command line, e.g.
`--config.batch_size=256 --config.optim.lr=1e-3 --config.module=2`.
"""

import ml_collections

from modassem.data import default_config as data_default_config
from modassem.models.presets import PRESETS

PHASES = ("meta", "incubate", "assemble", "e2e")

# Per phase: (epochs, warmup epochs, drop path, gradient-clip norm) of the
# official ImageNet runs. The clip norm of 0 means no clipping.
_SCHEDULE = {
    "meta": (300, 20, 0.0, 0.0),
    "incubate": (100, 20, 0.1, 0.0),
    "assemble": (100, 0, None, 1.0),   # drop path of FT is per preset
    "e2e": (300, 5, None, 0.0),        # drop path of E2E is per preset
}


def get_config(preset: str, phase: str, *, num_modules: int = 4, assemble_drop_path: float = 0.1,
               e2e_drop_path: float = 0.1) -> ml_collections.ConfigDict:
  if phase not in PHASES:
    raise ValueError(f"unknown phase {phase!r}: use one of {', '.join(PHASES)} (e.g. configs/vit_b.py:meta)")
  arch = dict(PRESETS[preset])
  epochs, warmup, drop_path, clip = _SCHEDULE[phase]
  if drop_path is None:
    drop_path = assemble_drop_path if phase == "assemble" else e2e_drop_path

  c = ml_collections.ConfigDict()
  c.preset = preset
  c.phase = phase
  c.seed = 0

  depth = arch.pop("depth")
  c.model = ml_collections.ConfigDict(arch)
  c.model.depth = depth
  c.model.mlp_ratio = 4.0
  c.model.num_modules = num_modules
  # The target's cut into modules; an even split unless overridden. Meta
  # models always have one block per module.
  c.model.depths = tuple([depth // num_modules] * num_modules)
  c.model.drop_path = drop_path
  c.model.dropout = 0.0
  c.model.dtype = "bfloat16"   # compute dtype; parameters stay float32
  c.model.remat = "none"       # per-block rematerialisation: none | dots | full (less memory, more compute)
  c.model.attention = "auto"   # auto: cuDNN flash attention on GPUs in half precision, XLA elsewhere
  c.model.scan = False         # nn.scan over each module's blocks: compile time independent of depth
  # Sparse Mixture-of-Experts MLPs (modassem/models/moe.py); experts=0 is a dense ViT. `every`=n puts one in each
  # module's n-th, 2n-th, ... block (1: every block, as m2mKD's V-MoE student; 2: every other, as Google's V-MoE),
  # or `blocks` lists them by index in the whole model. router: "topk_softmax" (m2mKD's: a softmax over the top k
  # logits, no token dropped) or "softmax_topk" (V-MoE's: the top k of a softmax over all experts, with a
  # `capacity_factor` > 0 for batch-priority routing and `noise_std` for noisy gating). `aux_weight` weighs the
  # load-balancing loss, summed over the MoE layers, in each module's loss.
  c.model.moe = ml_collections.ConfigDict(dict(
      experts=0, k=2, every=1, blocks=(), router="topk_softmax", capacity_factor=0.0, noise_std=0.0,
      aux_weight=0.0))

  # Phase inputs: which module to incubate ("all" or an index), where the meta
  # run is, and the K incubation runs that assembly stacks (comma-separated).
  c.module = "all"
  c.meta = ""
  c.modules = ""
  # Assembly stacks modules that grew in one meta model: incubation runs of different meta runs are refused unless
  # this is set (recorded in the run's config.json).
  c.allow_mixed_meta = False
  # m2mKD: an incubation run learns from a trained teacher's module i in slot i of the same meta model as well
  # as from the labels. `teacher` is a finished run directory (assembled, e2e or imported) cut into the same K
  # modules; "" is plain incubation. Loss: (1 - alpha) * CE + alpha * tau^2 * KL(teacher || student) / (B * classes).
  c.teacher = ""
  c.distill = ml_collections.ConfigDict(dict(alpha=0.5, tau=1.0))
  # Incubation in a meta run of another width (m2mKD's stitch layers join each module to it); off, a meta run of
  # another width is an error, as it usually is a mistake.
  c.stitch = False
  # Incubation's stochastic depth: "hybrid" (Deep Incubation) lets the rates rise over the blocks' places in the
  # hybrid, the meta modules' blocks included; "module" (m2mKD) over each incubated module's own blocks, as in a
  # model of that depth, the meta modules without any.
  c.incubation_drop_path = "hybrid"

  c.batch_size = 2048          # global, summed over devices and accumulation
  c.accum_steps = 1
  c.epochs = float(epochs)
  c.warmup_epochs = float(warmup)
  c.total_steps = 0            # > 0 overrides epochs
  c.warmup_steps = -1          # >= 0 overrides warmup_epochs

  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-4,                 # per `lr_base_batch` images; scaled linearly with the global batch
      lr_base_batch=512,
      warmup_lr=1e-6,
      min_lr=1e-5,
      weight_decay=0.05,
      b1=0.9, b2=0.999, eps=1e-8,
      clip_norm=clip,
  ))
  c.label_smoothing = 0.1
  c.mixup = 0.8
  c.cutmix = 1.0
  c.mixup_switch_prob = 0.5
  c.mixup_prob = 1.0
  # Examples per Mixup/CutMix draw: the official runs draw once per GPU batch (128 images); 0 = once per batch.
  c.mixup_group = 128

  c.data = data_default_config()
  c.data.name = "tfds"
  c.data.tfds_name = "imagenet2012"

  c.eval_batch_size = 1024
  c.eval_every_steps = 0       # 0: once per epoch
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.sharding = "data"          # "data": replicate params; "fsdp": shard params and optimizer state
  c.progress = "auto"          # progress bar: "auto" (when interactive), "on", "off"
  return c


def get_cifar_config(preset: str, phase: str) -> ml_collections.ConfigDict:
  """CIFAR-100 at 32 px with 4-px patches, the paper's CIFAR table.

  CIFAR-100 comes from TFDS (`tfds build cifar100 --file_format=array_record`
  once on a machine with internet access), or from an image folder:
  `--config.data.name=folder --config.data.path=DIR`.
  """
  c = get_config(preset, phase)
  c.data.tfds_name = "cifar100"
  c.data.augment = "cifar"         # padded random crop + flip, then the recipe's RandAugment and erasing
  c.data.eval_crop_ratio = 1.0     # 32-px images: evaluate the whole image
  c.batch_size = 1024
  c.eval_batch_size = 1000
  return c
