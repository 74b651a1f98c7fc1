"""A deep, narrow ViT on CIFAR at 32 px with 4-px patches, on a schedule a CPU can run: `configs/cifar_study.py:PHASE`.

- **Depth** is a parameter: `--config.model.depth=D --config.model.depths=(D/4,D/4,D/4,D/4)` (32 by default;
  width 64, 2 heads: preset `cifar_narrow`).
- **Phases in the paper's proportions**: meta 3 units, incubation 1 unit (each module, or all four together),
  assembly 1 unit, as the paper's 300 : 100 : 100 epochs; `modassem pipeline` gives e2e the method's FLOPs.
  `--config.unit_epochs=U` scales every phase at once (4 by default: meta 12 epochs, incubation and assembly 4).
- **Data**: a class-balanced tenth of CIFAR-10's train split (`data.train_fraction`) from TFDS (`cifar10`, or
  `--config.data.tfds_name=cifar100 --config.model.num_classes=100`), or an image folder:
  `--config.data.name=folder --config.data.path=DIR`.
- **Recipe**: kept from DeiT's are AdamW (weight decay 0.05, no decay on biases, norms and tokens), the cosine
  schedule with a linear warmup (a tenth of each phase; none for assembly, as officially), label smoothing 0.1, and the padded random crop and flip
  of CIFAR training. Left out are RandAugment, random erasing, repeated augmentation, Mixup/CutMix and stochastic
  depth: regularisers that pay off over hundreds of epochs and only slow learning down over a few. The learning
  rate is 1e-3 per 128 images (DeiT's 5e-4 per 512 is set for 300 epochs on ImageNet).
- **Precision**: float32 compute, the official code's default (it runs AMP only when asked), and on CPUs the faster
  one (bfloat16 is emulated there: about 1.3x slower per step at depth 32). `--config.model.dtype=bfloat16` as on
  accelerators.
"""

import ml_collections

import common

# Units of `unit_epochs` per phase; e2e's length comes from the method's FLOPs in the pipeline (3 + 1 + 1 for a
# run on its own). Warmup as a share of the phase: none for assembly, which fine-tunes, as in the official runs.
_UNITS = {"meta": 3.0, "incubate": 1.0, "assemble": 1.0, "e2e": 5.0}
_WARMUP = {"meta": 0.1, "incubate": 0.1, "assemble": 0.0, "e2e": 0.1}


def get_config(phase="meta"):
  c = common.get_cifar_config("cifar_narrow", phase)
  c.data.tfds_name = "cifar10"
  c.data.train_fraction = 0.1
  c.data.randaugment = ""
  c.data.random_erase = 0.0
  c.data.repeated_aug = 1
  c.mixup = 0.0
  c.cutmix = 0.0
  c.model.drop_path = 0.0
  c.model.dtype = "float32"
  c.optim.lr = 1e-3
  c.optim.lr_base_batch = 128
  c.batch_size = 128
  c.eval_batch_size = 500
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  # One field scales every phase: the epochs follow it wherever it is overridden.
  unit = ml_collections.FieldReference(4.0)
  c.unit_epochs = unit
  c.epochs = unit * _UNITS[phase]
  c.warmup_epochs = unit * (_UNITS[phase] * _WARMUP[phase])
  return c
