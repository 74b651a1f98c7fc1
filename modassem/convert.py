"""Checkpoint interchange with the official PyTorch code.

An official checkpoint (`.pth`) holds `model_stages`: one state dict per
module, keys local to the module (`blocks.{j}.attn.qkv.weight`, ...), and
`model`, the same parameters with global block indices. modassem's parameter
names mirror those keys, so a module converts by renaming and by laying out
the kernels the way Flax wants them:

    torch Linear weight [out, in]        <-> Dense kernel [in, out]
    torch Conv2d weight [out, in, h, w]  <-> Conv kernel [h, w, in, out]
    torch LayerNorm weight / bias        <-> LayerNorm scale / bias

Everything here works on NumPy arrays; torch is imported only by `read_pth`
and `write_pth`, so `import modassem` never needs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np

from modassem.errors import ModassemError
from modassem.models.presets import ARCH_FIELDS, PRESETS

RUN_FILE = "run.json"  # the same name as checkpoints.RUN_FILE; kept here so reading a .pth needs no Orbax

_STEM = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
_TOP = ("norm.weight", "norm.bias", "head.weight", "head.bias")
_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_NORMS = ("norm", "norm1", "norm2")
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
    return {f"module_{k}": tree for k, tree in enumerate(self.modules)}


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


# --- torch state dict <-> Flax tree, one module at a time ------------------

def _flax_path(key: str) -> tuple[str, ...]:
  """`blocks.3.attn.qkv.weight` -> (`blocks_3`, `attn`, `qkv`, `kernel`)."""
  parts = key.split(".")
  if parts[0] == "blocks":
    parts = [f"blocks_{parts[1]}"] + parts[2:]
  if parts[:2] == ["patch_embed", "proj"]:
    parts = ["patch_embed"] + parts[2:]
  if parts[-1] == "weight":
    parts[-1] = "scale" if parts[-2] in _NORMS else "kernel"
  return tuple(parts)


def _torch_key(path: tuple[str, ...]) -> str:
  parts = list(path)
  if parts[0].startswith("blocks_"):
    parts = ["blocks", parts[0][len("blocks_"):]] + parts[1:]
  if parts[0] == "patch_embed":
    parts = ["patch_embed", "proj"] + parts[1:]
  if parts[-1] in ("kernel", "scale"):
    parts[-1] = "weight"
  return ".".join(parts)


def _to_flax(key: str, x: np.ndarray) -> np.ndarray:
  if key.endswith("weight") and x.ndim == 4:
    return x.transpose(2, 3, 1, 0)   # OIHW -> HWIO
  if key.endswith("weight") and x.ndim == 2:
    return x.T
  return x


def _to_torch(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and x.ndim == 4:
    return x.transpose(3, 2, 0, 1)   # HWIO -> OIHW
  if path[-1] == "kernel" and x.ndim == 2:
    return x.T
  return x


def stage_to_module(stage: dict) -> dict:
  """An official module state dict (module-local keys) -> that module's Flax parameter tree."""
  tree: dict = {}
  for key, x in stage.items():
    *parents, leaf = _flax_path(key)
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.ascontiguousarray(_to_flax(key, np.asarray(x, np.float32)))
  return tree


def module_to_stage(tree: dict) -> dict:
  """A module's Flax parameter tree -> the official state dict of that module."""
  out = {}

  def walk(node, path):
    for name, child in node.items():
      if isinstance(child, dict):
        walk(child, path + (name,))
      else:
        out[_torch_key(path + (name,))] = np.ascontiguousarray(_to_torch(path + (name,), np.asarray(child, np.float32)))
  walk(tree, ())
  return out


def global_state_dict(stages: list[dict]) -> dict:
  """The `model` entry: the stages' keys with block indices counted over the whole model."""
  out, offset = {}, 0
  for stage in stages:
    depth = 0
    for key, x in stage.items():
      m = _BLOCK_KEY.fullmatch(key)
      if m:
        j = int(m.group(1))
        depth = max(depth, j + 1)
        key = f"blocks.{offset + j}.{m.group(2)}.{m.group(3)}"
      out[key] = x
    offset += depth
  return out


# --- checking an official checkpoint ---------------------------------------

