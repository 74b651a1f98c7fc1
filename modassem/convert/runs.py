"""Run directories <-> `Model`s, and the `modassem convert` verb.

A run directory's modules are read and written through `checkpoints` (the
same run file, module items and checks every phase uses), so a converted run
works wherever a trained one does.
"""

from __future__ import annotations

import os

import numpy as np

from modassem import checkpoints, files, records
from modassem.convert.arch import Model, at_image_size, describe, match_preset, run_depths
from modassem.convert.official import infer_arch, module_to_stage, read_pth, stage_to_module, write_pth
from modassem.errors import ModassemError
from modassem.models.presets import ARCH_FIELDS, PRESETS
from modassem.models.vit import abstract_params, dense_arch, vit_of
from modassem.names import module_name


# The official code's LayerNorm eps (timm's ViT with `partial(nn.LayerNorm, eps=1e-6)`), for a checkpoint of an
# architecture that no preset has.
OFFICIAL_LN_EPS = 1e-6


def check_custom(preset: str | None, heads: int | None, ln_eps: float | None) -> None:
  """`preset`, `heads` and `ln_eps` as given, before any file is read."""
  if preset is not None and preset not in PRESETS:
    raise ModassemError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}, or give the architecture's "
                        "--heads (and --ln_eps) instead")
  if heads is not None and heads < 1:
    raise ModassemError(f"--heads={heads} is not a head count: pass the attention heads the checkpoint was trained "
                        "with, e.g. --heads=4")
  if ln_eps is not None and not ln_eps > 0:
    raise ModassemError(f"--ln_eps={ln_eps} must be positive: pass the LayerNorm eps the checkpoint was trained "
                        f"with ({OFFICIAL_LN_EPS:g} in the official code)")


def model_from_pth(path: str, preset: str | None = None, *, heads: int | None = None,
                   ln_eps: float | None = None) -> Model:
  """An official checkpoint as a `Model`. Heads and LayerNorm eps leave no trace in the weights: they come from
  `heads`/`ln_eps` where given (an architecture no preset has; eps defaults to the official 1e-6), else from
  `preset`, else from the one preset that fits every shape."""
  check_custom(preset, heads, ln_eps)
  stages = read_pth(path)
  arch, depths = infer_arch(stages, path)
  if heads is None:
    name = match_preset(arch, depths, preset, path)
    heads = PRESETS[name]["heads"]
    ln_eps = PRESETS[name]["ln_eps"] if ln_eps is None else ln_eps
  else:
    name = match_preset(arch, depths, preset, path) if preset is not None else "custom"
    ln_eps = (PRESETS[name]["ln_eps"] if preset is not None else OFFICIAL_LN_EPS) if ln_eps is None else ln_eps
  if arch["width"] % heads:
    raise ModassemError(f"--heads={heads} does not divide the width {arch['width']} of {path}: pass the head count "
                        "it was trained with (a divisor of its width)")
  arch.update(heads=int(heads), ln_eps=float(ln_eps))
  model = Model(arch=arch, preset=name, depths=depths, modules=[stage_to_module(s) for s in stages])
  if preset is not None:
    # A preset of another resolution is a request to fine-tune there: move the position embedding to its grid.
    model = at_image_size(model, PRESETS[name]["image_size"])
  return model


def model_to_stages(model: Model) -> list[dict]:
  return [module_to_stage(tree) for tree in model.modules]


# --- run directories --------------------------------------------------------

def _read_run(run_dir: str) -> dict:
  run = files.read_json(files.path(run_dir) / records.RUN_FILE)
  if run is None:
    raise ModassemError(f"{run_dir} has no {records.RUN_FILE}: pass a modassem run directory or an official "
                        f".pth file")
  missing = [k for k in ("phase", "arch", "depths", "trained") if k not in run]
  if missing:
    raise ModassemError(f"{files.join(run_dir, records.RUN_FILE)} lacks {missing[0]!r}: "
                        f"not a modassem run directory")
  return run


def _load_modules(run_dir: str, arch: dict, slots, depths, what: str) -> dict:
  abstract = abstract_params(vit_of(arch, depths))
  expect = {"arch": arch, "num_modules": len(depths)}
  return {k: checkpoints.load_module(run_dir, k, expect={**expect, "depth": depths[k]},
                                     abstract=abstract[module_name(k)], what=what) for k in slots}


