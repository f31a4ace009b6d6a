"""Starting JAX's multi-controller runtime when a job runs on several hosts.

Modes (gin `initialize.mode`):
- "auto" (default): initialize when the environment says this is one process of many:
  LLAMAHOME_COORDINATOR / LLAMAHOME_NUM_PROCESSES / LLAMAHOME_PROCESS_ID set, a SLURM job
  step with several tasks, or a multi-host Cloud TPU slice (JAX detects the last two itself).
- "explicit": use the coordinator address, process count and id bound in gin.
- "off": single process, never initialize.
"""

from __future__ import annotations

import os

import gin
import jax
from absl import logging

_initialized = False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _on_multi_host_cluster() -> bool:
    slurm_tasks = _env_int("SLURM_NTASKS") or _env_int("SLURM_STEP_NUM_TASKS")
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return (slurm_tasks or 1) > 1 or "," in tpu_hosts


@gin.configurable
def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: list[int] | None = None,
               initialization_timeout: int = 300, heartbeat_timeout_seconds: int = 100) -> bool:
    """Initializes jax.distributed once if this is one process of a pod; returns whether it did."""
    global _initialized
    if _initialized or mode == "off":
        return _initialized
    coordinator_address = coordinator_address or os.environ.get("LLAMAHOME_COORDINATOR")
    num_processes = num_processes or _env_int("LLAMAHOME_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("LLAMAHOME_PROCESS_ID")
    if local_device_ids is None and os.environ.get("LLAMAHOME_LOCAL_DEVICE_IDS"):
        local_device_ids = [int(i) for i in os.environ["LLAMAHOME_LOCAL_DEVICE_IDS"].split(",")]
    explicit = coordinator_address is not None
    if mode == "auto" and not explicit and not _on_multi_host_cluster():
        return False
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, local_device_ids=local_device_ids,
                  initialization_timeout=initialization_timeout)
    try:
        jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None},
                                   heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    except TypeError:  # older jax without heartbeat_timeout_seconds
        jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    _initialized = True
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def is_coordinator() -> bool:
    """True on the one process (index 0) that writes logs, metrics and configs."""
    return jax.process_index() == 0
