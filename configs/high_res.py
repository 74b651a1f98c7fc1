"""High-resolution fine-tuning, shared by `vit_b_384.py`, `vit_l_384.py` and `vit_h_392.py`.

The paper's 384 / 392 px results fine-tune the 224 px models at the higher
resolution. Here that is an `assemble` run whose module sources are official
checkpoints imported with `modassem convert --preset=vit_b16_384` etc., which
resizes the position embedding bicubically (a 224 px modassem run, the e2e
baseline included, goes there by `convert` to a .pth and back with the
preset; the same run may be listed once per module). The schedule is DeiT's high-resolution fine-tuning
(30 epochs, lr 5e-6 per 512 images down to the same floor, weight decay
1e-8); the phase's own drop path and clipping stay.
"""

import common

def get_config(preset, phase, drop_path, sharding="data"):
  if phase != "assemble":
    # e2e would train from scratch: at high resolution every model is fine-tuned from trained weights.
    raise ValueError(f"high-resolution configs fine-tune a trained model: use :assemble, not :{phase}")
  c = common.get_config(preset, phase, assemble_drop_path=drop_path, e2e_drop_path=drop_path)
  c.epochs = 30.0
  c.warmup_epochs = 0.0
  c.optim.lr = 5e-6
  c.optim.min_lr = 5e-6
  c.optim.weight_decay = 1e-8
  c.sharding = sharding
  return c
