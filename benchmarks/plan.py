"""Pod plans: the train step of Llama 3.1 presets compiled ahead of time for TPU v5p topologies on
this host (libtpu), one JSON line per plan: per-device bytes, fits, FLOPs per step, predicted
step time, and this host's compile wall time; with --search, the fit search's choice.

    python benchmarks/plan.py                      # 8B on v5p-8, 70B on v5p-64, 405B on v5p-512
    python benchmarks/plan.py --only 8b --search   # and the fastest-predicted setting that fits
    python benchmarks/plan.py --only 8b --search_only --search_tensor 1 --search_max_compiles 3
    python benchmarks/plan.py --quick              # the tiny model on v5p-8 (tests run this)

Every plan: FSDP over all chips (gin/train/parallel/fsdp.gin), bf16 compute with f32 params
and AdamW state, seq 8192, `--per_device_batch` rows per chip, the layers scanned, remat
`--remat`. It runs the `plan` job's own functions (llamahome/train/plan.py), as `python -m
llamahome.launch ... --gin_file=gin/jobs/plan.gin` would.
"""

from __future__ import annotations

from llamahome import launch

if __name__ == "__main__":
    launch.reexec_under_allocator()

import argparse
import json
import os
import platform
import resource
import time

import gin

from llamahome.config import gin_config
from llamahome.model.llama import LlamaConfig
from llamahome.parallel.mesh import axis_rules, build_mesh
from llamahome.plan.topology import compile_devices, libtpu_problem, parse_topology
from llamahome.train import plan as plan_lib
from llamahome.train.optim import build_optimizer
from llamahome.train.plan import TrainSettings, plan_train_step

# (name, model preset, topology): the three, where MaxText publishes v5p figures.
CASES = {"8b": ("llama3_1_8b", "v5p-8"), "70b": ("llama3_1_70b", "v5p-64"),
         "405b": ("llama3_1_405b", "v5p-512"), "tiny": ("tiny", "v5p-8")}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return next(names)
    except (OSError, StopIteration):
        return platform.processor()


def plan_case(name: str, args: argparse.Namespace) -> dict:
    preset, topology_name = CASES[name]
    topology = parse_topology(topology_name)
    seq = 64 if name == "tiny" else args.seq
    gin.clear_config()
    gin_config.parse_config([f"models/{preset}.gin", "train/parallel/fsdp.gin"], gin_params=[
        "LlamaConfig.dtype='bfloat16'", "LlamaConfig.scan_layers=True",
        f"LlamaConfig.remat_policy='{args.remat}'", f"LlamaConfig.max_seq_len={max(seq, 256)}"])
    config = LlamaConfig()
    settings = TrainSettings(batch_size=args.per_device_batch * topology.num_chips, seq_len=seq)
    devices = compile_devices(topology)
    mesh = build_mesh(devices=devices)
    if args.search_only:
        return search_line(preset, topology, config, settings, devices, args)
    start = time.perf_counter()
    plan = plan_train_step(config, settings, mesh, axis_rules(), build_optimizer, topology.chip,
                           args.mfu)
    memory, flops, predicted = plan["memory"], plan["flops"], plan["predicted"]
    line = {"benchmark": "plan", "model": preset, "topology": topology_name,
            "chips": topology.num_chips, "mesh": dict(mesh.shape), "batch": settings.batch_size,
            "seq": seq, "remat": args.remat, "bytes_per_device": memory["total_bytes"],
            "argument_bytes": memory["argument_bytes"], "temp_bytes": memory["temp_bytes"],
            "hbm_bytes": memory["hbm_bytes"], "fits": memory["fits"],
            "flops_per_step": flops["per_step"], "model_flops_per_step": flops["model_per_step"],
            "xla_flops_per_device": flops["xla_flops_per_device"],
            "predicted_step_time_s": predicted["step_time_s"], "mfu_assumed": args.mfu,
            "predicted_model_mfu": predicted["model_mfu"],
            "tokens_per_s_per_chip": predicted["tokens_per_s_per_chip"],
            "compile_s": plan["compile_s"], "wall_s": time.perf_counter() - start,
            "host_cpu": cpu_model(), "host_cores": os.cpu_count(),
            "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    if args.search:
        found = search_line(preset, topology, config, settings, devices, args)
        line.update({k: v for k, v in found.items() if k.startswith("search")})
    return line


def search_line(preset: str, topology, config: LlamaConfig, settings: TrainSettings,
                devices: list, args: argparse.Namespace) -> dict:
    """The fit search's tries and choice for one case (plan.search=True's)."""
    start = time.perf_counter()
    tensors = [int(t) for t in args.search_tensor.split(",")] if args.search_tensor else None
    found = plan_lib.search(config, settings, topology, devices, build_optimizer, args.mfu,
                            args.search_remat.split(","), args.search_max_accum,
                            args.search_max_compiles, tensors)
    return {"benchmark": "plan_search", "model": preset, "topology": topology.name,
            "batch": settings.batch_size, "seq": settings.seq_len,
            "search_tried": found["tried"], "search_choice": found["choice"],
            "search_gin": found["gin"], "search_compiles": found["compiles"],
            "search_wall_s": time.perf_counter() - start, "host_cpu": cpu_model()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="8b,70b,405b", help="comma-separated: 8b, 70b, 405b")
    parser.add_argument("--quick", action="store_true", help="the tiny model on v5p-8 only")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--per_device_batch", type=int, default=1)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--mfu", type=float, default=0.5)
    parser.add_argument("--search", action="store_true")
    parser.add_argument("--search_remat", default="none,save_dots,full")
    parser.add_argument("--search_max_accum", type=int, default=1)
    parser.add_argument("--search_max_compiles", type=int, default=6)
    parser.add_argument("--search_tensor", default="", help="tensor sizes to try, e.g. 1,2")
    parser.add_argument("--search_only", action="store_true", help="the search, not the plan")
    args = parser.parse_args()
    if libtpu_problem():
        raise SystemExit(f"error: {libtpu_problem()}")
    for name in ["tiny"] if args.quick else args.only.split(","):
        print(json.dumps(plan_case(name, args)), flush=True)


if __name__ == "__main__":
    main()
