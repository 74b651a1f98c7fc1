"""V-MoE-B/16 on ImageNet-1K as m2mKD trains it, its headline student: `configs/vmoe_b16.py:incubate|assemble|e2e`.

ViT-B/16's shape with every block's MLP a sparse Mixture-of-Experts layer, as m2mKD's `vmoe_base` builds it
(fastmoe's NaiveGate): 8 experts, top 2, a softmax over the two kept router logits, no capacity limit (no token is
dropped), no auxiliary loss. Cut 3/3/3/3.

- incubate: m2mKD. Each module grows in the frozen ViT-L meta model (`--config.meta=RUN`, a run of
  `configs/vit_l.py:meta`; stitch layers join width 768 to its 1024) and learns from a Deep Incubation ViT-L cut
  6/6/6/6 (`--config.teacher=RUN`, an assembled `configs/vit_l.py` run or an imported official checkpoint):
  100 epochs, lr 2e-3 at batch 2048, warmup 20, no clipping; drop path 0.1 rising over the module's own three blocks
  (the reference builds the student as a model of that depth), none in the meta model (built without it there).
- assemble: the four modules stacked (the stitch layers dropped) and trained end to end: batch 1024, lr 1e-3,
  100 epochs, no warmup, clip 1.0, drop path 0.1.
- e2e: the baseline m2mKD compares with, the same recipe from scratch.
There is no meta phase here: m2mKD's meta model is ViT-L's.
"""

import common


def moe(c, *, experts=8, k=2, every=1, router="topk_softmax", capacity_factor=0.0, noise_std=0.0, aux_weight=0.0):
  c.model.moe.update(dict(experts=experts, k=k, every=every, router=router, capacity_factor=capacity_factor,
                          noise_std=noise_std, aux_weight=aux_weight))
  return c


def get_config(phase="incubate"):
  if phase == "meta":
    raise ValueError("m2mKD's meta model is ViT-L's: train it with configs/vit_l.py:meta, then pass it to "
                     "configs/vmoe_b16.py:incubate as --config.meta")
  c = moe(common.get_config("vit_b16", phase))
  if phase == "incubate":
    c.stitch = True
    c.incubation_drop_path = "module"
  else:
    # End to end (the baseline and the assembled model's training): batch 1024 (lr 1e-3 by the linear rule),
    # 100 epochs, no warmup, gradients clipped at 1.0.
    c.batch_size = 1024
    c.epochs, c.warmup_epochs = 100.0, 0.0
    c.optim.clip_norm = 1.0
  return c
