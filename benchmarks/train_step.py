"""Train-step throughput: one JSON line per (config, dtype) with tokens/s, step time, MFU, memory.

    python benchmarks/train_step.py                       # d256x4 and d512x8, f32 and bf16
    python benchmarks/train_step.py --config d512x8 --dtype bfloat16
    python benchmarks/train_step.py --preset llama3_2_1b --seq 2048 --batch 4 --dtype bfloat16
    python benchmarks/train_step.py --config moe_d256x4 --dtype float32   # Mixtral-shaped MoE

The step is the train job's (AdamW, global-norm clipping, f32 loss), compiled once over all
devices with the FSDP rules. Times are the median of `--steps` steps after `--warmup`. MFU is
against the measured matmul peak on CPU (benchmarks/peak.py) and the datasheet peak elsewhere.
A mixture of experts (`moe_*`, or a preset with num_experts) counts FLOPs on its active
parameters (the top-k experts per token) and also reports its router's load-balancing loss
(unweighted: k for a perfectly balanced router) and the fraction of token-to-expert
assignments dropped over capacity, measured by a forward pass of the final params on the
benchmark batch. `--expert_capacity c` sets LlamaConfig.expert_capacity (each expert takes at
most c * k * T / E tokens of a sequence); without it the dispatch is dense and dropless
(all E experts compute every token, E / k times the active FLOPs).
"""

from __future__ import annotations

from llamahome import launch

if __name__ == "__main__":
    launch.reexec_under_allocator()  # mimalloc (from pip), tcmalloc or jemalloc, before JAX or torch load

import argparse
import json
import resource
import statistics
import time

import jax
import numpy as np

from llamahome.config import gin_config
from llamahome.model.llama import MOE_STATS, Llama, LlamaConfig, param_logical_axes, param_shapes
from llamahome.model.llama import init_params as model_init_params
from llamahome.monitor import measured_matmul_flops, peak_flops
from llamahome.parallel.mesh import axis_rules, batch_sharding, build_mesh, global_batch, init_sharded
from llamahome.train import optim, step as step_lib
from llamahome.train.step import init_train_state

# Benchmark shapes, named d<hidden>x<layers>. They are not gin/models presets (gin/models/small.gin
# is 8 heads, MLP 704); before issue 16 these two were called "small" and "medium".
CONFIGS = {
    "d256x4": dict(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                   intermediate_size=688, seq=256, batch=8),
    "d512x8": dict(vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                   intermediate_size=1376, seq=512, batch=4),
    # d256x4's shape with Mixtral's MLP: 8 SwiGLU experts of d256x4's MLP size, top 2.
    "moe_d256x4": dict(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=4,
                       num_kv_heads=2, intermediate_size=688, num_experts=8,
                       num_experts_per_token=2, router_aux_loss_coef=0.02, seq=256, batch=8),
}
RENAMED = {"small": "d256x4", "medium": "d512x8"}


def config_name(name: str) -> str:
    """argparse type of --config: an old name fails with one line naming the new one."""
    if name in RENAMED:
        raise argparse.ArgumentTypeError(f"config {name!r} was renamed {RENAMED[name]!r}")
    return name


def named_config(name: str, dtype: str = "float32") -> tuple[LlamaConfig, int, int]:
    """(LlamaConfig, seq, batch) of a benchmark config in CONFIGS."""
    c = dict(CONFIGS[name])
    seq, batch = c.pop("seq"), c.pop("batch")
    return LlamaConfig(name=name, max_seq_len=seq, dtype=dtype, **c), seq, batch


def peak_memory_bytes() -> int:
    device = jax.devices()[0]
    if device.platform != "cpu" and device.memory_stats():
        return int(device.memory_stats().get("peak_bytes_in_use", 0))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(config: LlamaConfig, seq: int, batch: int, preset: str = "fsdp",
          loss_chunk_length: int = 0):
    """(compiled train step, initial state, one batch, compile seconds): the train job's step."""
    mesh, rules = build_mesh(), axis_rules(preset)
    specs = param_logical_axes(config)
    optimizer, schedule = optim.build_optimizer(1e-4, 1000, decay_mask=optim.decay_mask(specs),
                                                schedule=optim.constant)
    abstract, shardings = step_lib.state_shardings(param_shapes(config), specs, optimizer, mesh, rules)
    state = init_sharded(lambda k: init_train_state(model_init_params(config, k), optimizer, 0),
                                  shardings, jax.random.key(0))
    batch_layout = batch_sharding(mesh, rules)
    apply_fn = step_lib.hidden_apply_fn(Llama(config))  # the train job's (+ router loss)
    start = time.perf_counter()
    step = step_lib.compile_train_step(abstract, shardings, step_lib.abstract_batch(batch, seq, batch_layout),
                                   mesh, rules, apply_fn=apply_fn, optimizer=optimizer, schedule=schedule,
                                   loss_chunk_length=loss_chunk_length)
    compile_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, seq + 1), dtype=np.int32)
    data = global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                  "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
                                  "segment_ids": np.ones((batch, seq), np.int32),
                                  "loss_mask": np.ones((batch, seq), np.float32)}, batch_layout)
    return step, state, data, compile_s


