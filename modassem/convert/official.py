"""The official checkpoint layout: torch state dicts <-> Flax module trees, and `.pth` files.

An official checkpoint (`.pth`) holds `model_stages`: one state dict per
module, keys local to the module (`blocks.{j}.attn.qkv.weight`, ...), and
`model`, the same parameters with global block indices. modassem's parameter
names mirror those keys, so a module converts by renaming and by laying out
the kernels the way Flax wants them:

    torch Linear weight [out, in]        <-> Dense kernel [in, out]
    torch Conv2d weight [out, in, h, w]  <-> Conv kernel [h, w, in, out]
    torch LayerNorm weight / bias        <-> LayerNorm scale / bias

Sparse (V-MoE) blocks hold `moe` in place of `mlp`, in the layout of m2mKD's
reference (fastmoe.py).

Everything here works on NumPy arrays; torch is imported only by `read_pth`
and `write_pth`, so `import modassem` never needs it.
"""

from __future__ import annotations

import io
import re

import numpy as np

from modassem import files
from modassem.convert import fastmoe
from modassem.errors import ModassemError

STEM = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")   # module 0's own keys
TOP = ("norm.weight", "norm.bias", "head.weight", "head.bias")                          # module K-1's own keys
_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_NORMS = ("norm", "norm1", "norm2")
_ANY_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")

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
  stage, sparse = fastmoe.split(stage)
  for j, keys in sparse.items():
    tree.setdefault(f"blocks_{j}", {})["mlp"] = fastmoe.to_flax(keys)
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
      if fastmoe.is_moe_mlp(child):   # a sparse block's experts and gate: `blocks.j.moe.*`
        prefix = _torch_key(path + ("moe", "x"))[:-1]
        out.update({prefix + key: x for key, x in fastmoe.to_torch(child).items()})
      elif isinstance(child, dict):
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
      m = _ANY_BLOCK_KEY.fullmatch(key)
      if m:
        j = int(m.group(1))
        depth = max(depth, j + 1)
        key = f"blocks.{offset + j}.{m.group(2)}"
      out[key] = x
    offset += depth
  return out


# --- checking an official checkpoint ---------------------------------------

def _stage_depth(stage: dict, k: int, num: int, where: str) -> int:
  """Blocks in module k; an error for any key that module k of the official layout does not have."""
  allowed = set(STEM if k == 0 else ()) | set(TOP if k == num - 1 else ())
  blocks: dict[int, set] = {}
  stage, sparse = fastmoe.split(stage)
  for key in stage:
    m = _BLOCK_KEY.fullmatch(key)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(f"{m.group(2)}.{m.group(3)}")
    elif key not in allowed:
      raise ModassemError(f"{where}: unexpected key {key!r} in model_stages[{k}] (module {k} of {num}): "
                          f"not an official Deep Incubation ViT checkpoint")
  for j in sparse:   # a sparse block's MLP is its `moe.*` (checked with its shapes in infer_arch)
    if any(part.startswith("mlp.") for part in blocks.get(j, ())):
      raise ModassemError(f"{where}: model_stages[{k}] block {j} has both an MLP and MoE experts: the file is "
                          "inconsistent")
    blocks.setdefault(j, set()).update({f"mlp.{p}.{w}" for p in ("fc1", "fc2") for w in ("weight", "bias")})
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
  sparse = [fastmoe.split(stage)[1] for stage in stages]
  first, last = stages[0], stages[-1]
  width = _shape(first["cls_token"])[-1] if _shape(first["cls_token"]) else 0
  experts = {}   # the first sparse block's {experts, hidden, width}: every other one must agree
  for k, blocks in enumerate(sparse):
    for j, keys in sorted(blocks.items()):
      shapes = fastmoe.block_shapes(keys, f"{where} model_stages[{k}] block {j}")
      if experts and shapes != experts:
        raise ModassemError(f"{where}: model_stages[{k}] block {j} has {shapes['experts']} experts of MLP "
                            f"{shapes['hidden']} at width {shapes['width']}, another MoE block "
                            f"{experts['experts']} of {experts['hidden']} at {experts['width']}: the file is "
                            "inconsistent")
      experts = experts or shapes
  dense_fc1 = next((stage[f"blocks.{j}.mlp.fc1.weight"] for k, stage in enumerate(stages) for j in range(depths[k])
                    if f"blocks.{j}.mlp.fc1.weight" in stage), None)
  hidden = _shape(dense_fc1)[0] if dense_fc1 is not None and _shape(dense_fc1) else experts.get("hidden", 0)
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
  if experts and (experts["width"], experts["hidden"]) != (width, hidden):
    raise ModassemError(f"{where}: the MoE experts are MLPs {experts['width']} -> {experts['hidden']}, the model's "
                        f"width and MLP are {width} and {hidden}: the file is inconsistent")
  for k, stage in enumerate(stages):
    for key, x in fastmoe.split(stage)[0].items():
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
  if experts:
    arch["moe"] = {"experts": experts["experts"], "k": min(fastmoe.REFERENCE_K, experts["experts"]),
                   "router": "topk_softmax",
                   "capacity_factor": 0.0, "layout": [sorted(blocks) for blocks in sparse]}
  return arch, depths


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
  where = files.path(path)
  if not where.is_file():
    raise ModassemError(f"{path} does not exist: pass an official .pth checkpoint or a run directory")
  try:
    # weights_only: a pickle can run arbitrary code; a state dict needs nothing but tensors and containers.
    obj = torch.load(io.BytesIO(where.read_bytes()), map_location="cpu", weights_only=True)
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


def pth_depths(path: str) -> list[int]:
  """The module depths of an official checkpoint (for a plan: the file is read and checked as `read_pth` does)."""
  stages = read_pth(path)
  return [_stage_depth(stage, k, len(stages), path) for k, stage in enumerate(stages)]


def write_pth(path: str, stages: list[dict]) -> None:
  """An official checkpoint: `model` (global keys) and `model_stages` (module-local keys)."""
  torch = _torch()
  # Copies: restored arrays can be read-only, and torch tensors must own writable memory.
  as_torch = lambda d: {k: torch.from_numpy(np.array(v, np.float32)) for k, v in d.items()}
  obj = {"model": as_torch(global_state_dict(stages)), "model_stages": [as_torch(s) for s in stages]}
  out = files.path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  torch.save(obj, buf)
  files.write_bytes(out, buf.getvalue())

