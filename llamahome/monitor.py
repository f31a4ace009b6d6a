"""What a run reports while it trains: metrics, the status heartbeat, MFU and a profile.

- `MetricsWriter` appends train/eval records to the run dir's `metrics.jsonl` (one JSON object
  per line, as the dashboard reads it) and TensorBoard event files under `tensorboard/`, and
  shows a tqdm bar:

      {"step", "time", "split": "train", "loss", "perplexity", "grad_norm", "learning_rate",
       "tokens_per_sec", "step_time", "mfu", "tokens_seen"}
      {"step", "time", "split": "eval", "loss", "perplexity"[, "bits_per_byte"]}
      {"step", "time", "split": "downstream", "<task>/<metric>": value, ...}   (lm-eval tasks)

- `Heartbeat` keeps `status.json` in the run dir, replaced atomically: {"status", "step",
  "total_steps", "model", "started", "updated", "pid", "host"}.
- `peak_flops` and `mfu`: model FLOPs utilisation, achieved model FLOP/s over the hardware's
  peak (below).
- `Profiler`: a `jax.profiler` trace of steps N..M into `profile/` (open it in TensorBoard's
  profile tab or Perfetto):

      Profiler.start_step = 10
      Profiler.end_step = 15

MFU. On accelerators the peak is the datasheet's dense bf16 FLOP/s per device, looked up by
`device_kind` (override in gin: `peak_flops.per_device = 989e12` or extend `peak_flops.table`).
On CPU there is no datasheet figure worth trusting, so the peak is measured: the best dense
matmul FLOP/s XLA reaches on this machine (benchmarks/peak.py prints it). The CPU figure is
for the whole machine, however many fake devices XLA_FLAGS splits it into.

A CPU measurement moves with the machine's load (the same code measured 242-305 GFLOP/s under
load and 470-495 quiet), and a peak measured at a loaded moment makes MFU read above 100%. So
the figure is measured once per machine (CPU model, cores, JAX version, devices, dtype), as the
best of several timed matmuls, and cached under the cache dir (`peak_flops/*.json`); later runs
reuse it (a cache dir on object storage: the local default cache root instead); `peak_flops.remeasure = True` adds a measurement, and the best of them is the peak.
MFU is clamped at 100%.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import socket
import time
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import tqdm
from absl import logging

from llamahome.files import RunDir, local_cache_dir, write_text_atomic

# ---------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl, TensorBoard and the progress bar


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


class MetricsWriter:
    """Appends train/eval records to metrics.jsonl and TensorBoard; shows a progress bar."""

    def __init__(self, run_dir: str | Path, total_steps: int, initial_step: int = 0,
                 progress_bar: bool = True, mfu_peak: str = ""):
        """`mfu_peak`: what MFU divides by, shown after it in the bar ('270 GFLOP/s measured')."""
        run = RunDir(run_dir)
        self._mfu_of = f" of {mfu_peak}" if mfu_peak else ""
        run.path.mkdir(parents=True, exist_ok=True)
        self._jsonl = run.metrics.open("a", encoding="utf-8")
        # Imported here: tensorboardX imports torch where it is installed (~1.5 s), which jobs
        # that write no metrics (generate, export_hf, serve, ...) should not pay at start.
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(run.tensorboard))
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                              disable=not progress_bar)

    def _write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key not in ("step", "time", "split") and value is not None and math.isfinite(value):
                self._tb.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def train(self, step: int, metrics: dict[str, float]) -> None:
        """Records the metrics of the step that ended at `step`."""
        record = {"step": step, "time": time.time(), "split": "train", **metrics,
                  "perplexity": perplexity(metrics["loss"])}
        self._write(record)
        self._bar.n = step
        self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics.get('tokens_per_sec', 0):,.0f}",
                              mfu=f"{metrics.get('mfu', float('nan')):.1%}{self._mfu_of}", refresh=False)
        self._bar.refresh()

    def eval(self, step: int, loss: float, **extra: float | None) -> None:
        """Records an eval loss at `step`, with `extra` figures (e.g. bits_per_byte) after it."""
        self._write({"step": step, "time": time.time(), "split": "eval", "loss": loss,
                     "perplexity": perplexity(loss), **extra})
        self._bar.write(f"step {step}: eval loss {loss:.4f}, perplexity {perplexity(loss):.2f}")

    def downstream(self, step: int, metrics: dict[str, float]) -> None:
        """Records lm-eval task metrics {"<task>/<metric>": value} at `step` (TensorBoard:
        downstream/<task>/<metric>)."""
        self._write({"step": step, "time": time.time(), "split": "downstream", **metrics})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self._bar.write(f"step {step}: {shown}")

    def close(self) -> None:
        self._bar.close()
        self._tb.close()
        self._jsonl.close()


# ---------------------------------------------------------------------------------------------
# The status heartbeat: status.json


class Heartbeat:
    """Writes {"status", "step", "total_steps", "model", "started", "updated", "pid", "host"}."""

    def __init__(self, run_dir: str | Path, total_steps: int, model: str, interval_s: float = 5.0):
        self.path = RunDir(run_dir).status
        self.interval_s = interval_s
        self.record = {"status": "running", "step": 0, "total_steps": total_steps, "model": model,
                       "started": time.time(), "updated": 0.0, "pid": os.getpid(),
                       "host": socket.gethostname()}

    def beat(self, step: int, status: str = "running", force: bool = False) -> None:
        """Records `step`; writes at most every `interval_s` unless `force` or the status changes."""
        now = time.time()
        changed = status != self.record["status"]
        self.record.update(step=step, status=status)
        if force or changed or now - self.record["updated"] >= self.interval_s:
            self.record["updated"] = now
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self.record))


# ---------------------------------------------------------------------------------------------
# MFU: model FLOP/s over the hardware's peak


PEAK_CACHE_DIR = "peak_flops"
# Timed matmuls per size in the cached CPU measurement: the best of them is the peak.
CPU_REPEATS = 5

# Dense bf16 tensor-core FLOP/s per device, from the vendors' datasheets (no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 80GB HBM3": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


def lookup_peak(device_kind: str, table: dict[str, float]) -> float | None:
    """The table entry whose key is the longest substring of `device_kind` (e.g. 'NVIDIA H100 PCIe')."""
    matches = [k for k in table if k.lower() in device_kind.lower()]
    return table[max(matches, key=len)] if matches else None


def measured_matmul_flops(dtype: str = "float32", sizes: tuple[int, ...] = (512, 1024, 2048),
                          repeats: int = 3) -> float:
    """Best FLOP/s of an [n, n] @ [n, n] matmul on the default device over `sizes`."""
    best = 0.0
    for n in sizes:
        a = jnp.ones((n, n), dtype)
        matmul = jax.jit(lambda x, y: x @ y)
        matmul(a, a).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, a).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


@dataclasses.dataclass(frozen=True)
class Peak:
    """The FLOP/s that MFU divides by (all devices together) and where that figure comes from."""

    flops: float
    source: str  # "measured", "datasheet", "set in gin" or "unknown"

    def __str__(self) -> str:
        return f"{format_flops(self.flops)} {self.source}"


def format_flops(flops: float) -> str:
    """'270 GFLOP/s', '7.9 PFLOP/s': three significant digits at most."""
    if not flops > 0:
        return "? FLOP/s"
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if flops >= scale:
            return f"{flops / scale:.3g} {prefix}FLOP/s"
    return f"{flops:.3g} FLOP/s"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_key(dtype: str, sizes: tuple[int, ...]) -> dict[str, object]:
    """What a cached CPU peak is valid for: this CPU, cores, JAX, device count, dtype, sizes."""
    return {"cpu": _cpu_model(), "cores": _cores(), "jax": jax.__version__,
            "devices": jax.device_count(), "dtype": dtype, "sizes": list(sizes)}


def peak_cache_path(key: dict[str, object], root: Path) -> Path:
    """The cache file of the CPU peak measured for `key`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / PEAK_CACHE_DIR / f"{digest}.json"


