"""Joining several processes into one JAX runtime (`jax.distributed`), on TPU, GPU or CPU.

On TPU pods and under Slurm, `jax.distributed.initialize()` finds the coordinator, the number of
processes and this process's id itself; elsewhere (local processes, a plain cluster) they are
given explicitly. CPU processes exchange data through gloo collectives.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> None:
  """Initialises `jax.distributed` when asked (explicit arguments, or `auto` detection).

  With none of them, the run is a single process and nothing happens.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if all(v is None for v in explicit) and not auto:
    return
  if not auto and any(v is None for v in explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together "
                     "(or use --distributed=auto)")
  # Used by CPU devices only (accelerator backends have their own collectives). Probing the
  # backend here would initialise it, which jax.distributed forbids before `initialize`.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
