"""Sparse MoE steps against dense ones: speed beside a dense step of equal active FLOPs, and memory per device as
the experts are split over more devices.

    python benchmarks/moe_step.py speed [--out=benchmarks/results/moe_step_cpu]
    python benchmarks/moe_step.py memory [--out=benchmarks/results/moe_memory_cpu]

`speed`: the e2e train step of a V-MoE (an MoE MLP of E experts, top k, in every block) and of the dense ViT whose
MLP is k times wider (mlp_ratio x k): per token both compute k MLPs of the same size, so their FLOPs differ by the
router alone. Medians of timed steps after compilation (step_time.measure), FLOPs as the trainer counts them
(`modassem.cost`: the k experts of each token, not every expert).

`memory`: the compiled e2e step of `--preset` (vmoe_b16 by default) at a fixed global batch on 1, 2, 4 and 8
devices (simulated CPU devices, one subprocess each: XLA reads the device count at start-up), compiled only:
XLA's memory analysis per device (arguments, outputs and temporaries), with the experts split over the devices
(one eighth each on 8) and the rest replicated (`--sharding=data`) or split too (`fsdp`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The CIFAR study's model (benchmarks/m2mkd_cifar.py --experts=4): 32-px images, 4-px patches, width 64, depth 12.
SMALL = {"model.width": 64, "model.heads": 2, "model.depth": 12, "model.depths": (3, 3, 3, 3),
         "model.num_classes": 10, "data.randaugment": "", "mixup": 0.0, "cutmix": 0.0}


def speed(a) -> dict:
  import step_time  # pylint: disable=g-import-not-at-top  (imports JAX: after the device count is set)
  rows = {}
  for name, extra in (("moe", {"model.moe.experts": a.experts, "model.moe.k": a.k}),
                      ("dense", {"model.mlp_ratio": 4.0 * a.k})):
    s = step_time.phase_setup(a.preset, "e2e", "", a.batch, "float32", "data", extra={**SMALL, **extra})
    rows[name] = step_time.measure(s, a.repeats)
    r = rows[name]
    print(f"{name:>6}: {r['step_s']:.4f} s/step {r['img_s']:.1f} img/s {r['flops']:.3e} FLOPs", flush=True)
  return {"kind": "speed", "preset": a.preset, "batch": a.batch, "experts": a.experts, "k": a.k,
          "repeats": a.repeats, "rows": rows}


def memory_one(a) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import step_time  # pylint: disable=g-import-not-at-top
  s = step_time.phase_setup(a.preset, "e2e", "", a.batch, a.dtype, a.sharding)
  r = step_time.measure(s, 0)
  return {"devices": jax.device_count(), "memory_gb": r["memory_gb"], "flops": r["flops"],
          "compile_s": r["compile_s"]}


def memory(a) -> dict:
  rows = []
  for n in (1, 2, 4, 8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "memory_one", f"--preset={a.preset}", f"--batch={a.batch}",
           f"--dtype={a.dtype}", f"--sharding={a.sharding}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{n} devices: {rows[-1]['memory_gb']:.2f} GiB per device", flush=True)
  return {"kind": "memory", "preset": a.preset, "batch": a.batch, "dtype": a.dtype, "sharding": a.sharding,
          "rows": rows}


def markdown(r: dict) -> str:
  if r["kind"] == "speed":
    moe, dense = r["rows"]["moe"], r["rows"]["dense"]
    lines = [f"{r['preset']} e2e step with the CIFAR study's model (width 64, depth 12, 32-px images), batch "
             f"{r['batch']}, float32, CPU, median of {r['repeats']} steps", "",
             "| model | step s | img/s | FLOPs/step | compile s |", "|---|---|---|---|---|",
             f"| V-MoE: {r['experts']} experts, top {r['k']}, every block | {moe['step_s']:.4f} | {moe['img_s']:.1f} | "
             f"{moe['flops']:.3e} | {moe['compile_s']:.1f} |",
             f"| dense, MLP {r['k']}x wider (equal active FLOPs) | {dense['step_s']:.4f} | {dense['img_s']:.1f} | "
             f"{dense['flops']:.3e} | {dense['compile_s']:.1f} |", "",
             f"The MoE step takes {moe['step_s'] / dense['step_s']:.2f}x the dense step's time for "
             f"{moe['flops'] / dense['flops']:.3f}x its FLOPs."]
  else:
    lines = [f"{r['preset']} e2e step, global batch {r['batch']}, {r['dtype']}, sharding {r['sharding']} (experts split "
             "over the devices), simulated CPU devices, compiled only", "",
             "| devices | memory per device GiB | FLOPs/step (all devices) | compile s |", "|---|---|---|---|"]
    lines += [f"| {x['devices']} | {x['memory_gb']:.2f} | {x['flops']:.3e} | {x['compile_s']:.1f} |" for x in r["rows"]]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("what", choices=["speed", "memory", "memory_one"])
  p.add_argument("--preset", default="")
  p.add_argument("--batch", type=int, default=0)
  p.add_argument("--experts", type=int, default=4)
  p.add_argument("--k", type=int, default=2)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--sharding", default="data")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--out", default="", help="write OUT.json and OUT.md")
  a = p.parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  if a.what == "memory_one":
    print(json.dumps(memory_one(a)))
    return
  if a.what == "speed":
    a.preset, a.batch = a.preset or "deit_t32_cifar", a.batch or 64
    r = speed(a)
  else:
    a.preset, a.batch = a.preset or "vmoe_b16", a.batch or 16
    r = memory(a)
  md = markdown(r)
  print(md)
  if a.out:
    with open(a.out + ".json", "w") as f:
      json.dump(r, f, indent=2)
    with open(a.out + ".md", "w") as f:
      f.write(md)


if __name__ == "__main__":
  main()
