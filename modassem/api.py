"""`modassem.load`: a trained model in a notebook, from a run directory or an official checkpoint.

    model, params = modassem.load("runs/b/asm")        # or "deit_incubation_vit_b.pth"
    logits = model.apply({"params": params}, images)   # images: [B, H, W, 3] float, normalised
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from modassem import convert, files
from modassem.errors import ModassemError
from modassem.models.vit import ViT, vit_of


def load(path: str, *, preset: str | None = None, heads: int | None = None, ln_eps: float | None = None,
         module: int | None = None, image_size: int | None = None) -> tuple[ViT, dict]:
  """(model, params) of a run directory or an official `.pth` file.

  A run directory gives the model its modules make (an incubation run gives a
  module's hybrid, with the meta run's modules in the other slots; `module=i`
  picks module i's from a run that incubated all of them). A `.pth` file gives
  the model it holds, with heads and LayerNorm eps from `heads`/`ln_eps` for an
  architecture no preset has (eps defaults to the official code's 1e-6), else
  from `preset`, else from the preset that fits its shapes. `image_size` moves
  the position embedding to another resolution, bicubically as the official
  code does for high-resolution fine-tuning. torch is needed for `.pth` only.
  """
  if files.path(path).is_dir():
    if (preset, heads, ln_eps) != (None, None, None):
      raise ModassemError("preset, heads and ln_eps apply to .pth files; a run directory has its own architecture")
    m = convert.model_from_run(path, module)
  else:
    if module is not None:
      raise ModassemError("module applies to incubation run directories; a .pth file holds one model")
    m = convert.model_from_pth(path, preset, heads=heads, ln_eps=ln_eps)
  if image_size is not None:
    m = convert.at_image_size(m, image_size)
  model = vit_of(m.arch, m.depths)
  params = jax.tree_util.tree_map(jnp.asarray, m.params())
  return model, params
