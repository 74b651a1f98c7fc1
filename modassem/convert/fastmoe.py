"""V-MoE blocks in the official layout, as m2mKD's reference writes them (fastmoe's `FMoETransformerMLP`), <->
modassem's MoE MLP (`models/moe.py`).

A sparse block holds `moe` where a dense one holds `mlp` (block j of a module, module-local indices):

    blocks.j.moe.gate.gate.weight        [E, width]     <-> mlp/gate/kernel     [width, E]
    blocks.j.moe.gate.gate.bias          [E]            <-> mlp/gate/bias       [E]
    blocks.j.moe.experts.e.htoh4.weight  [1, H, width]  <-> mlp/fc1_kernel[e]   [width, H]
    blocks.j.moe.experts.e.htoh4.bias    [1, H]         <-> mlp/fc1_bias[e]     [H]
    blocks.j.moe.experts.e.h4toh.weight  [1, width, H]  <-> mlp/fc2_kernel[e]   [H, width]
    blocks.j.moe.experts.e.h4toh.bias    [1, width]     <-> mlp/fc2_bias[e]     [width]

fastmoe 1.1 and later keep one expert module per expert (above); earlier releases one module for all of them,
whose weights are the stacks (`blocks.j.moe.experts.htoh4.weight` [E, H, width], `...bias` [E, H]). Both are
read; the per-expert layout is written. The gate's k leaves no trace in the weights: it is fastmoe's default,
2, which the reference keeps (REFERENCE_K), with its routing (top k of the gate's logits, a softmax over them).
"""

from __future__ import annotations

import re

import numpy as np

from modassem.errors import ModassemError

REFERENCE_K = 2
MOE_KEY = re.compile(r"blocks\.(\d+)\.moe\.(.+)")
_GATE = ("gate.gate.weight", "gate.gate.bias")
_PER_EXPERT = re.compile(r"experts\.(\d+)\.(htoh4|h4toh)\.(weight|bias)")
_FUSED = re.compile(r"experts\.(htoh4|h4toh)\.(weight|bias)")
_FLAX = {("htoh4", "weight"): "fc1_kernel", ("htoh4", "bias"): "fc1_bias",
         ("h4toh", "weight"): "fc2_kernel", ("h4toh", "bias"): "fc2_bias"}


def split(stage: dict) -> tuple[dict, dict]:
  """(the stage's other keys, {block j: {key after `blocks.j.moe.`: array}} of its sparse blocks)."""
  rest, moe = {}, {}
  for key, x in stage.items():
    m = MOE_KEY.fullmatch(key)
    if m:
      moe.setdefault(int(m.group(1)), {})[m.group(2)] = x
    else:
      rest[key] = x
  return rest, moe


def _stacks(keys: dict, where: str) -> tuple[dict, int]:
  """{(htoh4|h4toh, weight|bias): the experts' stack [E, ...]} of one block's expert keys, and E."""
  per, fused = {}, {}
  for key, x in keys.items():
    if key in _GATE:
      continue
    m, f = _PER_EXPERT.fullmatch(key), _FUSED.fullmatch(key)
    if m:
      per.setdefault((m.group(2), m.group(3)), {})[int(m.group(1))] = np.asarray(x)
    elif f:
      fused[(f.group(1), f.group(2))] = np.asarray(x)
    else:
      raise ModassemError(f"{where}: unexpected key {key!r} in an MoE block: not fastmoe's FMoETransformerMLP layout")
  if per and fused:
    raise ModassemError(f"{where}: an MoE block holds both per-expert and stacked expert weights: the file is "
                        "inconsistent")
  lost = next((k for k in _GATE if k not in keys), None)
  if lost is not None:
    raise ModassemError(f"{where}: an MoE block lacks its {lost}: not a complete fastmoe checkpoint")
  experts = len(keys["gate.gate.weight"])
  if fused:
    stacks = fused
    lost = next((".".join(p) for p in _FLAX if p not in stacks), None)
  else:
    lost = next((f"experts.{e}.{layer}.{kind}" for (layer, kind) in _FLAX for e in range(experts)
                 if e not in per.get((layer, kind), {})), None)
    extra = next((f"experts.{e}.{'.'.join(p)}" for p, by in per.items() for e in by if e >= experts), None)
    if extra is not None:
      raise ModassemError(f"{where}: an MoE block has {extra} but its gate routes to {experts} experts: the file "
                          "is inconsistent")
    if lost is None and any(np.shape(x)[:1] != (1,) for by in per.values() for x in by.values()):
      raise ModassemError(f"{where}: an MoE block's per-expert weights are not stacks of one expert each: the file "
                          "is inconsistent")
    if lost is None:
      stacks = {part: np.concatenate([np.asarray(by[e]) for e in range(experts)]) for part, by in per.items()}
  if lost is not None:
    raise ModassemError(f"{where}: an MoE block lacks its {lost}: not a complete fastmoe checkpoint")
  return stacks, experts


