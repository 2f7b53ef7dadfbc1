"""Process setup before JAX's backends start: forced CPU devices and multi-host initialisation.

One process drives all of its host's devices. With several hosts, `jax.distributed.initialize` connects them:
with explicit coordinator flags when given, or auto-detected (JAX_COORDINATOR_ADDRESS, or a SLURM / Open MPI
job of more than one task, which jax's own cluster detection then reads). CPU-only processes exchange
collectives through gloo (jax_cpu_collectives_implementation), which XLA:CPU needs across processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax


@dataclass(frozen=True)
class DistributedArgs:
    """Explicit multi-host flags; all None means auto-detect (or a single process)."""

    coordinator: str | None = None  # host:port of process 0's coordinator service
    num_processes: int | None = None
    process_id: int | None = None


def _cluster_detected() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return False


def setup(cpu_devices: int, args: DistributedArgs = DistributedArgs()) -> None:
    """Call once, before any JAX computation. Raises ValueError for incomplete coordinator flags."""
    if cpu_devices > 0:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise ValueError("multi-host: give all of --coordinator, --num-processes and --process-id (or none)")
        if not 0 <= args.process_id < args.num_processes:
            raise ValueError(f"--process-id {args.process_id} is not in [0, {args.num_processes})")
        if args.num_processes > 1:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                       process_id=args.process_id)
    elif _cluster_detected():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()


def is_main() -> bool:
    return jax.process_index() == 0
