"""DeiT-T with 32 blocks on CIFAR-100 (32 px, 4-px patches): `configs/deit_t32_cifar.py:PHASE`."""

import common


def get_config(phase="meta"):
  return common.get_cifar_config("deit_t32_cifar", phase)