def cpu_peak_flops(dtype: str, sizes: tuple[int, ...], remeasure: bool = False,
                   root: Path | None = None) -> float:
    """This machine's matmul peak: the best of its cached measurements; measured when none or asked.

    Each measurement is the best of CPU_REPEATS timed matmuls per size. A measurement taken under
    load comes out low and one taken quiet cannot come out above the hardware's peak, so the
    best of all is the figure; `remeasure` adds one (delete the file to start over).
    """
    key = machine_key(dtype, sizes)
    path = peak_cache_path(key, local_cache_dir() if root is None else root)
    measurements = _cached_measurements(path, key)
    if measurements and not remeasure:
        return max(m["flops"] for m in measurements)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    flops = measured_matmul_flops(dtype, sizes, CPU_REPEATS)
    if load > key["cores"]:
        logging.warning("CPU peak measured under load (load average %.1f on %d cores): %s may be "
                        "low, which makes MFU read high; measure again on a quiet machine with "
                        "peak_flops.remeasure=True", load, key["cores"], format_flops(flops))
    measurements.append({"flops": flops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "load_average": load})
    best = max(m["flops"] for m in measurements)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"key": key, "flops": best, "measurements": measurements}) + "\n")
    except OSError as e:
        logging.warning("could not cache the CPU peak in %s (%s); it is measured again next run", path, e)
    return best