def block_shapes(keys: dict, where: str) -> dict:
  """{experts, hidden, width} of one sparse block, its tensors checked against them."""
  stacks, experts = _stacks(keys, where)
  gate = np.shape(keys["gate.gate.weight"])
  if len(gate) != 2:
    raise ModassemError(f"{where}: moe.gate.gate.weight has shape {gate}, not [experts, width]")
  width = gate[1]
  hidden = np.shape(stacks[("htoh4", "weight")])[1] if np.ndim(stacks[("htoh4", "weight")]) == 3 else 0
  want = {("htoh4", "weight"): (experts, hidden, width), ("htoh4", "bias"): (experts, hidden),
          ("h4toh", "weight"): (experts, width, hidden), ("h4toh", "bias"): (experts, width)}
  for part, shape in want.items():
    if np.shape(stacks[part]) != shape:
      raise ModassemError(f"{where}: the experts' {'.'.join(part)} stack has shape {np.shape(stacks[part])}, "
                          f"expected {shape} ({experts} experts, width {width}, MLP {hidden})")
  if np.shape(keys["gate.gate.bias"]) != (experts,):
    raise ModassemError(f"{where}: moe.gate.gate.bias has shape {np.shape(keys['gate.gate.bias'])}, expected "
                        f"({experts},)")
  return {"experts": experts, "hidden": hidden, "width": width}


def to_flax(keys: dict, where: str = "checkpoint") -> dict:
  """One sparse block's `moe.*` tensors -> its Flax `mlp` tree."""
  stacks, _ = _stacks(keys, where)
  tree = {"gate": {"kernel": np.ascontiguousarray(np.asarray(keys["gate.gate.weight"], np.float32).T),
                   "bias": np.asarray(keys["gate.gate.bias"], np.float32)}}
  for part, name in _FLAX.items():
    x = np.asarray(stacks[part], np.float32)
    # torch's [E, out, in] -> [E, in, out]
    tree[name] = np.ascontiguousarray(x.transpose(0, 2, 1) if part[1] == "weight" else x)
  return tree


def to_torch(mlp: dict) -> dict:
  """A sparse block's Flax `mlp` tree -> its `moe.*` tensors, one expert module per expert (fastmoe 1.1)."""
  out = {"gate.gate.weight": np.asarray(mlp["gate"]["kernel"], np.float32).T,
         "gate.gate.bias": np.asarray(mlp["gate"]["bias"], np.float32)}
  for (layer, kind), name in _FLAX.items():
    stack = np.asarray(mlp[name], np.float32)
    for e in range(stack.shape[0]):
      x = stack[e].T if kind == "weight" else stack[e]
      out[f"experts.{e}.{layer}.{kind}"] = np.ascontiguousarray(x[None])
  return out


def is_moe_mlp(tree) -> bool:
  return isinstance(tree, dict) and "fc1_kernel" in tree
