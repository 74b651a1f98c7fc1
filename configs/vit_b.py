"""ViT-B/16 on ImageNet-1K: `configs/vit_b.py:meta|incubate|assemble|e2e`."""

import common


def get_config(phase="meta"):
  return common.get_config("vit_b16", phase, assemble_drop_path=0.1, e2e_drop_path=0.1)
