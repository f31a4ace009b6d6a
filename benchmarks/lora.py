"""LoRA against a full fine-tune: the bytes of what each trains and holds, and step throughput.
One JSON line per (model, variant); variants: full (every weight trained, AdamW), lora (rank 16
on every decoder projection, gin/train/lora.gin), lora_int8 and lora_nf4 (the same adapters on
a base quantized by llamahome/model/quant.py).

    python benchmarks/lora.py                      # d512x8 measured, then llama3_2_1b and llama3_1_8b
    python benchmarks/lora.py --quick              # a smoke test: the tiny preset, full and lora_nf4 timed,
                                                   # lora_nf4 analysed

- `d512x8` (benchmarks/train_step.py's config) is built and timed: all variants compiled in one
  process, then stepped in turn for `--rounds` rounds; step times are medians.
- The gin presets are compiled from shapes alone (`jax.ShapeDtypeStruct`s, nothing allocated):
  bf16 compute, rematerialised scanned layers, a full fine-tune's params in f32, a LoRA base held
  in bf16 (or int8 / NF4) and adapters in f32. Bytes come from the compiled step's
  `memory_analysis()`: arguments (state + frozen base + batch) + temporaries.

Fields: `trainable_state_bytes` = trained params + their gradients + optimizer state (from
shapes); `trainable_state_ratio` = that / the full fine-tune's; `base_bytes` = the frozen base
as held; `speedup` = full step time / this variant's.
"""

from __future__ import annotations

from llamahome import launch

if __name__ == "__main__":
    launch.reexec_under_allocator()  # mimalloc (from pip), tcmalloc or jemalloc, before JAX loads

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from train_step import named_config  # noqa: E402

from llamahome.config import gin_config  # noqa: E402
from llamahome.model import quant  # noqa: E402
from llamahome.model.llama import (  # noqa: E402
    Llama, LlamaConfig, adapter_logical_axes, adapter_shapes, init_adapters, init_params,
    param_logical_axes, param_shapes,
)
from llamahome.model.lora import LoraConfig  # noqa: E402
from llamahome.parallel.mesh import (  # noqa: E402
    axis_rules, batch_sharding, build_mesh, global_batch, logical_shardings,
)
from llamahome.train import frozen, optim, step as step_lib  # noqa: E402
from llamahome.train.checkpoint import abstract_like  # noqa: E402
from llamahome.train.step import init_train_state  # noqa: E402

LORA = LoraConfig(rank=16, alpha=32.0, dropout=0.05)  # gin/train/lora.gin
VARIANTS = {"full": None, "lora": None, "lora_int8": "int8", "lora_nf4": "nf4"}


@dataclasses.dataclass
class Setup:
    """One variant's compiled step, its arguments (arrays, or shapes when abstract) and sizes."""

    step: Any
    state: Any
    base: Any
    trainable_state_bytes: int
    base_bytes: int
    compile_s: float


def _bytes(tree: Any) -> int:
    return quant.nbytes(tree)


def setup(config: LlamaConfig, variant: str, seq: int, batch: int, abstract: bool,
          base_dtype: str | None = None, compile: bool = True) -> Setup:
    """Builds `variant` of the train job's step for `config` on all devices (FSDP rules);
    `compile=False`: only its sizes (step None)."""
    mesh, rules = build_mesh(), axis_rules("fsdp")
    lora = None if variant == "full" else LORA
    specs, base_specs = param_logical_axes(config), param_logical_axes(config)
    shapes, init = param_shapes(config), functools.partial(init_params, config)
    if lora is not None:
        specs, shapes = adapter_logical_axes(config, lora), adapter_shapes(config, lora)
        init = functools.partial(init_adapters, config, lora)
    tx, schedule = optim.build_optimizer(1e-4, 1000, decay_mask=optim.decay_mask(specs),
                                         schedule=optim.constant)
    abstract_state, shardings = step_lib.state_shardings(shapes, specs, tx, mesh, rules)
    base_shardings = logical_shardings(base_specs, mesh, rules)
    hold = functools.partial(frozen.hold, specs=base_specs, mesh=mesh, rules=rules,
                             fmt=VARIANTS[variant], dtype=base_dtype)
    if abstract:
        state = abstract_like(abstract_state, shardings)
        base = None if lora is None else jax.eval_shape(hold, param_shapes(config))
    else:
        state = jax.jit(lambda k: init_train_state(init(k), tx, 0), out_shardings=shardings)(
            jax.random.key(0))
        base = None if lora is None else hold(jax.jit(
            functools.partial(init_params, config), out_shardings=base_shardings)(jax.random.key(1)))
    abstract_base = None if base is None else abstract_like(
        base, step_lib.frozen_shardings(base, base_specs, mesh, rules))
    apply_fn = (step_lib.hidden_apply_fn(Llama(config)) if lora is None
                else step_lib.lora_apply_fn(Llama(config, lora)))
    start, step = time.perf_counter(), None
    if compile:
        step = step_lib.compile_train_step(
            abstract_state, shardings, step_lib.abstract_batch(batch, seq, batch_sharding(mesh, rules)),
            mesh, rules, abstract_base, apply_fn=apply_fn, optimizer=tx, schedule=schedule)
    compile_s = time.perf_counter() - start
    trainable = _bytes(abstract_state.params)
    state_bytes = 2 * trainable + _bytes(abstract_state.opt_state)  # params + grads + optimizer
    return Setup(step, state, base, state_bytes, 0 if base is None else _bytes(base), compile_s)


