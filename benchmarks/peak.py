"""The machine's dense matmul peak in XLA, the denominator of MFU on CPU. Prints one JSON line.

    python benchmarks/peak.py [--sizes 512,1024,2048,4096]

On a GPU/TPU it also prints the datasheet bf16 peak for the device kind (llamahome/monitor.py).
"""

from __future__ import annotations

from llamahome import launch

if __name__ == "__main__":
    launch.reexec_under_allocator()  # mimalloc (from pip), tcmalloc or jemalloc, before JAX or torch load

import argparse
import json

import jax

from llamahome.monitor import PEAK_BF16_FLOPS, lookup_peak, measured_matmul_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="512,1024,2048,3072")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    device = jax.devices()[0]
    print(json.dumps({
        "benchmark": "peak", "allocator": launch.allocator_name(), "platform": device.platform, "device_kind": device.device_kind,
        "devices": jax.device_count(), "sizes": sizes,
        "measured_f32_flops": measured_matmul_flops("float32", sizes, args.repeats),
        "measured_bf16_flops": measured_matmul_flops("bfloat16", sizes, args.repeats),
        "datasheet_bf16_flops_per_device": lookup_peak(device.device_kind, PEAK_BF16_FLOPS),
    }))


if __name__ == "__main__":
    main()
