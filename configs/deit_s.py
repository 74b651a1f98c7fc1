"""DeiT-S on ImageNet-1K: `configs/deit_s.py:meta|incubate|assemble|e2e`."""

import common


def get_config(phase="meta"):
  return common.get_config("deit_s", phase)