def random_batch(config: LlamaConfig, seq: int, batch: int) -> dict:
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1), dtype=np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
             "segment_ids": np.ones((batch, seq), np.int32), "loss_mask": np.ones((batch, seq), np.float32)}
    return global_batch(local, batch_sharding(build_mesh(), axis_rules("fsdp")))


def measure(name: str, config: LlamaConfig, seq: int, batch: int, rounds: int, warmup: int,
            variants: list[str]) -> list[dict]:
    """All variants built, then stepped in turn (side by side); median step times."""
    setups = {v: setup(config, v, seq, batch, abstract=False) for v in variants}
    data, times = random_batch(config, seq, batch), {v: [] for v in variants}
    losses = {}
    for i in range(warmup + rounds):
        for variant, s in setups.items():
            args = (s.state, data) if s.base is None else (s.state, data, s.base)
            t0 = time.perf_counter()
            s.state, metrics = s.step(*args)
            losses[variant] = float(metrics["loss"])  # blocks until the step is done
            if i >= warmup:
                times[variant].append(time.perf_counter() - t0)
    full_time = statistics.median(times["full"])
    lines = []
    for variant, s in setups.items():
        step_time = statistics.median(times[variant])
        lines.append(_line(name, variant, config, seq, batch, s, setups["full"], measured=True,
                           step_time_s=step_time, tokens_per_sec=batch * seq / step_time,
                           speedup=full_time / step_time, step_times_s=times[variant],
                           loss=losses[variant]))
    return lines


def analyse(name: str, config: LlamaConfig, seq: int, batch: int, variants: list[str]) -> list[dict]:
    """The compiled steps' memory from shapes alone: nothing is allocated. The full fine-tune's
    sizes (the ratio's denominator) are taken even where `variants` leaves it out."""
    config = config.replace(dtype="bfloat16", param_dtype="float32", remat_policy="full",
                            scan_layers=True, max_seq_len=max(seq, config.max_seq_len))
    setups = {v: setup(config, v, seq, batch, abstract=True, compile=v in variants,
                       base_dtype=None if v == "full" else "bfloat16")
              for v in dict.fromkeys(["full", *variants])}
    lines = []
    for variant in variants:
        s = setups[variant]
        memory = s.step.memory_analysis()
        arguments, temp = memory.argument_size_in_bytes, memory.temp_size_in_bytes
        lines.append(_line(name, variant, config, seq, batch, s, setups["full"], measured=False,
                           argument_bytes=arguments, temp_bytes=temp,
                           step_bytes=arguments + temp + memory.output_size_in_bytes
                           - memory.alias_size_in_bytes))
    return lines


def _line(name: str, variant: str, config: LlamaConfig, seq: int, batch: int, s: Setup,
          full: Setup, **figures: Any) -> dict:
    return {"benchmark": "lora", "config": name, "variant": variant, "dtype": config.dtype,
            "seq": seq, "batch": batch, "params": config.num_params(),
            "rank": None if variant == "full" else LORA.rank,
            "dropout": None if variant == "full" else LORA.dropout,
            "trainable_state_bytes": s.trainable_state_bytes,
            "trainable_state_ratio": s.trainable_state_bytes / full.trainable_state_bytes,
            "base_bytes": s.base_bytes, "compile_s": s.compile_s,
            "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "allocator": launch.allocator_name(), **figures}


def main() -> None:
    global LORA  # --dropout
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="d512x8", help="benchmarks/train_step.py config to time")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--presets", default="llama3_2_1b,llama3_1_8b",
                        help="gin/models presets to analyse from shapes ('' for none)")
    parser.add_argument("--preset_seq", type=int, default=2048)
    parser.add_argument("--preset_batch", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="full must be among them")
    parser.add_argument("--dropout", type=float, default=LORA.dropout, help="LoraConfig.dropout")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: the tiny preset, full and lora_nf4 timed, lora_nf4 analysed")
    args = parser.parse_args()
    variants = args.variants.split(",")
    LORA = dataclasses.replace(LORA, dropout=args.dropout)
    if args.quick:
        args.rounds, args.presets, args.preset_seq, variants = 1, "", 32, ["full", "lora_nf4"]
        config, seq, batch = LlamaConfig(dtype=args.dtype), 32, 2
        lines = [*measure("tiny", config, seq, batch, 1, 1, variants),
                 *analyse("tiny", config, seq, batch, ["lora_nf4"])]
    else:
        config, seq, batch = named_config(args.config, args.dtype)
        lines = measure(args.config, config, seq, batch, args.rounds, args.warmup, variants)
    for line in lines:
        print(json.dumps(line), flush=True)
    for preset in filter(None, args.presets.split(",")):
        with gin.unlock_config():
            gin.clear_config()
            gin_config.parse_config([f"models/{preset}.gin"])
        for line in analyse(preset, LlamaConfig(), args.preset_seq, args.preset_batch, variants):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
