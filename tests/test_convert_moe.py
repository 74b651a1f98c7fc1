"""Interchange of V-MoE checkpoints with m2mKD's reference layout, against a PyTorch V-MoE written from it.

The reference's sparse block is fastmoe's `FMoETransformerMLP` where the dense block has its MLP: a gate that is a
linear layer with bias, the top 2 of its logits and a softmax over those two, and experts that are MLPs whose
weights fastmoe keeps as [experts, out, in] stacks (one expert per module from fastmoe 1.1 on, one module for all
before). The PyTorch model here computes that layer in plain PyTorch, token by token through the experts it picks,
on the tiny preset with an MoE MLP of 4 experts in every other block (configs/tiny.py with model.moe.every=2).
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from conftest import tiny  # noqa: E402
from test_convert import (HEADS, WIDTH, Attention, TorchViT, images, jax_logits, save_official,  # noqa: E402
                          stages_of, torch_logits)
from modassem import checkpoints, cli, phases, records  # noqa: E402
from modassem.models import vit  # noqa: E402
import modassem  # noqa: E402

EXPERTS, HIDDEN = 4, 4 * WIDTH
SPARSE = {"model.moe.experts": EXPERTS, "model.moe.every": 2}


class FMoELinear(nn.Module):
  """fastmoe's FMoELinear: a weight [experts, out, in] and a bias [experts, out]."""

  def __init__(self, experts, d_in, d_out):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(experts, d_out, d_in))
    self.bias = nn.Parameter(torch.zeros(experts, d_out))


class Expert(nn.Module):
  """One expert as fastmoe 1.1 keeps it: an MLP whose two linear layers are FMoELinear stacks of one."""

  def __init__(self):
    super().__init__()
    self.htoh4, self.h4toh = FMoELinear(1, WIDTH, HIDDEN), FMoELinear(1, HIDDEN, WIDTH)

  def forward(self, x):
    h = F.gelu(x @ self.htoh4.weight[0].T + self.htoh4.bias[0])
    return h @ self.h4toh.weight[0].T + self.h4toh.bias[0]


class NaiveGate(nn.Module):
  def __init__(self):
    super().__init__()
    self.gate = nn.Linear(WIDTH, EXPERTS)


class MoE(nn.Module):
  """The reference's MoE MLP: every token to the top 2 experts of the gate's logits, weighed by a softmax over
  those two logits; no capacity, no noise."""

  def __init__(self, k=2):
    super().__init__()
    self.k, self.gate, self.experts = k, NaiveGate(), nn.ModuleList([Expert() for _ in range(EXPERTS)])

  def forward(self, x):
    tokens = x.reshape(-1, x.shape[-1])
    top, chosen = self.gate.gate(tokens).topk(self.k, dim=-1)
    weights = top.softmax(-1)
    out = torch.zeros_like(tokens)
    for j in range(self.k):
      for e, expert in enumerate(self.experts):
        picked = chosen[:, j] == e
        if picked.any():
          out[picked] += weights[picked, j:j + 1] * expert(tokens[picked])
    return out.reshape(x.shape)


class SparseBlock(nn.Module):
  def __init__(self):
    super().__init__()
    self.norm1, self.attn = nn.LayerNorm(WIDTH, eps=1e-6), Attention(WIDTH, HEADS)
    self.norm2, self.moe = nn.LayerNorm(WIDTH, eps=1e-6), MoE()

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.moe(self.norm2(x))


class TorchVMoE(TorchViT):
  """TorchViT with the blocks `sparse` (global indices) as V-MoE blocks."""

  def __init__(self, depth, sparse):
    super().__init__(depth)
    gen = torch.Generator().manual_seed(100 + depth)
    for i in sparse:
      self.blocks[i] = SparseBlock()
      with torch.no_grad():
        for p in self.blocks[i].parameters():
          p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 else 0.0) * 0.2)


def _final(root):
  model = TorchVMoE(8, sparse=(1, 3, 5, 7)).eval()
  return model, save_official(root / "vmoe.pth", model, (2, 2, 2, 2))


