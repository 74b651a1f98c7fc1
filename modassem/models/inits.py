"""Initialisers that draw as the official PyTorch code draws, where Flax's defaults differ."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def timm_trunc_normal(std: float = 0.02, a: float = -2.0, b: float = 2.0):
  """timm's `trunc_normal_(std=0.02)`: a normal of std `std` cut at the *absolute* bounds [a, b].

  At std 0.02 the cut is at +-100 standard deviations, so the draw is a plain normal of std 0.02. Flax's
  `truncated_normal(stddev=0.02)` cuts at +-2 standard deviations instead, which leaves a std of about 0.0176;
  JAX's bounds are in units of the standard deviation, hence the division.
  """
  return nn.initializers.truncated_normal(stddev=std, lower=a / std, upper=b / std)


def fastmoe_expert_kernel(width: int, hidden: int):
  """fastmoe's expert weights: `kaiming_uniform_(a=sqrt(5))` on its (experts, out, in) stack.

  PyTorch takes a 3-D tensor's fan-in as dim 1 times the rest (out * in), not `in` as for a Linear: the bound is
  1/sqrt(width * hidden) for both of an expert's matrices (about 6.5e-4 for V-MoE-B), far below a Linear's
  1/sqrt(in). m2mKD's V-MoE keeps this init: timm's init touches `nn.Linear` layers only.
  """
  bound = 1.0 / math.sqrt(width * hidden)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
