"""What an official checkpoint is: its kind (from the depths), its architecture (from the shapes and a
preset), and the position embedding moved to another resolution."""

from __future__ import annotations

import dataclasses

import numpy as np

from modassem.errors import ModassemError
from modassem.models.presets import ARCH_FIELDS, PRESETS
from modassem.names import module_name

_MLP_RATIO = 4.0  # every preset's; the checkpoint's own ratio is read from its fc1


@dataclasses.dataclass
class Model:
  """A whole model as the official code runs it: one parameter tree per module (all K of them)."""
  arch: dict            # ARCH_FIELDS
  preset: str
  depths: list[int]     # blocks per module of this model (a hybrid's depths for an incubated module)
  modules: list[dict]   # Flax parameter trees of module_0 .. module_{K-1}, NumPy arrays

  @property
  def kind(self) -> tuple[str, list[int]]:
    return kind_of(self.depths)

  def params(self) -> dict:
    return {module_name(k): tree for k, tree in enumerate(self.modules)}


# --- what a checkpoint is, from its depths ---------------------------------

def kind_of(depths) -> tuple[str, list[int]]:
  """(phase, trained modules) of a model with these module depths.

  One block everywhere is a meta model; one deep module among one-block
  modules is the hybrid that incubated that module; anything else is a target
  model (assembled, or trained end to end: the weights cannot tell).
  """
  depths = list(depths)
  deep = [k for k, d in enumerate(depths) if d > 1]
  if not deep:
    return "meta", list(range(len(depths)))
  if len(deep) == 1 and len(depths) > 1:
    return "incubate", deep
  return "assemble", list(range(len(depths)))


def run_depths(depths) -> list[int]:
  """`depths` of run.json: the target's cut, which for an incubated module is its depth in every slot."""
  phase, trained = kind_of(depths)
  if phase == "incubate":
    return [depths[trained[0]]] * len(depths)
  return list(depths)


def describe(phase: str, trained: list[int], depths) -> str:
  cut = ",".join(str(d) for d in depths)
  if phase == "meta":
    return f"meta model (depths {cut})"
  if phase == "incubate":
    return f"incubated module {trained[0]} of {len(depths)} (hybrid depths {cut})"
  return f"final model (depths {cut})"


# --- presets ---------------------------------------------------------------

def preset_arch(name: str) -> dict:
  p = dict(PRESETS[name])
  p.setdefault("mlp_ratio", _MLP_RATIO)
  return {f: p[f] for f in ARCH_FIELDS}


def _total_depth(depths) -> int | None:
  """The target model's depth, when the weights tell it (a meta model's do not)."""
  return sum(run_depths(depths)) if kind_of(depths)[0] != "meta" else None


def _fits(name: str, arch: dict, depths) -> bool:
  p = PRESETS[name]
  total = _total_depth(depths)
  return (p["patch"] == arch["patch"] and p["width"] == arch["width"] and p["qkv_bias"] == arch["qkv_bias"]
          and _MLP_RATIO == arch["mlp_ratio"] and (total is None or total == p["depth"])
          and p["width"] % p["heads"] == 0)


def match_preset(arch: dict, depths, preset: str | None, where: str) -> str:
  """The preset whose heads and LayerNorm eps the checkpoint was trained with.

  Heads and eps leave no trace in the weights' shapes, so they come from a
  preset: the one passed, or the one that agrees with every shape (ties go to
  the one with the checkpoint's image size and classes).
  """
  desc = (f"patch {arch['patch']}, width {arch['width']}, MLP ratio {arch['mlp_ratio']:g}, "
          f"qkv bias {'yes' if arch['qkv_bias'] else 'no'}, depth {_total_depth(depths) or 'unknown (meta model)'}")
  if preset is not None:
    if preset not in PRESETS:
      raise ModassemError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    if not _fits(preset, arch, depths):
      raise ModassemError(f"{where} ({desc}) does not fit preset {preset}: pass a preset with the same architecture")
    return preset
  fits = [n for n in PRESETS if _fits(n, arch, depths)]
  if not fits:
    raise ModassemError(f"{where} ({desc}) matches no preset: give its attention heads (and LayerNorm eps, if not "
                        f"the official 1e-6) with --heads=N [--ln_eps=E], or heads=N in modassem.load")
  fits.sort(key=lambda n: (PRESETS[n]["image_size"] != arch["image_size"],
                           PRESETS[n]["num_classes"] != arch["num_classes"]))
  best = fits[0]
  rivals = [n for n in fits if (PRESETS[n]["heads"], PRESETS[n]["ln_eps"]) != (PRESETS[best]["heads"],
                                                                              PRESETS[best]["ln_eps"])]
  if rivals:
    raise ModassemError(f"{where} ({desc}) fits presets {best} and {rivals[0]}, which differ in heads or LayerNorm eps: "
                        f"pass --preset")
  return best


# --- position embedding ----------------------------------------------------

def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution weights of the 4 taps around each sample (offsets -1, 0, 1, 2)."""
  def near(x):   # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):    # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in]: 1-D bicubic resampling exactly as PyTorch's `interpolate(mode="bicubic", align_corners=False)`.

  `jax.image.resize` is no substitute: its cubic kernel uses a=-0.5 where
  PyTorch uses a=-0.75, and it antialiases when shrinking. Checkpoints
  fine-tuned at high resolution by the official code saw PyTorch's
  interpolation, so we reproduce it: half-pixel source coordinates (not
  clamped at 0 for cubic), four taps with a=-0.75, and taps outside the grid
  read the edge value.
  """
  scale = size_in / size_out
  src = (np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)
  out = np.zeros((size_out, size_in), np.float64)
  for tap in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + tap, 0, size_in - 1)
    np.add.at(out, (np.arange(size_out), idx), weights[:, tap])
  return out


def resize_pos_embed(pos, new_grid) -> np.ndarray:
  """[1, 1 + g*g, C] -> [1, 1 + h*w, C]: the class-token entry kept, the patch grid resized bicubically.

  `new_grid` is an int (square) or (h, w). The resize is separable, so it is
  two matrix products in float64 (the same values as PyTorch's up to float32
  rounding).
  """
  pos = np.asarray(pos)
  h, w = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
  n, c = pos.shape[1] - 1, pos.shape[2]
  g = int(round(np.sqrt(n)))
  if g * g != n:
    raise ModassemError(f"pos_embed has {n} patch positions, not a square grid")
  if (g, g) == (h, w):
    return pos
  grid = pos[0, 1:].reshape(g, g, c).astype(np.float64)
  grid = np.einsum("oh,hwc->owc", bicubic_matrix(g, h), grid)
  grid = np.einsum("pw,owc->opc", bicubic_matrix(g, w), grid)
  out = np.concatenate([pos[0, :1].astype(np.float64), grid.reshape(h * w, c)], axis=0)
  return out[None].astype(pos.dtype)


def at_image_size(model: Model, image_size: int) -> Model:
  """`model` for another input size: module 0's position embedding resized to the new patch grid."""
  patch = model.arch["patch"]
  if image_size % patch:
    raise ModassemError(f"image size {image_size} is not a multiple of the patch size {patch}")
  if image_size == model.arch["image_size"]:
    return model
  modules = list(model.modules)
  if "pos_embed" in modules[0]:
    modules[0] = {**modules[0], "pos_embed": resize_pos_embed(modules[0]["pos_embed"], image_size // patch)}
  return dataclasses.replace(model, arch={**model.arch, "image_size": image_size}, modules=modules)