def _cached_measurements(path: Path, key: dict[str, object]) -> list[dict[str, float]]:
    """The measurements cached in `path` for `key`; none when absent, unreadable or another key's."""
    try:
        record = json.loads(path.read_text())
        measurements = record["measurements"] if record["key"] == key else []
        return [m for m in measurements if float(m["flops"]) > 0]
    except (OSError, ValueError, KeyError, TypeError):
        return []


@gin.configurable
def peak_flops(dtype: str = "bfloat16", per_device: float | None = None,
               table: dict[str, float] | None = None, cpu_sizes: tuple[int, ...] = (512, 1024, 2048),
               remeasure: bool = False) -> Peak:
    """Peak FLOP/s of all devices together: override or table x device count; measured on CPU.

    `remeasure`: measure the CPU peak again (on a quiet machine); the best cached figure is used.
    """
    devices = jax.devices()
    if per_device is not None:
        return Peak(per_device * len(devices), "set in gin")
    if devices[0].platform == "cpu":
        return Peak(cpu_peak_flops(dtype, tuple(cpu_sizes), remeasure), "measured")
    per_device = lookup_peak(devices[0].device_kind, {**PEAK_BF16_FLOPS, **(table or {})})
    return Peak(per_device * len(devices), "datasheet") if per_device else Peak(float("nan"), "unknown")


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float) -> float:
    """Fraction of `peak` FLOP/s achieved by the model's training FLOPs, at most 1.

    Above 1 the peak is wrong (measured at a loaded moment), not the model faster than the machine.
    """
    fraction = flops_per_token * tokens_per_sec / peak
    return min(fraction, 1.0) if fraction == fraction else fraction


# ---------------------------------------------------------------------------------------------
# Profiling: a jax.profiler trace of steps N..M


@gin.configurable
class Profiler:
    """Starts a trace before step `start_step` and stops it after step `end_step` (both 1-based)."""

    def __init__(self, logdir: str | Path, start_step: int | None = None, end_step: int | None = None):
        self.logdir = str(logdir)
        self.start_step, self.end_step = start_step, end_step if end_step is not None else start_step
        self.active = False

    def before_step(self, step: int) -> None:
        if self.start_step is not None and step == self.start_step and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True
            logging.info("profiling steps %d..%d into %s", self.start_step, self.end_step, self.logdir)

    def after_step(self, step: int, sync: object = None) -> None:
        if self.active and step >= self.end_step:
            jax.block_until_ready(sync)
            jax.profiler.stop_trace()
            self.active = False

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
