"""ViT-L/16 on ImageNet-1K: `configs/vit_l.py:meta|incubate|assemble|e2e`."""

import common


def get_config(phase="meta"):
  # Assembly of L uses drop path 0.5 (the official FT runs). The E2E baseline
  # uses the same: deep ViTs trained from scratch need strong stochastic depth.
  return common.get_config("vit_l16", phase, assemble_drop_path=0.5, e2e_drop_path=0.5)