def _stage_depth(stage: dict, k: int, num: int, where: str) -> int:
  """Blocks in module k; an error for any key that module k of the official layout does not have."""
  allowed = set(_STEM if k == 0 else ()) | set(_TOP if k == num - 1 else ())
  blocks: dict[int, set] = {}
  for key in stage:
    m = _BLOCK_KEY.fullmatch(key)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(f"{m.group(2)}.{m.group(3)}")
    elif key not in allowed:
      raise ModassemError(f"{where}: unexpected key {key!r} in model_stages[{k}] (module {k} of {num}): "
                          f"not an official Deep Incubation ViT checkpoint")
  missing = [key for key in allowed if key not in stage]
  if missing:
    raise ModassemError(f"{where}: model_stages[{k}] lacks {missing[0]!r}: not a complete official checkpoint")
  if not blocks or sorted(blocks) != list(range(len(blocks))):
    raise ModassemError(f"{where}: model_stages[{k}] has blocks {sorted(blocks)}, not 0..n-1: "
                        f"not a complete official checkpoint")
  required = {f"{p}.{w}" for p in _BLOCK_PARTS for w in ("weight", "bias")} - {"attn.qkv.bias"}
  for j, have in blocks.items():
    lost = sorted(required - have)
    if lost:
      raise ModassemError(f"{where}: model_stages[{k}] lacks blocks.{j}.{lost[0]}: not a complete official checkpoint")
  return len(blocks)


def _expected_shapes(width: int, hidden: int, patch: int, tokens: int, classes: int) -> dict:
  block = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
           "attn.qkv.bias": (3 * width,), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
           "norm2.weight": (width,), "norm2.bias": (width,), "mlp.fc1.weight": (hidden, width),
           "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (width, hidden), "mlp.fc2.bias": (width,)}
  top = {"cls_token": (1, 1, width), "pos_embed": (1, tokens, width), "patch_embed.proj.weight": (width, 3, patch, patch),
         "patch_embed.proj.bias": (width,), "norm.weight": (width,), "norm.bias": (width,),
         "head.weight": (classes, width), "head.bias": (classes,)}
  return {**top, **{f"block.{k}": v for k, v in block.items()}}


def _shape(x) -> tuple:
  return tuple(getattr(x, "shape", ()))


def infer_arch(stages: list[dict], where: str) -> tuple[dict, list[int]]:
  """Width, MLP hidden size, patch, image size, classes and qkv bias of checked stages, and their depths.

  Every tensor's shape is checked against what those imply, so a file that
  would load into no model is refused here, with the key that is wrong.
  """
  num = len(stages)
  depths = [_stage_depth(s, k, num, where) for k, s in enumerate(stages)]
  first, last = stages[0], stages[-1]
  width = _shape(first["cls_token"])[-1] if _shape(first["cls_token"]) else 0
  hidden = _shape(first["blocks.0.mlp.fc1.weight"])[0] if _shape(first["blocks.0.mlp.fc1.weight"]) else 0
  patch_shape = _shape(first["patch_embed.proj.weight"])
  patch = patch_shape[-1] if len(patch_shape) == 4 else 0
  tokens = _shape(first["pos_embed"])[1] if len(_shape(first["pos_embed"])) == 3 else 0
  classes = _shape(last["head.weight"])[0] if _shape(last["head.weight"]) else 0
  grid = int(round(np.sqrt(max(tokens - 1, 0))))
  if min(width, hidden, patch, classes) <= 0 or grid * grid != tokens - 1 or grid == 0:
    raise ModassemError(f"{where}: cls_token {_shape(first['cls_token'])}, pos_embed {_shape(first['pos_embed'])}, "
                        f"patch_embed {patch_shape}, head {_shape(last['head.weight'])} do not describe a ViT "
                        f"with a square patch grid")
  want = _expected_shapes(width, hidden, patch, tokens, classes)
  qkv_bias = "blocks.0.attn.qkv.bias" in first
  for k, stage in enumerate(stages):
    for key, x in stage.items():
      m = _BLOCK_KEY.fullmatch(key)
      name = f"block.{m.group(2)}.{m.group(3)}" if m else key
      if _shape(x) != want[name]:
        raise ModassemError(f"{where}: model_stages[{k}][{key!r}] has shape {_shape(x)}, expected {want[name]} "
                            f"(width {width}, MLP {hidden}, patch {patch}, {tokens} tokens, {classes} classes): "
                            f"the file is inconsistent")
    for j in range(depths[k]):
      if (f"blocks.{j}.attn.qkv.bias" in stage) != qkv_bias:
        raise ModassemError(f"{where}: some blocks have a qkv bias and others not (model_stages[{k}] block {j}): "
                            f"the file is inconsistent")
  arch = dict(patch=patch, width=width, heads=0, mlp_ratio=hidden / width, qkv_bias=qkv_bias, ln_eps=0.0,
              image_size=grid * patch, num_classes=classes)
  return arch, depths


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
    raise ModassemError(f"{where} ({desc}) matches no preset: add one to modassem/models/presets.py "
                        f"and pass it with --preset")
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