def model_from_run(run_dir: str, module: int | None = None) -> Model:
  """The model a finished run's modules make: the run's own, or for an incubated module, its hybrid.

  An incubation run stores its module(s) alone; the other slots of the hybrid are the meta run's modules, found
  through run.json's `sources`. A run that incubated several modules together (`module=all`) holds one hybrid per
  module: `module` picks it.
  """
  run = _read_run(run_dir)
  trained, num = list(run["trained"]), len(run["depths"])
  if module is not None and (run["phase"] != "incubate" or module not in trained):
    what = f"incubated module(s) {trained}" if run["phase"] == "incubate" else f"a {run['phase']} run"
    raise ModassemError(f"{run_dir} is {what}: module={module} picks one incubated module's hybrid "
                        + ("from them: pass one of those" if run["phase"] == "incubate" else "from an incubation run: "
                           "leave module out to load this run's model"))
  if run["phase"] != "incubate":
    depths = [1] * num if run["phase"] == "meta" else list(run["depths"])
    arch = dict(run["arch"])
    mods = _load_modules(run_dir, arch, range(num), depths, "run")
  else:
    if len(trained) != 1 and module is None:
      raise ModassemError(f"{run_dir} incubated modules {trained} together, one hybrid each: pick one with "
                          "module=i (modassem.load) or, to export it, incubate one module per run "
                          "(--config.module=i)")
    i = trained[0] if module is None else module
    if run.get("stitches"):
      raise ModassemError(f"{run_dir} incubated modules of width {run['arch']['width']} in a meta model of width "
                          f"{run['stitches']['meta']['width']}, joined by stitch layers that no official layout "
                          "holds: load or export the assembly of these modules instead")
    depths = [run["depths"][i] if k == i else 1 for k in range(num)]
    meta = files.recorded((run.get("sources") or [""])[0], run_dir)
    mods = _load_modules(run_dir, run["arch"], [i], depths, "run")
    others = [k for k in range(num) if k != i]
    if meta and files.path(meta).is_file():
      # An imported incubated module: its source file is the whole hybrid, meta modules included.
      hybrid = model_from_pth(meta, heads=run["arch"]["heads"], ln_eps=run["arch"]["ln_eps"])
      mods.update({k: hybrid.modules[k] for k in others})
    else:
      mods.update(_load_modules(meta, dense_arch(run["arch"]), others, depths, f"meta run of {run_dir}"))
    # The hybrid: module i as the run trained it, in the dense meta model.
    arch = dense_arch(run["arch"])
    if "moe" in run["arch"]:
      moe = run["arch"]["moe"]
      arch["moe"] = {**moe, "layout": [moe["layout"][k] if k == i else [] for k in range(num)]}
  modules = [jax_free(mods[k]) for k in range(num)]
  return Model(arch=arch, preset=str(run.get("preset", "")), depths=depths, modules=modules)


def jax_free(tree):
  """NumPy copies of a parameter tree's arrays."""
  if isinstance(tree, dict):
    return {k: jax_free(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


def write_run(model: Model, run_dir: str, sources: list[str]) -> dict:
  """A run directory holding the model's trained modules, readable by every phase that reads runs."""
  if (files.path(run_dir) / records.RUN_FILE).exists():
    raise ModassemError(f"{run_dir} already holds a run: pass a new directory to --to")
  phase, trained = model.kind
  arch = {f: model.arch[f] for f in ARCH_FIELDS}
  if "moe" in model.arch:
    moe = model.arch["moe"]
    # As run.json's depths: an incubated module's blocks stand for every module's (the meta modules are dense).
    layout = [moe["layout"][trained[0]]] * len(model.depths) if phase == "incubate" else moe["layout"]
    arch["moe"] = {**moe, "layout": [list(b) for b in layout]}
  run = {"phase": phase, "preset": model.preset, "arch": arch,
         "depths": run_depths(model.depths), "trained": trained, "total_steps": 0,
         "sources": [os.fspath(files.path(s)) for s in sources]}
  files.path(run_dir).mkdir(parents=True, exist_ok=True)
  checkpoints.save_modules(run_dir, {module_name(k): model.modules[k] for k in trained})
  # run.json last: a run directory with it is complete.
  files.write_json(files.path(run_dir) / records.RUN_FILE, run)
  return run


# --- the verb ---------------------------------------------------------------

def _summary(model: Model) -> str:
  a = model.arch
  phase, trained = model.kind
  return (f"{describe(phase, trained, model.depths)}, preset {model.preset}: patch {a['patch']}, width {a['width']}, "
          f"heads {a['heads']}, MLP ratio {a['mlp_ratio']:g}, qkv bias {'yes' if a['qkv_bias'] else 'no'}, "
          f"LayerNorm eps {a['ln_eps']:g}, {a['num_classes']} classes, {a['image_size']} px"
          + (f", MoE MLPs of {a['moe']['experts']} experts (top {a['moe']['k']}) in "
             f"{sum(map(len, a['moe']['layout']))} blocks" if "moe" in a else ""))


def convert(src: str, dst: str, preset: str | None = None, heads: int | None = None,
            ln_eps: float | None = None) -> str:
  """`.pth -> run directory` (import) or `run directory -> .pth` (export); returns the one-line summary."""
  if not src or not dst:
    raise ModassemError("pass --from=FILE.pth --to=RUNDIR (import) or --from=RUNDIR --to=FILE.pth (export)")
  check_custom(preset, heads, ln_eps)
  if files.path(src).is_dir():
    if (preset, heads, ln_eps) != (None, None, None):
      raise ModassemError("--preset, --heads and --ln_eps apply to importing a .pth file; an exported run keeps its "
                          "own architecture")
    if files.path(dst).is_dir():
      raise ModassemError(f"{dst} is a directory: pass the .pth file to write with --to")
    model = model_from_run(src)
    write_pth(dst, model_to_stages(model))
    return f"{src}: {_summary(model)} -> {dst}"
  if not files.path(src).exists():
    raise ModassemError(f"{src} does not exist: pass an official .pth checkpoint or a run directory")
  model = model_from_pth(src, preset, heads=heads, ln_eps=ln_eps)
  run = write_run(model, dst, [src])
  written = ", ".join(module_name(k) for k in run["trained"])
  return f"{src}: {_summary(model)} -> {dst} (phase {run['phase']}, {written})"
