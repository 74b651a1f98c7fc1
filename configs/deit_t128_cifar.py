"""DeiT-T with 128 blocks on CIFAR-100 (32 px, 4-px patches): `configs/deit_t128_cifar.py:PHASE`."""

import common


def get_config(phase="meta"):
  return common.get_cifar_config("deit_t128_cifar", phase)
