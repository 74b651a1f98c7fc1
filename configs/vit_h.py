"""ViT-H/14 on ImageNet-1K: `configs/vit_h.py:meta|incubate|assemble|e2e`."""

import common


def get_config(phase="meta"):
  c = common.get_config("vit_h14", phase, assemble_drop_path=0.6, e2e_drop_path=0.6)
  # 632M parameters: shard them and their AdamW moments over the devices.
  c.sharding = "fsdp"
  return c
