"""DeiT-T with 32 blocks on CIFAR-100 (32 px, 4-px patches): `configs/deit_t32_cifar.py:PHASE`.

The paper's CIFAR-100 table compares this model trained end to end with the
assembled one. CIFAR-100 comes from TFDS (`tfds build cifar100` once on a
machine with internet access), or from an image folder:
`--config.data.name=folder --config.data.path=DIR`.
"""

import common


def get_config(phase="meta"):
  c = common.get_config("deit_t32_cifar", phase)
  c.data.tfds_name = "cifar100"
  c.data.eval_crop_ratio = 1.0     # 32-px images: evaluate the whole image
  c.batch_size = 1024
  c.eval_batch_size = 1000
  return c
