"""The smallest complete setup, for tests: `configs/tiny.py:meta|incubate|assemble|e2e`."""

import common


def get_config(phase="meta"):
  c = common.get_config("tiny", phase)
  c.data.name = "digits"
  c.data.tfds_name = ""
  c.data.augment = "none"
  c.model.dtype = "float32"
  c.batch_size = 32
  c.eval_batch_size = 64
  c.optim.lr = 4e-3
  c.total_steps = 6
  c.warmup_steps = 2
  c.log_every_steps = 2
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 3
  c.progress = "off"
  return c
