"""Train-step speed, FLOPs and memory of every phase, side by side.

    python benchmarks/step_time.py --preset=vit_b --batch=8 --dtype=float32
    python benchmarks/step_time.py --preset=vit_h --batch=8 --repeats=0 --scan   # compile time only

For each phase (e2e, meta, incubate i for every i, incubate all, assemble) it
builds the phase's real compiled step (the trainer's own `compile_train_step`)
on random parameters and random images, then reports:

  step_s     median wall time of one step after compilation (--repeats timed steps)
  img_s      images per second at that median
  flops      FLOPs of one step from XLA's cost analysis of the lowered (global)
             step, as the trainer counts them (with --scan, of the same step
             with its blocks written out: XLA counts a loop body once)
  vs_e2e     flops / the e2e step's flops
  mfu        flops / step_s / the devices' peak (None where the peak is unknown, e.g. CPU)
  memory_gb  arguments + outputs + temporaries of the compiled step (XLA's memory analysis)
  compile_s  seconds to trace, lower and compile the step (--scan: the blocks of a
             module are traced once, not once each)

and writes JSON and a Markdown table (--out). Nothing here reads data or
checkpoints: meta and source modules are random, which does not change speed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from modassem import config as config_lib, cost, phases, prepare, sharding  # noqa: E402

# Dense peak FLOP/s per device, by compute dtype. Sources: vendor datasheets
# (H100/H200 SXM, A100 SXM: tensor-core dense figures; fp32 entries are TF32,
# which XLA uses for float32 matmuls on these GPUs by default) and Cloud TPU
# documentation (per chip).
PEAKS = {
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12 / 4},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12 / 4},
}


def peak_flops(device, dtype: str):
  kind = getattr(device, "device_kind", "")
  for name, peaks in PEAKS.items():
    if name.lower() in kind.lower():
      return peaks.get(dtype)
  return None


def _random_modules(model, key, mesh, mode):
  image = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  params = jax.jit(model.init)(key, image)["params"]
  return jax.device_put(params, sharding.tree_shardings(params, mesh, mode))


def phase_setup(preset: str, phase: str, module: str, batch: int, dtype: str, mode: str,
                remat: str = "none", scan: bool = False, extra: dict | None = None) -> prepare.Setup:
  overrides = {"batch_size": batch, "model.dtype": dtype, "sharding": mode, "total_steps": 1000, "warmup_steps": 10,
               "model.remat": remat, "model.scan": scan, **(extra or {})}
  if phase == "incubate":
    overrides["module"] = module
  config = config_lib.load(os.path.join(REPO, "configs", f"{preset}.py:{phase}"), overrides)
  plan = phases.make_plan(config)
  mesh = sharding.make_mesh()
  model_of = functools.partial(phases.model_for, config, devices=mesh.size)
  frozen, sources = {}, None
  if plan.incubate:
    meta = _random_modules(model_of(plan.meta_depths, **phases.frozen_arch(plan)), jax.random.key(1), mesh, mode)
    frozen = {phases.module_name(k): meta[phases.module_name(k)] for k in phases.frozen_slots(plan)}
  if phase == "assemble":
    sources = _random_modules(model_of(plan.depths), jax.random.key(2), mesh, mode)
  return prepare.Setup(config=config, plan=plan, dataset=None, mesh=mesh, model_of=model_of, run={}, total_steps=1000,
                       warmup_steps=10, frozen=frozen, sources=sources)


def measure(s: prepare.Setup, repeats: int) -> dict:
  """Compiles the step; with repeats > 0 also times it (repeats = 0: FLOPs and memory only)."""
  t0 = time.perf_counter()
  lowered, _, init_fn, _, key, schedule = step = prepare.lower_train_step(s)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = cost.train_step_flops(s, step)
  mem = compiled.memory_analysis()
  memory = None
  if mem is not None:
    memory = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
              - mem.alias_size_in_bytes) / 2**30
  out = {"flops": flops, "compile_s": compile_s, "memory_gb": memory, "step_s": None, "img_s": None, "mfu": None,
         "times": []}
  if repeats <= 0:
    return out
  state = init_fn(key)
  c = s.config
  rng = np.random.default_rng(0)
  shard = sharding.batch_sharding(s.mesh)
  size = c.model.image_size
  batch = {"image": jax.device_put(rng.normal(size=(c.batch_size, size, size, 3)).astype(np.float32), shard),
           "label": jax.device_put(rng.integers(0, c.model.num_classes, c.batch_size).astype(np.int32), shard)}
  for _ in range(2):  # warm-up: first calls pay for allocation
    state, metrics = compiled(state, s.frozen, batch, key, schedule)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, metrics = compiled(state, s.frozen, batch, key, schedule)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  peak = peak_flops(jax.devices()[0], str(c.model.dtype))
  out.update(step_s=step_s, img_s=c.batch_size / step_s, times=times,
             mfu=flops / step_s / (peak * s.mesh.size) if peak else None)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="vit_b", help="config file name under configs/ (vit_b, vit_l, vit_h, ...)")
  p.add_argument("--batch", type=int, default=8, help="global batch size")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--sharding", default="data", choices=list(sharding.MODES))
  p.add_argument("--repeats", type=int, default=5, help="timed steps per phase (median reported); 0: compile only")
  p.add_argument("--remat", default="none", help="per-block rematerialisation: none, dots, full")
  p.add_argument("--scan", action="store_true", help="nn.scan over each module's blocks (model.scan)")
  p.add_argument("--phases", default="", help="comma-separated subset, e.g. e2e,incubate0,incubate_all")
  p.add_argument("--out", default="", help="write OUT.json and OUT.md")
  args = p.parse_args(argv)

  k = config_lib.load(os.path.join(REPO, "configs", f"{args.preset}.py:e2e")).model.num_modules
  names = ["e2e", "meta"] + [f"incubate{i}" for i in range(k)] + ["incubate_all", "assemble"]
  if args.phases:
    names = [n for n in names if n in args.phases.split(",")] or names
  if "e2e" not in names:
    names.insert(0, "e2e")   # the reference for vs_e2e
  rows = {}
  for name in names:
    phase = "incubate" if name.startswith("incubate") else name
    module = name[len("incubate"):].lstrip("_") if phase == "incubate" else ""
    rows[name] = measure(phase_setup(args.preset, phase, module, args.batch, args.dtype, args.sharding, args.remat,
                                     args.scan),
                         args.repeats)
    rows[name]["vs_e2e"] = rows[name]["flops"] / rows["e2e"]["flops"]
    r = rows[name]
    timing = f"{r['step_s']:.4f} s/step  {r['img_s']:8.1f} img/s  " if r["step_s"] else ""
    print(f"{name:>13}: {timing}{r['flops']:.3e} FLOPs ({r['vs_e2e']:.3f} of e2e)  compile {r['compile_s']:.1f} s  "
          f"memory {r['memory_gb']:.2f} GiB", flush=True)

  device = jax.devices()[0]
  report = {"preset": args.preset, "batch": args.batch, "dtype": args.dtype, "sharding": args.sharding, "remat": args.remat,
            "scan": args.scan, "device": getattr(device, "device_kind", str(device)), "devices": jax.device_count(),
            "jax": jax.__version__, "repeats": args.repeats, "phases": rows}
  md = markdown(report)
  print(md)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump(report, f, indent=2)
    with open(args.out + ".md", "w") as f:
      f.write(md)


def markdown(r: dict) -> str:
  lines = [f"{r['preset']}, batch {r['batch']}, {r['dtype']}, {r['devices']} x {r['device']} ({r['sharding']}, "
           f"remat {r['remat']}{', scanned blocks' if r.get('scan') else ''}), jax {r['jax']}, "
           f"median of {r['repeats']} steps", "",
           "| phase | step s | img/s | FLOPs/step | of e2e | MFU | memory GiB | compile s |",
           "|---|---|---|---|---|---|---|---|"]
  for name, x in r["phases"].items():
    mfu = f"{100 * x['mfu']:.1f} %" if x["mfu"] is not None else "-"
    mem = f"{x['memory_gb']:.2f}" if x["memory_gb"] is not None else "-"
    step = f"{x['step_s']:.4f} | {x['img_s']:.1f}" if x["step_s"] else "- | -"
    lines.append(f"| {name} | {step} | {x['flops']:.3e} | {x['vs_e2e']:.3f} | {mfu} | {mem} | {x['compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