def test_a_reference_vmoe_imports_with_its_layout_and_logits(tmp_path, capsys):
  model, path = _final(tmp_path)
  run = str(tmp_path / "run")
  capsys.readouterr()
  assert cli.main(["convert", f"--from={path}", f"--to={run}"]) == 0
  assert "MoE MLPs of 4 experts (top 2) in 4 blocks" in capsys.readouterr().out
  arch = json.load(open(os.path.join(run, records.RUN_FILE)))["arch"]
  # The run is one that the tiny preset with 4 experts in every other block makes, so it plugs into its phases.
  assert arch == records.arch_of(tiny("assemble", **SPARSE))
  x = images()
  want = torch_logits(model, x)
  np.testing.assert_allclose(jax_logits(run, x), want, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(jax_logits(path, x), want, atol=1e-4, rtol=1e-4)
  # The routing is not trivial here: the tokens go to every expert, in more than one pair.
  with torch.no_grad():
    tokens = model.blocks[1].norm2(torch.randn(64, WIDTH))
    chosen = model.blocks[1].moe.gate.gate(tokens).topk(2, dim=-1).indices
  assert len(set(chosen.flatten().tolist())) == EXPERTS and len({tuple(sorted(p)) for p in chosen.tolist()}) > 2


def test_a_vmoe_run_exports_to_the_reference_layout_and_back(tmp_path):
  model, path = _final(tmp_path)
  run, out, back = str(tmp_path / "run"), str(tmp_path / "out.pth"), str(tmp_path / "back")
  assert cli.main(["convert", f"--from={path}", f"--to={run}"]) == 0
  assert cli.main(["convert", f"--from={run}", f"--to={out}"]) == 0
  ckpt = torch.load(out, map_location="cpu", weights_only=True)
  fresh = TorchVMoE(8, sparse=(1, 3, 5, 7))
  fresh.load_state_dict(ckpt["model"], strict=True)
  x = images()
  np.testing.assert_allclose(torch_logits(fresh.eval(), x), torch_logits(model, x), atol=1e-6)
  original = torch.load(path, weights_only=True)["model_stages"]
  for a, b in zip(ckpt["model_stages"], original):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
  assert cli.main(["convert", f"--from={out}", f"--to={back}"]) == 0
  a, b = modassem.load(back)[1], modassem.load(run)[1]
  np.testing.assert_array_equal(a["module_3"]["blocks_1"]["mlp"]["fc2_kernel"],
                                b["module_3"]["blocks_1"]["mlp"]["fc2_kernel"])


def test_older_fastmoe_stacks_and_an_incubated_sparse_module_import(tmp_path):
  """fastmoe before 1.1 keeps the experts' weights as one stack per layer: the same model. And a hybrid whose
  incubated module is sparse among dense meta modules imports as that module's incubation run."""
  model, path = _final(tmp_path)
  stages = stages_of(model, (2, 2, 2, 2))
  for stage in stages:
    for j in (1,):
      prefix = f"blocks.{j}.moe.experts."
      for layer in ("htoh4", "h4toh"):
        for kind in ("weight", "bias"):
          stage[f"{prefix}{layer}.{kind}"] = torch.cat([stage.pop(f"{prefix}{e}.{layer}.{kind}")
                                                        for e in range(EXPERTS)])
  fused = str(tmp_path / "fused.pth")
  torch.save({"model_stages": stages}, fused)
  x = images()
  np.testing.assert_allclose(jax_logits(fused, x), torch_logits(model, x), atol=1e-4, rtol=1e-4)

  # Module 1 of a 2/4/1/1 cut with an MoE MLP in every other block (its blocks 1 and 3), among dense meta modules.
  hybrid = TorchVMoE(7, sparse=(2, 4)).eval()
  inc_path, inc = save_official(tmp_path / "inc1.pth", hybrid, (1, 4, 1, 1)), str(tmp_path / "inc1")
  # (An incubated module's file holds its own depth only: its cut is taken as even, 4/4/4/4, whose depth no preset
  # has, so the heads are given.)
  assert cli.main(["convert", f"--from={inc_path}", f"--to={inc}", "--heads=2"]) == 0
  run = json.load(open(os.path.join(inc, records.RUN_FILE)))
  assert run["phase"] == "incubate" and run["trained"] == [1]
  np.testing.assert_allclose(jax_logits(inc_path, x, heads=2), torch_logits(hybrid, x), atol=1e-4, rtol=1e-4)
  # The file tells module 1's blocks only, not the other modules' (whose layout differs here: [1], [], []); an
  # assembly of that cut takes the module all the same.
  config = tiny("assemble", **SPARSE, **{"model.depths": (2, 4, 1, 1)})
  assert records.arch_of(config)["moe"]["layout"] == [[1], [1, 3], [], []]
  abstract = vit.abstract_params(phases.model_for(config, (2, 4, 1, 1)))["module_1"]
  module = checkpoints.load_module(inc, 1, expect={"arch": records.arch_of(config), "preset": "tiny",
                                                   "num_modules": 4, "depth": 4}, abstract=abstract, what="module")
  np.testing.assert_array_equal(module["blocks_3"]["mlp"]["fc1_kernel"],
                                modassem.load(inc)[1]["module_1"]["blocks_3"]["mlp"]["fc1_kernel"])


def test_broken_vmoe_files_are_one_line_errors(tmp_path, capsys):
  model, _ = _final(tmp_path)
  for name, edit, needle in (
      ("lost_bias", lambda s: s[1].pop("blocks.1.moe.experts.2.h4toh.bias"),
       "block 1: an MoE block lacks its experts.2.h4toh.bias"),
      ("bad_gate", lambda s: s[0].update({"blocks.1.moe.gate.gate.bias": torch.zeros(3)}), "gate.gate.bias has shape"),
      ("both", lambda s: s[2].update({"blocks.1.mlp.fc1.weight": torch.zeros(HIDDEN, WIDTH)}), "both an MLP and MoE")):
    stages = stages_of(model, (2, 2, 2, 2))
    edit(stages)
    path = str(tmp_path / f"{name}.pth")
    torch.save({"model_stages": stages}, path)
    capsys.readouterr()
    assert cli.main(["convert", f"--from={path}", f"--to={tmp_path / name}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("modassem convert: error: ") and needle in err and "\n" not in err, err
    assert not os.path.exists(tmp_path / name)
