"""Multi-host runs: starting JAX's multi-controller runtime, and a watchdog for stuck peers.

A pod job is the same command started once per host (see launch/ for TPU pods, SLURM,
Kubernetes and `launch/local.sh N` on one machine). Modes (gin `initialize.mode`):
- "auto" (default): initialize when the environment says this is one process of many:
  LLAMAHOME_COORDINATOR (host:port of process 0) / LLAMAHOME_NUM_PROCESSES /
  LLAMAHOME_PROCESS_ID set, a SLURM job step with several tasks, or a multi-host Cloud TPU
  slice (JAX detects the last two itself).
- "explicit": use the coordinator address, process count and id bound in gin.
- "off": single process, never initialize.

On CPU, cross-process collectives go through gloo (TCP). A process whose peer dies is
stopped by the runtime: a collective with the dead peer fails, or the coordination service
misses the peer's heartbeats for `heartbeat_timeout_seconds` and terminates the others
("... another task died"). A peer that hangs without dying is caught by the train loop's
`Watchdog` (below). Either way every process must be restarted; training resumes from the
last checkpoint.

Only process 0 writes logs (the others log warnings and errors only), metrics, status and
configs; every process takes part in checkpoint saves.

`Watchdog` ends a process whose training loop stops making progress. In a multi-process run
every step is a collective: when a peer process dies or hangs, the others block inside it.
JAX's coordination service catches a dead peer after its heartbeat timeout, but not a peer
that is alive and stuck. The train loop calls `kick()` after every step, eval batch and save;
if `timeout_s` passes without a kick, the watchdog logs what happened and exits the process
with status `EXIT_NO_PROGRESS`, so the launcher (SLURM, a JobSet, launch/local.sh) sees a
failure and can restart every process from the last checkpoint. Bound in gin:

    Watchdog.timeout_s = 600   # longer than the slowest step, eval or checkpoint save
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import logging as std_logging
import os
import sys
import threading
import time

import gin
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

EXIT_NO_PROGRESS = 75  # EX_TEMPFAIL: a restart may succeed

_initialized = False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _on_multi_host_cluster() -> bool:
    slurm_tasks = _env_int("SLURM_NTASKS") or _env_int("SLURM_STEP_NUM_TASKS")
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return (slurm_tasks or 1) > 1 or "," in tpu_hosts


def _use_gloo_on_cpu() -> None:
    """CPU collectives across processes need an implementation chosen before the backend starts."""
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show on the PCI bus under Google's vendor id


def cpu_only_despite_libtpu() -> bool:
    """Runs JAX on the CPU on a host where libtpu is installed but there is no TPU and no other
    accelerator plugin; returns whether it did.

    libtpu comes with the `tpu` and `test` extras, because the `plan` job compiles for TPU
    topologies on any host (plan/topology.py loads it for that by itself). With it installed
    and JAX_PLATFORMS unset, JAX's backend start-up probes for a TPU and libtpu prints several
    lines of errors on a machine that has none; telling JAX "cpu" skips the probe. Nothing
    changes where JAX_PLATFORMS is set, TPU chips are on the PCI bus, or a GPU plugin is
    installed (`jax_plugins` entry points), or once JAX's backends have started.
    """
    if (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
            or importlib.util.find_spec("libtpu") is None
            or list(importlib.metadata.entry_points(group="jax_plugins"))):
        return False
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with open(vendor) as f:
            if f.read().strip() == GOOGLE_PCI_VENDOR:
                return False
    jax.config.update("jax_platforms", "cpu")
    return True


@gin.configurable
def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: list[int] | None = None, initialization_timeout: int = 300,
               heartbeat_timeout_seconds: int = 100, shutdown_timeout_seconds: int = 60) -> bool:
    """Initializes jax.distributed once if this is one process of a pod; returns whether it did."""
    global _initialized
    cpu_only_despite_libtpu()
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
    _use_gloo_on_cpu()
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, local_device_ids=local_device_ids)
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None},
                               initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                               shutdown_timeout_seconds=shutdown_timeout_seconds)
    _initialized = True
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    if not is_coordinator():
        logging.set_verbosity(logging.WARNING)
        std_logging.getLogger("jax").setLevel(std_logging.WARNING)
    return True


def is_coordinator() -> bool:
    """True on the one process (index 0) that writes logs, metrics and configs."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process; every process must call this at the same point."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def from_coordinator(text: str, max_bytes: int = 4096) -> str:
    """Process 0's `text`, on every process (e.g. a run dir that each would name differently)."""
    if jax.process_count() == 1:
        return text
    encoded = text.encode()
    if len(encoded) > max_bytes:
        raise ValueError(f"{len(encoded)} bytes is over the {max_bytes} that from_coordinator sends")
    buffer = np.zeros(max_bytes, np.uint8)
    buffer[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    length, buffer = multihost_utils.broadcast_one_to_all((np.int32(len(encoded)), buffer))
    return bytes(np.asarray(buffer)[:int(length)]).decode()


@gin.configurable
class Watchdog:
    """Exits the process when `kick()` is not called for `timeout_s` seconds (None: never)."""

    def __init__(self, context: str = "", timeout_s: float | None = 600.0, poll_s: float | None = None):
        self.context, self.timeout_s, self.last_progress = context, timeout_s, "start"
        self.poll_s = poll_s or min(1.0, (timeout_s or 1.0) / 10)
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="llamahome-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._last = time.monotonic()
        if self.timeout_s is not None:
            self._thread.start()
        return self

    def kick(self, progress: str) -> None:
        """Records progress (e.g. "step 12"): the next `timeout_s` seconds start now."""
        self._last, self.last_progress = time.monotonic(), progress

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                message = (f"{self.context}: no progress for {idle:.0f} s since {self.last_progress} "
                           f"(Watchdog.timeout_s={self.timeout_s:g}): a peer process has probably "
                           "died or hung; see the other processes' logs. Exiting: restart every "
                           "process and training resumes from the last checkpoint")
                logging.error("%s", message)
                print(f"error: {message}", file=sys.stderr, flush=True)
                os._exit(EXIT_NO_PROGRESS)  # the main thread is stuck in a collective: no cleanup
