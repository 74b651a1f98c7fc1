"""V-MoE-B/16 with Google's routing (Riquelme et al. 2021, google-research/vmoe).

    configs/vmoe_b16_google.py:meta|incubate|assemble|e2e

The MoE layer in every other block (blocks 1, 3, ..., 11 of the twelve, as V-MoE's "every 2"), 8 experts, top 2
of a softmax over all experts (not renormalised), noisy gating (std 1/8 while training), a capacity factor of 1.05
with batch-priority routing (assignments past an expert's capacity are dropped: the token keeps its residual path),
and the load-balancing loss at weight 0.01. The recipe otherwise is the DeiT one of the other ImageNet presets, so
that the routing is what differs from `configs/vit_b.py`; for m2mKD's student and recipe see `configs/vmoe_b16.py`.
"""

import common
from vmoe_b16 import moe


def get_config(phase="e2e"):
  c = moe(common.get_config("vit_b16", phase), every=0, router="softmax_topk", capacity_factor=1.05,
          noise_std=1 / 8, aux_weight=0.01)
  c.model.moe.blocks = tuple(range(1, c.model.depth, 2))
  return c
