"""What a run tells its user before the first step: the machine, the sharding, the batch, the model's size and cost,
and the schedule; and the accelerator peaks that turn FLOP/s into MFU."""

from __future__ import annotations

import math

import jax

# Dense bf16/fp16 peak FLOP/s of one JAX device, by a lowercase fragment of its `device_kind` (the first that
# matches wins, so the more specific fragments come first). Vendors' data sheets; TPU v4 and later, where one JAX
# device is one chip. Devices not listed get no MFU.
PEAK_FLOPS = (
    ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12), ("gh200", 989e12), ("b200", 2250e12),
    ("a100", 312e12), ("l4", 121e12), ("a10g", 125e12), ("l40s", 362e12),
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5p", 459e12), ("tpu v5", 459e12), ("tpu v4", 275e12),
)
_HALF = ("bfloat16", "float16")


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one device of `device_kind` computing in `dtype`; None where unknown (any CPU, float32)."""
  if str(dtype) not in _HALF:
    return None
  kind = device_kind.lower()
  return next((peak for fragment, peak in PEAK_FLOPS if fragment in kind), None)


def count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def startup(s, params, step_flops: float) -> dict:
  """The numbers of the start-up summary (also written to metrics.jsonl as a "setup" record)."""
  config = s.config
  devices = jax.devices()
  trained, frozen = count(params), count(s.frozen)
  peak = peak_flops(devices[0].device_kind, config.model.dtype)
  return {
      "jax": jax.__version__, "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
      "devices": len(devices), "processes": jax.process_count(),
      "mesh": " x ".join(f"{n} {a}" for a, n in s.mesh.shape.items()), "sharding": config.sharding,
      "batch": int(config.batch_size), "batch_per_device": config.batch_size // (len(devices) * config.accum_steps),
      "accum_steps": int(config.accum_steps), "params_total": trained + frozen, "params_trained": trained,
      "step_flops": float(step_flops), "steps": int(s.total_steps),
      "epochs": s.total_steps * config.batch_size / max(s.dataset.num_train, 1),
      "train_examples": int(s.dataset.num_train), "peak_flops": peak,
  }


def startup_lines(label: str, info: dict) -> list[str]:
  """The summary as the few lines process 0 prints."""
  per = f"{info['batch_per_device']} per device" + (f" x {info['accum_steps']} accumulation steps"
                                                      if info["accum_steps"] > 1 else "")
  peak = (f", peak {info['peak_flops'] / 1e12:.0f} TFLOP/s per device" if info["peak_flops"]
          else " (peak unknown here: no MFU)")
  return [
      f"{label}: JAX {info['jax']} on {info['backend']}: {info['devices']} x {info['device_kind']}, "
      f"{info['processes']} process(es){peak}",
      f"{label}: mesh {info['mesh']}, sharding {info['sharding']}; batch {info['batch']} ({per})",
      f"{label}: {info['params_total'] / 1e6:.3g} M parameters, {info['params_trained'] / 1e6:.3g} M trained; "
      f"{info['step_flops'] / 1e9:.4g} GFLOP per step",
      f"{label}: {info['steps']} steps, {info['epochs']:.3g} epochs of {info['train_examples']} examples",
  ]
