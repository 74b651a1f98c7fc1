"""Interchange with the official PyTorch checkpoints, against a PyTorch ViT with the official key layout.

The torch model here is written from the layout alone (pre-norm blocks, exact
GELU, class token, learned position embedding, head on the class token) and
matches the `tiny` preset, so converted runs plug into configs/tiny.py.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from conftest import REPO, tiny  # noqa: E402
from modassem import checkpoints, cli, convert, prepare, records, train  # noqa: E402
from modassem.errors import ModassemError  # noqa: E402
from modassem.models.presets import PRESETS  # noqa: E402
import modassem  # noqa: E402

PATCH, WIDTH, HEADS, IMAGE, CLASSES = 4, 16, 2, 8, 10   # the tiny preset


class Attention(nn.Module):
  def __init__(self, width, heads, qkv_bias=True):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
    self.proj = nn.Linear(width, width)

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  def __init__(self, width, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, width, heads):
    super().__init__()
    self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention(width, heads)
    self.norm2, self.mlp = nn.LayerNorm(width, eps=1e-6), Mlp(width, 4 * width)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch, width):
    super().__init__()
    self.proj = nn.Conv2d(3, width, patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class TorchViT(nn.Module):
  """The official key layout, global block indices: what `model` of a checkpoint loads into."""

  def __init__(self, depth, image=IMAGE, patch=PATCH, width=WIDTH, heads=HEADS, classes=CLASSES):
    super().__init__()
    self.patch_embed = PatchEmbed(patch, width)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, width))
    self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.head = nn.Linear(width, classes)
    # Non-trivial values everywhere: unit norms and zero biases would hide a swapped or dropped parameter.
    gen = torch.Generator().manual_seed(depth)
    with torch.no_grad():
      for p in self.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 else 0.0) * 0.2)

  def forward(self, images_nchw):
    x = self.patch_embed(images_nchw)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, 0])


def stages_of(model, depths):
  """`model_stages`: the full state dict cut into modules, with module-local block indices."""
  sd = model.state_dict()
  out, offset = [], 0
  for k, d in enumerate(depths):
    stage = {}
    if k == 0:
      stage.update({n: sd[n] for n in convert.STEM})
    for j in range(d):
      prefix = f"blocks.{offset + j}."
      stage.update({f"blocks.{j}.{n[len(prefix):]}": v for n, v in sd.items() if n.startswith(prefix)})
    if k == len(depths) - 1:
      stage.update({n: sd[n] for n in convert.TOP})
    out.append(stage)
    offset += d
  return out


def save_official(path, model, depths):
  torch.save({"model": model.state_dict(), "model_stages": stages_of(model, depths), "epoch": 3}, path)
  return str(path)


def images(n=4, size=IMAGE):
  return np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)


def torch_logits(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def jax_logits(path, x, **kw):
  model, params = modassem.load(path, **kw)
  return np.asarray(jax.jit(model.apply)({"params": params}, x))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """Official-layout files (meta, final, incubated module 1) and their runs imported with the CLI."""
  root = tmp_path_factory.mktemp("official")
  models = {"meta": TorchViT(4), "final": TorchViT(8), "inc1": TorchViT(5)}
  depths = {"meta": (1, 1, 1, 1), "final": (2, 2, 2, 2), "inc1": (1, 2, 1, 1)}
  files, runs = {}, {}
  for name, m in models.items():
    files[name] = save_official(root / f"{name}.pth", m.eval(), depths[name])
    runs[name] = str(root / f"{name}_run")
    assert cli.main(["convert", f"--from={files[name]}", f"--to={runs[name]}"]) == 0
  return {"root": root, "models": models, "files": files, "runs": runs}


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_import_writes_runs_that_say_what_they_are(official, capsys):
  expect = {"meta": ("meta", [0, 1, 2, 3], [1, 1, 1, 1]), "final": ("assemble", [0, 1, 2, 3], [2, 2, 2, 2]),
            "inc1": ("incubate", [1], [2, 2, 2, 2])}
  for name, (phase, trained, depths) in expect.items():
    with open(os.path.join(official["runs"][name], "run.json")) as f:
      run = json.load(f)
    assert (run["phase"], run["trained"], run["depths"], run["preset"]) == (phase, trained, depths, "tiny")
    assert run["arch"] == records.arch_of(tiny(phase))
    assert run["sources"] == [os.path.abspath(official["files"][name])]
    present = sorted(os.listdir(os.path.join(official["runs"][name], "modules")))
    assert present == [f"module_{k}" for k in trained]
  # One line says what was found.
  out = str(official["root"] / "again")
  capsys.readouterr()
  assert cli.main(["convert", f"--from={official['files']['inc1']}", f"--to={out}"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 and "incubated module 1 of 4" in lines[0] and "preset tiny" in lines[0], lines


@pytest.mark.parametrize("name", ["meta", "final", "inc1"])
def test_converted_logits_match_torch(official, name):
  x = images()
  want = torch_logits(official["models"][name], x)
  np.testing.assert_allclose(jax_logits(official["files"][name], x), want, atol=1e-4, rtol=0)
  # A run of an incubated module holds that module alone; the rest of its hybrid comes from its source file.
  np.testing.assert_allclose(jax_logits(official["runs"][name], x), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["meta", "final"])
def test_export_loads_strictly_into_torch_and_reimports_identically(official, tmp_path, name):
  out = str(tmp_path / f"{name}.pth")
  assert cli.main(["convert", f"--from={official['runs'][name]}", f"--to={out}"]) == 0
  ckpt = torch.load(out, map_location="cpu", weights_only=True)
  depth = 4 if name == "meta" else 8
  fresh = TorchViT(depth)
  fresh.load_state_dict(ckpt["model"], strict=True)
  x = images()
  np.testing.assert_allclose(torch_logits(fresh.eval(), x), torch_logits(official["models"][name], x), atol=1e-6)
  # The stages are the original file's, key for key and bit for bit.
  original = torch.load(official["files"][name], weights_only=True)["model_stages"]
  assert len(ckpt["model_stages"]) == len(original)
  for a, b in zip(ckpt["model_stages"], original):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
  # And back: the same parameters as the run that was exported.
  back = str(tmp_path / "back")
  assert cli.main(["convert", f"--from={out}", f"--to={back}"]) == 0
  a, b = _leaves(modassem.load(back)[1]), _leaves(modassem.load(official["runs"][name])[1])
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("grid_in,grid_out", [(2, 4), (14, 24), (16, 28), (7, 5), (3, 3)])
def test_pos_embed_resize_matches_torch_bicubic(grid_in, grid_out):
  pos = np.random.default_rng(grid_in).normal(size=(1, grid_in * grid_in + 1, 8)).astype(np.float32)
  got = convert.resize_pos_embed(pos, grid_out)
  grid = torch.from_numpy(pos[:, 1:]).reshape(1, grid_in, grid_in, 8).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=(grid_out, grid_out), mode="bicubic", align_corners=False)
  want = torch.cat([torch.from_numpy(pos[:, :1]), grid.permute(0, 2, 3, 1).reshape(1, -1, 8)], dim=1).numpy()
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(got[:, 0], pos[:, 0])


def test_higher_resolution_through_the_preset_and_load(official, tmp_path, monkeypatch):
  # A preset of another resolution resizes the position embedding (here 8 -> 16 px, grid 2 -> 4).
  monkeypatch.setitem(PRESETS, "tiny_16", {**PRESETS["tiny"], "image_size": 16})
  run = str(tmp_path / "hi")
  convert.convert(official["files"]["final"], run, preset="tiny_16")
  model, params = modassem.load(run)
  assert model.image_size == 16 and params["module_0"]["pos_embed"].shape == (1, 17, WIDTH)
  _, same = modassem.load(official["files"]["final"], image_size=16)
  np.testing.assert_array_equal(params["module_0"]["pos_embed"], same["module_0"]["pos_embed"])
  assert jax_logits(run, images(2, 16)).shape == (2, CLASSES)


def cli_error(capsys, *args):
  capsys.readouterr()
  rc = cli.main(["convert", *args])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert rc == 2 and len(err) == 1 and err[0].startswith("modassem convert: error: "), (rc, err)
  return err[0]


def test_broken_inputs_are_one_line_errors(official, tmp_path, capsys):
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint\n")
  assert "torch.load(weights_only=True)" in cli_error(capsys, f"--from={text}", f"--to={tmp_path / 'a'}")
  no_stages = tmp_path / "plain.pth"
  torch.save({"model": official["models"]["meta"].state_dict()}, no_stages)
  assert "no model_stages" in cli_error(capsys, f"--from={no_stages}", f"--to={tmp_path / 'b'}")
  # An arbitrary pickle: weights_only refuses to run it.
  evil = tmp_path / "evil.pth"
  torch.save({"model_stages": [object()]}, evil)
  refused = cli_error(capsys, f"--from={evil}", f"--to={tmp_path / 'c'}")
  # PyTorch's refusal carries terminal escapes (bold); the message is plain text, from the CLI and from the API.
  assert "weights_only" in refused and "do those steps only if you trust" in refused and refused.isprintable()
  with pytest.raises(ModassemError) as raised:
    modassem.load(str(evil))
  assert str(raised.value).isprintable() and "do those steps only if you trust" in str(raised.value)
  stages = stages_of(official["models"]["final"], (2, 2, 2, 2))
  stages[2]["blocks.1.mlp.fc1.weight"] = torch.zeros(7, WIDTH)
  bad = tmp_path / "shape.pth"
  torch.save({"model_stages": stages}, bad)
  assert "model_stages[2]['blocks.1.mlp.fc1.weight'] has shape (7, 16)" in cli_error(
      capsys, f"--from={bad}", f"--to={tmp_path / 'd'}")
  stages = stages_of(official["models"]["final"], (2, 2, 2, 2))
  stages[1]["extra.weight"] = torch.zeros(3)
  odd = tmp_path / "odd.pth"
  torch.save({"model_stages": stages}, odd)
  assert "unexpected key 'extra.weight'" in cli_error(capsys, f"--from={odd}", f"--to={tmp_path / 'e'}")
  assert "already holds a run" in cli_error(capsys, f"--from={official['files']['meta']}",
                                            f"--to={official['runs']['meta']}")
  assert "does not exist" in cli_error(capsys, f"--from={tmp_path / 'nothing.pth'}", f"--to={tmp_path / 'f'}")
  for name in "abcdef":
    assert not os.path.exists(tmp_path / name)
  # The process exit status, not only main()'s return value.
  proc = subprocess.run([sys.executable, "-m", "modassem", "convert", f"--from={text}", f"--to={tmp_path / 'g'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_converted_runs_plug_into_the_phases(official, tmp_path, capsys):
  runs = official["runs"]
  # eval of a converted model: no train state, its modules are evaluated.
  capsys.readouterr()
  assert cli.main(["eval", f"--config={REPO}/configs/tiny.py:assemble", f"--workdir={runs['final']}"]) == 0
  evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # The official model itself, in PyTorch, on the same held-out digits.
  from modassem import data  # pylint: disable=g-import-not-at-top
  config = tiny("assemble")
  right = total = 0
  for batch in data.build(config.data, config.model.image_size).eval_batches(config.eval_batch_size):
    real = batch["mask"] > 0
    predicted = torch_logits(official["models"]["final"], batch["image"][real]).argmax(-1)
    right, total = right + int((predicted == batch["label"][real]).sum()), total + int(real.sum())
  assert total == 360 and evaluated["top1"] == pytest.approx(100.0 * right / total, abs=1e-4)
  assert not os.path.exists(checkpoints.state_dir(runs["final"]))   # evaluating adds no empty checkpoint folder
  # The converted incubated module and final model are assembly sources ...
  s = prepare.setup(tiny("assemble", modules=",".join([runs["final"], runs["inc1"], runs["final"], runs["final"]])), None)
  got = _leaves(s.sources["module_1"])
  want = _leaves(modassem.load(official["files"]["inc1"])[1]["module_1"])
  assert all(np.array_equal(got[k], want[k]) for k in want)
  # ... and the converted meta model is the frozen meta model of a short incubation.
  inc2 = str(tmp_path / "inc2")
  result = train.train(tiny("incubate", meta=runs["meta"], module="2"), inc2)
  assert np.isfinite(result["loss"])
  # Exported, that incubation run is its hybrid: module 2 from the run, the others from the converted meta model.
  out = str(tmp_path / "inc2.pth")
  assert cli.main(["convert", f"--from={inc2}", f"--to={out}"]) == 0
  stages = torch.load(out, weights_only=True)["model_stages"]
  meta = torch.load(official["files"]["meta"], weights_only=True)["model_stages"]
  assert [len({k.split(".")[1] for k in st if k.startswith("blocks.")}) for st in stages] == [1, 1, 2, 1]
  for k in (0, 1, 3):
    assert all(torch.equal(stages[k][n], meta[k][n]) for n in meta[k])


def test_an_architecture_no_preset_has_loads_with_its_head_count(tmp_path, capsys):
  """Patch 8, width 64, 4 heads, 32 px: no preset. Heads leave no trace in the weights, so the user names them."""
  model = TorchViT(8, image=32, patch=8, width=64, heads=4).eval()
  path = save_official(tmp_path / "custom.pth", model, (2, 2, 2, 2))
  x = images(size=32)
  want = torch_logits(model, x)
  with pytest.raises(ModassemError, match="matches no preset.*--heads"):
    modassem.load(path)
  np.testing.assert_allclose(jax_logits(path, x, heads=4), want, atol=1e-4, rtol=0)
  # The head count matters: with 2 heads the same weights compute another function.
  assert np.abs(jax_logits(path, x, heads=2) - want).max() > 1e-2
  with pytest.raises(ModassemError, match="--heads=3 does not divide the width 64"):
    modassem.load(path, heads=3)
  run = str(tmp_path / "custom_run")
  capsys.readouterr()
  assert cli.main(["convert", f"--from={path}", f"--to={run}", "--heads=4"]) == 0
  assert "preset custom" in capsys.readouterr().out
  with open(os.path.join(run, "run.json")) as f:
    arch = json.load(f)["arch"]
  assert (arch["heads"], arch["ln_eps"], arch["width"], arch["patch"], arch["image_size"]) == (4, 1e-6, 64, 8, 32)
  np.testing.assert_allclose(jax_logits(run, x), want, atol=1e-4, rtol=0)
  # Another eps is taken as given.
  assert not np.allclose(jax_logits(path, x, heads=4, ln_eps=0.5), want, atol=1e-3)