# --- reading and writing .pth files (torch, lazily) ------------------------

def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ModassemError("converting .pth checkpoints needs PyTorch: pip install 'modassem[convert]'") from None
  return torch


def read_pth(path: str) -> list[dict]:
  """`model_stages` of an official checkpoint, as NumPy float32 arrays, after checking the container."""
  torch = _torch()
  if not os.path.isfile(path):
    raise ModassemError(f"{path} does not exist: pass an official .pth checkpoint or a run directory")
  try:
    # weights_only: a pickle can run arbitrary code; a state dict needs nothing but tensors and containers.
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types: UnpicklingError, RuntimeError, EOFError, ...
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ModassemError(f"{path} is not a PyTorch checkpoint of tensors that torch.load(weights_only=True) "
                        f"can read ({type(e).__name__}: {first[:160]})") from None
  if not isinstance(obj, dict):
    raise ModassemError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict with model_stages")
  stages = obj.get("model_stages")
  if stages is None:
    extra = (" (it has `model` only: the cut into modules is unknown)" if "model" in obj else "")
    keys = ", ".join(sorted(map(str, obj))[:6])
    raise ModassemError(f"{path} has no model_stages{extra}; its keys are: {keys or 'none'}: "
                        f"pass an official Deep Incubation checkpoint")
  if "model" in obj and not isinstance(obj["model"], dict):
    raise ModassemError(f"{path}: `model` is a {type(obj['model']).__name__}, not a state dict")
  if not isinstance(stages, (list, tuple)) or not stages or not all(isinstance(s, dict) for s in stages):
    raise ModassemError(f"{path}: model_stages is not a non-empty list of state dicts")
  out = []
  for k, stage in enumerate(stages):
    arrays = {}
    for key, x in stage.items():
      if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ModassemError(f"{path}: model_stages[{k}][{key!r}] is a {type(x).__name__}"
                            f"{'' if not isinstance(x, torch.Tensor) else ' of ' + str(x.dtype)}, "
                            f"not a floating-point tensor")
      arrays[str(key)] = x.detach().to(torch.float32).cpu().numpy()
    out.append(arrays)
  return out


def write_pth(path: str, stages: list[dict]) -> None:
  """An official checkpoint: `model` (global keys) and `model_stages` (module-local keys)."""
  torch = _torch()
  # Copies: restored arrays can be read-only, and torch tensors must own writable memory.
  as_torch = lambda d: {k: torch.from_numpy(np.array(v, np.float32)) for k, v in d.items()}
  obj = {"model": as_torch(global_state_dict(stages)), "model_stages": [as_torch(s) for s in stages]}
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp"
  torch.save(obj, tmp)
  os.replace(tmp, path)


def model_from_pth(path: str, preset: str | None = None) -> Model:
  """An official checkpoint as a `Model`, with the preset that supplies heads and LayerNorm eps."""
  stages = read_pth(path)
  arch, depths = infer_arch(stages, path)
  name = match_preset(arch, depths, preset, path)
  arch.update(heads=PRESETS[name]["heads"], ln_eps=PRESETS[name]["ln_eps"])
  model = Model(arch=arch, preset=name, depths=depths, modules=[stage_to_module(s) for s in stages])
  if preset is not None:
    # A preset of another resolution is a request to fine-tune there: move the position embedding to its grid.
    model = at_image_size(model, PRESETS[name]["image_size"])
  return model


def model_to_stages(model: Model) -> list[dict]:
  return [module_to_stage(tree) for tree in model.modules]


# --- run directories --------------------------------------------------------

def _read_run(run_dir: str) -> dict:
  path = os.path.join(run_dir, RUN_FILE)
  if not os.path.isfile(path):
    raise ModassemError(f"{run_dir} has no {RUN_FILE}: pass a modassem run directory or an official .pth file")
  try:
    with open(path) as f:
      run = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ModassemError(f"{path} is unreadable ({e})") from None
  missing = [k for k in ("phase", "arch", "depths", "trained") if k not in run]
  if missing:
    raise ModassemError(f"{path} lacks {missing[0]!r}: not a modassem run directory")
  return run


def _abstract_modules(arch: dict, depths) -> dict:
  from modassem.models.vit import ViT  # pylint: disable=g-import-not-at-top
  from modassem.train import abstract_modules  # pylint: disable=g-import-not-at-top
  return abstract_modules(ViT(depths=tuple(depths), **arch))


