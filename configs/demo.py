"""A small demo on the built-in digits data: `configs/demo.py:meta|incubate|assemble|e2e`.

`modassem pipeline --config=configs/demo.py --workdir=runs/demo` runs every
phase and the end-to-end baseline on 2 CPU cores in minutes. The model is
deep and narrow (16 blocks of width 64, four modules of four blocks) because
that is where the method helps; the schedules keep the paper's proportions
(meta 300 : incubation 100 per module : assembly 100, against 300 end to end),
here counted in optimizer steps.
"""

import common

# Optimizer steps per phase, in the paper's 3 : 1 : 1 (: 3 for e2e) proportions.
STEPS = {"meta": 300, "incubate": 100, "assemble": 100, "e2e": 300}


def get_config(phase="meta"):
  c = common.get_config("demo", phase)
  c.data.name = "digits"
  c.data.tfds_name = ""
  # 8x8 digits blown up to 16 px do not survive random crops: they shift the
  # train images away from the held-out ones more than they regularise.
  c.data.augment = "none"
  c.model.dtype = "float32"        # CPU: bfloat16 is emulated and slower
  c.batch_size = 128
  c.eval_batch_size = 360
  c.optim.lr = 1.2e-2              # per 512 images: 3e-3 at batch 128, for a short schedule
  c.total_steps = STEPS[phase]
  c.warmup_steps = {"meta": 20, "incubate": 20, "assemble": 0, "e2e": 5}[phase] * 2
  c.mixup = 0.0                    # a few hundred steps on 1.4k images: mixing only slows learning
  c.cutmix = 0.0
  c.log_every_steps = 25
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  return c
