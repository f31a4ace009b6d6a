"""Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak.

On accelerators the peak is the datasheet's dense bf16 FLOP/s per device, looked up by
`device_kind` (override in gin: `peak_flops.per_device = 989e12` or extend `peak_flops.table`).
On CPU there is no datasheet figure worth trusting, so the peak is measured: the best dense
matmul FLOP/s XLA reaches on this machine (benchmarks/peak.py prints it). The CPU figure is
for the whole machine, however many fake devices XLA_FLAGS splits it into.
"""

from __future__ import annotations

import functools
import time

import gin
import jax
import jax.numpy as jnp

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


@functools.cache
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


@gin.configurable
def peak_flops(dtype: str = "bfloat16", per_device: float | None = None,
               table: dict[str, float] | None = None, cpu_sizes: tuple[int, ...] = (512, 1024)) -> float:
    """Peak FLOP/s of all devices together: table or override x device count; measured on CPU."""
    devices = jax.devices()
    if per_device is None and devices[0].platform == "cpu":
        return measured_matmul_flops(dtype, tuple(cpu_sizes))
    per_device = per_device or lookup_peak(devices[0].device_kind, {**PEAK_BF16_FLOPS, **(table or {})})
    return per_device * len(devices) if per_device else float("nan")


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float) -> float:
    """Fraction of `peak` FLOP/s achieved by the model's training FLOPs."""
    return flops_per_token * tokens_per_sec / peak
