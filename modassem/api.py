"""`modassem.load`: a trained model in a notebook, from a run directory or an official checkpoint.

    model, params = modassem.load("runs/b/asm")        # or "deit_incubation_vit_b.pth"
    logits = model.apply({"params": params}, images)   # images: [B, H, W, 3] float, normalised
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from modassem import convert, files
from modassem.errors import ModassemError
from modassem.models.vit import ViT


def load(path: str, *, preset: str | None = None, image_size: int | None = None) -> tuple[ViT, dict]:
  """(model, params) of a run directory or an official `.pth` file.

  A run directory gives the model its modules make (an incubation run of one
  module gives its hybrid, with the meta run's modules in the other slots);
  a `.pth` file gives the model it holds, with heads and LayerNorm eps from
  `preset` (found from the shapes when not given). `image_size` moves the
  position embedding to another resolution, bicubically as the official code
  does for high-resolution fine-tuning. torch is needed for `.pth` files only.
  """
  if files.path(path).is_dir():
    if preset is not None:
      raise ModassemError("preset applies to .pth files; a run directory has its own architecture")
    m = convert.model_from_run(path)
  else:
    m = convert.model_from_pth(path, preset)
  if image_size is not None:
    m = convert.at_image_size(m, image_size)
  model = ViT(depths=tuple(m.depths), **m.arch)
  params = jax.tree_util.tree_map(jnp.asarray, m.params())
  return model, params
