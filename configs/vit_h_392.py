"""ViT-H/14 at 392 px, fine-tuned from a 224 px model: `configs/vit_h_392.py:assemble`."""

import high_res


def get_config(phase="assemble"):
  return high_res.get_config("vit_h14_392", phase, drop_path=0.6, sharding="fsdp")  # 632M parameters, as in vit_h.py
