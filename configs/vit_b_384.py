"""ViT-B/16 at 384 px, fine-tuned from a 224 px model: `configs/vit_b_384.py:assemble`."""

import high_res


def get_config(phase="assemble"):
  return high_res.get_config("vit_b16_384", phase, drop_path=0.1)