def _load_modules(run_dir: str, run: dict, slots, depths, what: str) -> dict:
  from modassem import checkpoints  # pylint: disable=g-import-not-at-top
  abstract = _abstract_modules(run["arch"], depths)
  expect = {"arch": run["arch"], "num_modules": len(depths)}
  return {k: checkpoints.load_module(run_dir, k, expect={**expect, "depth": depths[k]},
                                     abstract=abstract[f"module_{k}"], what=what) for k in slots}


def model_from_run(run_dir: str) -> Model:
  """The model a finished run's modules make: the run's own, or for one incubated module, its hybrid.

  An incubation run stores its module alone; the other slots of the hybrid
  are the meta run's modules, found through run.json's `sources`.
  """
  run = _read_run(run_dir)
  trained, num = list(run["trained"]), len(run["depths"])
  if run["phase"] != "incubate":
    depths = [1] * num if run["phase"] == "meta" else list(run["depths"])
    mods = _load_modules(run_dir, run, range(num), depths, "run")
  else:
    if len(trained) != 1:
      raise ModassemError(f"{run_dir} incubated modules {trained} together; an official file holds one "
                          f"incubated module: incubate one module per run (--config.module=i) to export it")
    i = trained[0]
    depths = [run["depths"][i] if k == i else 1 for k in range(num)]
    meta = (run.get("sources") or [""])[0]
    mods = _load_modules(run_dir, run, [i], depths, "run")
    others = [k for k in range(num) if k != i]
    if os.path.isfile(meta):
      # An imported incubated module: its source file is the whole hybrid, meta modules included.
      hybrid = model_from_pth(meta, run.get("preset") or None)
      mods.update({k: hybrid.modules[k] for k in others})
    else:
      mods.update(_load_modules(meta, run, others, depths, f"meta run of {run_dir}"))
  modules = [jax_free(mods[k]) for k in range(num)]
  return Model(arch=dict(run["arch"]), preset=str(run.get("preset", "")), depths=depths, modules=modules)


def jax_free(tree):
  """NumPy copies of a parameter tree's arrays."""
  if isinstance(tree, dict):
    return {k: jax_free(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


def write_run(model: Model, run_dir: str, sources: list[str]) -> dict:
  """A run directory holding the model's trained modules, readable by every phase that reads runs."""
  from modassem import checkpoints  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(run_dir, RUN_FILE)):
    raise ModassemError(f"{run_dir} already holds a run: pass a new directory to --to")
  phase, trained = model.kind
  run = {"phase": phase, "preset": model.preset, "arch": {f: model.arch[f] for f in ARCH_FIELDS},
         "depths": run_depths(model.depths), "trained": trained, "total_steps": 0,
         "sources": [os.path.abspath(s) for s in sources]}
  os.makedirs(run_dir, exist_ok=True)
  checkpoints.save_modules(run_dir, {f"module_{k}": model.modules[k] for k in trained})
  # run.json last: a run directory with it is complete.
  checkpoints.write_json(os.path.join(run_dir, RUN_FILE), run)
  return run


# --- the verb ---------------------------------------------------------------

def _summary(model: Model) -> str:
  a = model.arch
  phase, trained = model.kind
  return (f"{describe(phase, trained, model.depths)}, preset {model.preset}: patch {a['patch']}, width {a['width']}, "
          f"heads {a['heads']}, MLP ratio {a['mlp_ratio']:g}, qkv bias {'yes' if a['qkv_bias'] else 'no'}, "
          f"LayerNorm eps {a['ln_eps']:g}, {a['num_classes']} classes, {a['image_size']} px")


def convert(src: str, dst: str, preset: str | None = None) -> str:
  """`.pth -> run directory` (import) or `run directory -> .pth` (export); returns the one-line summary."""
  if not src or not dst:
    raise ModassemError("pass --from=FILE.pth --to=RUNDIR (import) or --from=RUNDIR --to=FILE.pth (export)")
  if os.path.isdir(src):
    if preset is not None:
      raise ModassemError("--preset applies to importing a .pth file; an exported run keeps its own architecture")
    if os.path.isdir(dst):
      raise ModassemError(f"{dst} is a directory: pass the .pth file to write with --to")
    model = model_from_run(src)
    write_pth(dst, model_to_stages(model))
    return f"{src}: {_summary(model)} -> {dst}"
  if not os.path.exists(src):
    raise ModassemError(f"{src} does not exist: pass an official .pth checkpoint or a run directory")
  model = model_from_pth(src, preset)
  run = write_run(model, dst, [src])
  written = ", ".join(f"module_{k}" for k in run["trained"])
  return f"{src}: {_summary(model)} -> {dst} (phase {run['phase']}, {written})"