def bench(config: LlamaConfig, seq: int, batch: int, steps: int, warmup: int, preset: str,
          loss_chunk_length: int = 0) -> dict:
    step, state, data, compile_s = build(config, seq, batch, preset, loss_chunk_length)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)
    tokens_per_sec = batch * seq / step_time
    peak = (measured_matmul_flops(config.dtype, (1024, 2048, 3072), 5)
            if jax.devices()[0].platform == "cpu" else peak_flops(config.dtype).flops)
    return {"step_time_s": step_time, "tokens_per_sec": tokens_per_sec,
            "mfu": config.flops_per_token(seq) * tokens_per_sec / peak, "peak_flops": peak,
            "flops_per_token": config.flops_per_token(seq), "compile_s": compile_s,
            "peak_memory_bytes": peak_memory_bytes(), "loss": float(metrics["loss"]),
            "temp_bytes": step.memory_analysis().temp_size_in_bytes,
            "step_times_s": times, **_moe_figures(config, state.params, data, metrics)}


def _moe_figures(config: LlamaConfig, params, data: dict, metrics: dict) -> dict:
    """A mixture of experts' router figures (see the module doc); {} for a dense model."""
    if not config.num_experts:
        return {}
    _, sown = jax.jit(lambda p: Llama(config).apply(
        {"params": p}, data["inputs"], data["positions"], data["segment_ids"],
        return_hidden=True, mutable=[MOE_STATS]))(params)
    dropped = float(sum(jax.tree.leaves(sown[MOE_STATS])))
    return {"num_experts": config.num_experts, "experts_per_token": config.num_experts_per_token,
            "expert_capacity": config.expert_capacity,
            "active_params": config.num_matmul_params(), "total_params": config.num_params(),
            "router_aux_loss": float(metrics["router_aux_loss"]) / config.router_aux_loss_coef,
            "dropped_token_fraction": dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="all", type=config_name, choices=["all", *CONFIGS])
    parser.add_argument("--dtype", default="all", choices=["all", "float32", "bfloat16"])
    parser.add_argument("--preset", help="a gin/models/<preset>.gin instead of --config")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--attention", default=None, help="attention_impl (xla | dot_product)")
    parser.add_argument("--scan_layers", type=int, default=0)
    parser.add_argument("--rules", default="fsdp", help="axis_rules preset")
    parser.add_argument("--expert_capacity", type=float, default=None,
                        help="a mixture of experts' capacity factor (default: dropless)")
    parser.add_argument("--loss_chunk_length", type=int, default=0,
                        help="positions per block of the fused head + loss (0: whole sequence)")
    args = parser.parse_args()

    dtypes = ["float32", "bfloat16"] if args.dtype == "all" else [args.dtype]
    runs = []
    if args.preset:
        gin_config.parse_config([f"models/{args.preset}.gin"])
        runs = [(args.preset, LlamaConfig(), args.seq or 2048, args.batch or 4)]
    else:
        dense = [n for n in CONFIGS if not n.startswith("moe_")]  # "all": the dense ones
        for name in dense if args.config == "all" else [args.config]:
            config, seq, batch = named_config(name)
            runs.append((name, config, args.seq or seq, args.batch or batch))
    for name, base, seq, batch in runs:
        for dtype in dtypes:
            overrides = dict(dtype=dtype, remat_policy=args.remat, scan_layers=bool(args.scan_layers),
                             max_seq_len=max(seq, base.max_seq_len))
            if args.attention:
                overrides["attention_impl"] = args.attention
            if args.expert_capacity:
                overrides["expert_capacity"] = args.expert_capacity
            config = base.replace(**overrides)
            result = bench(config, seq, batch, args.steps, args.warmup, args.rules,
                           args.loss_chunk_length)
            print(json.dumps({"benchmark": "train_step", "config": name, "dtype": dtype, "seq": seq,
                              "batch": batch, "params": config.num_params(),
                              "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
                              "attention": config.attention_impl, "remat": config.remat_policy,
                              "allocator": launch.allocator_name(),
                              "loss_chunk_length": args.loss_chunk_length,
                              **result}), flush=True)


if __name__ == "__main__":
    main()
