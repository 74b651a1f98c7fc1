"""Multi-process runs on JAX's own runtime (`jax.distributed`).

One process per host (TPU VM worker, GPU node). With no flags and no cluster
environment, nothing happens: one process sees every local device. On a TPU
pod or a SLURM/Open MPI cluster, `--distributed` lets JAX find the
coordinator itself; elsewhere `--coordinator=HOST:PORT --num_processes=N
--process_id=I` say it explicitly (all three, on every process). After this,
`jax.devices()` lists every device of every process, the mesh spans them, each
process feeds its own slice of each global batch, and Orbax writes and reads
checkpoints together from all processes (the run directory must be on a
filesystem they share).
"""

from __future__ import annotations

import jax

from modassem.errors import ModassemError


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               auto: bool = False) -> None:
  explicit = [coordinator, num_processes, process_id]
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ModassemError("multi-process runs need all of --coordinator=HOST:PORT, --num_processes=N and "
                        "--process_id=I on every process (or --distributed on a TPU pod or a SLURM cluster)")
  if not auto and coordinator is None:
    return
  # XLA:CPU has no cross-process collectives of its own; gloo provides them.
  # (This only concerns the CPU backend: GPUs and TPUs use their own.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def is_main() -> bool:
  """Process 0 writes the run's files (run.json, metrics, results) and talks to the terminal."""
  return jax.process_index() == 0


def say(message: str) -> None:
  """Prints on process 0 only: one line per event, not one per process."""
  if is_main():
    print(message, flush=True)
