"""Run directories <-> `Model`s, and the `modassem convert` verb.

A run directory's modules are read and written through `checkpoints` (the
same run file, module items and checks every phase uses), so a converted run
works wherever a trained one does.
"""

from __future__ import annotations

import os

import numpy as np

from modassem import checkpoints, files
from modassem.convert.arch import Model, at_image_size, describe, match_preset, run_depths
from modassem.convert.official import infer_arch, module_to_stage, read_pth, stage_to_module, write_pth
from modassem.errors import ModassemError
from modassem.models.presets import ARCH_FIELDS, PRESETS
from modassem.models.vit import ViT, abstract_params


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
  run = files.read_json(files.path(run_dir) / checkpoints.RUN_FILE)
  if run is None:
    raise ModassemError(f"{run_dir} has no {checkpoints.RUN_FILE}: pass a modassem run directory or an official "
                        f".pth file")
  missing = [k for k in ("phase", "arch", "depths", "trained") if k not in run]
  if missing:
    raise ModassemError(f"{files.join(run_dir, checkpoints.RUN_FILE)} lacks {missing[0]!r}: "
                        f"not a modassem run directory")
  return run


def _load_modules(run_dir: str, run: dict, slots, depths, what: str) -> dict:
  abstract = abstract_params(ViT(depths=tuple(depths), **run["arch"]))
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
    if meta and files.path(meta).is_file():
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
  if (files.path(run_dir) / checkpoints.RUN_FILE).exists():
    raise ModassemError(f"{run_dir} already holds a run: pass a new directory to --to")
  phase, trained = model.kind
  run = {"phase": phase, "preset": model.preset, "arch": {f: model.arch[f] for f in ARCH_FIELDS},
         "depths": run_depths(model.depths), "trained": trained, "total_steps": 0,
         "sources": [os.fspath(files.path(s)) for s in sources]}
  files.path(run_dir).mkdir(parents=True, exist_ok=True)
  checkpoints.save_modules(run_dir, {f"module_{k}": model.modules[k] for k in trained})
  # run.json last: a run directory with it is complete.
  files.write_json(files.path(run_dir) / checkpoints.RUN_FILE, run)
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
  if files.path(src).is_dir():
    if preset is not None:
      raise ModassemError("--preset applies to importing a .pth file; an exported run keeps its own architecture")
    if files.path(dst).is_dir():
      raise ModassemError(f"{dst} is a directory: pass the .pth file to write with --to")
    model = model_from_run(src)
    write_pth(dst, model_to_stages(model))
    return f"{src}: {_summary(model)} -> {dst}"
  if not files.path(src).exists():
    raise ModassemError(f"{src} does not exist: pass an official .pth checkpoint or a run directory")
  model = model_from_pth(src, preset)
  run = write_run(model, dst, [src])
  written = ", ".join(f"module_{k}" for k in run["trained"])
  return f"{src}: {_summary(model)} -> {dst} (phase {run['phase']}, {written})"
