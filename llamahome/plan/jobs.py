"""The `plan` job: a training run's gin, compiled ahead of time for a TPU topology on this host.

    python -m llamahome.launch --gin_file=gin/models/llama3_1_8b.gin \\
        --gin_file=gin/train/parallel/fsdp.gin --gin_file=gin/jobs/plan.gin \\
        --gin_param="plan.topology='v5p-8'" --gin_param="train.seq_len=8192"

It reads the same settings a `train` run would (LlamaConfig.* incl. dtype, remat_policy and
scan_layers; build_mesh.*; axis_rules.*; train.batch_size, seq_len,
gradient_accumulation_steps, z_loss, loss_chunk_length; build_optimizer.*), asks libtpu for the
topology's devices (llamahome/plan/topology.py: names, chips, HBM), compiles the real train step
for them with abstract inputs (llamahome/train/plan.py), and prints and writes
`<run_dir>/plan.json`:

    topology      name, chip, grid, slices, chips, HBM and peak FLOP/s per chip
    model, train  the LlamaConfig and train settings planned; mesh: its axis sizes; rules
    train_step    memory: argument/output/alias/temp/total bytes per device, hbm_bytes, fits,
                  headroom_bytes; flops: per_step and per_device (the step's matmuls, loops
                  expanded), model_per_step (6N + attention), xla_flops_per_device (XLA's
                  count, each loop body once); predicted: step_time_s at mfu_assumed,
                  model_mfu, tokens_per_s_per_chip; compile_s (this host's wall time);
                  shardings: every parameter and optimizer-state leaf (plan/shardings.py);
                  or, when the TPU compiler refuses the step for its HBM, its line
                  (memory.compiler_out_of_memory)
    decode_step   the same for serve/generate's decode step (`plan.decode=True`): decode_batch
                  slots of decode_len tokens (default: the mesh's batch shards, train.seq_len)
    search        with `plan.search=True` (llamahome/train/plan.py): what was tried, the
                  fastest-predicted configuration that fits, and its gin lines

Errors exit 2 with one line: an unknown topology, a mesh that does not multiply to its chip
count, a model whose parameters and optimizer state overflow the HBM at any sharding, and a
plan that does not fit (after plan.json is written; `plan.search=True` looks for one that does).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llamahome.errors import ConfigError
from llamahome.files import RunDir, write_text_atomic
from llamahome.infer import engine
from llamahome.jobs import job
from llamahome.model.llama import LlamaConfig, param_logical_axes, param_shapes, unstack_layers
from llamahome.parallel.mesh import Rules, axis_rules, build_mesh, logical_shardings
from llamahome.plan.shardings import format_table, state_bytes_per_device
from llamahome.plan.topology import GiB, Chip, Topology, compile_devices, parse_topology
from llamahome.train import plan as plan_lib
from llamahome.train.optim import build_optimizer
from llamahome.train.plan import TrainSettings, plan_train_step, state_layout

@job
def plan(run_dir: str, *, topology: str = gin.REQUIRED, mfu: float = 0.5, search: bool = False,
         decode: bool = True, decode_batch: int | None = None, decode_len: int | None = None,
         search_remat: Sequence[str] = plan_lib.REMAT_ORDER, search_max_accum: int = 8,
         search_max_compiles: int = 24, show_shardings: bool = True,
         model: LlamaConfig | None = None, rules: Rules | None = None,
         optimizer: Callable[..., tuple] | None = None) -> dict[str, Any]:
    """Compiles the training run's step for a TPU topology and reports whether and how it fits."""
    target = parse_topology(topology)
    if not 0 < mfu <= 1:
        raise ConfigError(f"plan.mfu={mfu}: the assumed fraction of peak FLOP/s must be in (0, 1]")
    config = _model(model or LlamaConfig())
    settings, optimizer = TrainSettings.from_gin(), optimizer or build_optimizer
    devices = compile_devices(target)
    rules = rules or axis_rules()
    mesh = _mesh(target, devices)
    _check_can_fit(config, settings, target, devices, optimizer)

    result: dict[str, Any] = {
        "topology": target.describe(), "model": dataclasses.asdict(config),
        "train": dataclasses.asdict(settings), "mesh": dict(mesh.shape),
        "rules": [list(r) for r in rules]}
    result["train_step"] = _train_step(config, settings, mesh, rules, optimizer, target, mfu)
    if decode:
        shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
        result["decode_step"] = plan_decode_step(config, mesh, rules, target.chip,
                                                 decode_batch or shards,
                                                 decode_len or settings.seq_len, mfu)
    if search:
        result["search"] = plan_lib.search(config, settings, target, devices, optimizer, mfu,
                                             search_remat, search_max_accum, search_max_compiles)
    path = RunDir(run_dir).plan
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    print(summary(result, rules, show_shardings) + f"\nwritten: {path}", flush=True)
    _raise_unless_fits(result, target)
    return result


def _model(config: LlamaConfig) -> LlamaConfig:
    if config.vocab_size is None:
        raise ConfigError("LlamaConfig.vocab_size is None (a training run sizes it from its "
                          "tokenizer): bind it for a plan, e.g. --gin_param='LlamaConfig."
                          "vocab_size=128256'")
    return config


def _mesh(target: Topology, devices: list) -> Mesh:
    try:
        return build_mesh(devices=devices)
    except ConfigError as e:
        reason = str(e).split("\n")[0]  # without gin's "In call to configurable" lines
        raise ConfigError(f"plan.topology={target.name!r} has {target.num_chips} chips "
                          f"({target.num_slices} slice(s) of {target.chips_per_slice}): "
                          f"{reason}") from None


def _check_can_fit(config: LlamaConfig, settings: TrainSettings, target: Topology,
                   devices: list, optimizer: Callable[..., tuple]) -> None:
    """Refuses a model whose params + optimizer state overflow the HBM even when fully sharded."""
    flat = build_mesh(data=1, fsdp=-1, tensor=1, devices=devices)
    layout = state_layout(config, settings, flat, (("embed", "fsdp"),), optimizer)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layout.abstract))
    needed = total / target.num_chips
    if needed > target.chip.hbm_bytes:
        chips = math.ceil(total / target.chip.hbm_bytes)
        raise ConfigError(
            f"model {config.name!r} cannot fit on {target.name} at any setting: its parameters and "
            f"optimizer state ({total / GiB:.0f} GiB, {config.param_dtype} params) need "
            f"{needed / GiB:.1f} GiB per chip even sharded over all {target.num_chips} chips, over "
            f"the {target.chip.hbm_bytes / GiB:.0f} GiB of HBM; use a topology of more than "
            f"{chips} {target.chip.name} chips")


def _train_step(config: LlamaConfig, settings: TrainSettings, mesh: Mesh, rules: Rules,
                optimizer: Callable[..., tuple], target: Topology, mfu: float) -> dict[str, Any]:
    """The train step's plan, or (when params + optimizer state alone overflow the HBM on this
    mesh) the reason it was not compiled."""
    layout = state_layout(config, settings, mesh, rules, optimizer)
    table = layout.table()
    needed = state_bytes_per_device(table)
    if needed > target.chip.hbm_bytes:
        return {"memory": {"fits": False, "state_bytes": needed,
                           "hbm_bytes": target.chip.hbm_bytes},
                "not_compiled": f"parameters and optimizer state alone need {needed / GiB:.1f} GiB "
                                f"per device on mesh {dict(mesh.shape)}",
                "shardings": table}
    return plan_train_step(config, settings, mesh, rules, optimizer, target.chip, mfu)


# --- The decode step ---

def _per_layer_specs(specs: dict, num_layers: int) -> dict:
    """Logical axes of `unstack_layers(params)`: each layer's, without the leading `layers`."""
    layer = jax.tree.map(lambda s: PartitionSpec(*s[1:]), specs["layers"],
                         is_leaf=lambda x: isinstance(x, PartitionSpec))
    return {**specs, "layers": (layer,) * num_layers}


def plan_decode_step(config: LlamaConfig, mesh: Mesh, rules: Rules, chip: Chip, batch: int,
                     max_len: int, mfu: float) -> dict[str, Any]:
    """The serving engine's decode step (one token for `batch` slots of `max_len`) compiled for
    `mesh`, its parameters laid out as `serve` and `generate` lay them out."""
    shards = engine.batch_shards(mesh, rules)
    if batch % shards:
        raise ConfigError(f"plan.decode_batch={batch} is not a multiple of the {shards} ways the "
                          f"mesh splits the batch; use {-(-batch // shards) * shards}")
    shapes = jax.eval_shape(unstack_layers, param_shapes(config))
    param_shardings = logical_shardings(
        _per_layer_specs(param_logical_axes(config), config.num_layers), mesh, rules)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, param_shardings)
    with jax.sharding.set_mesh(mesh):
        decode, kwargs, slots_shape, slot_axes = engine.abstract_decode(config, rules, batch,
                                                                        max_len)
    slots = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         slots_shape, logical_shardings(slot_axes, mesh, rules))
    rows = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))
    active = jax.ShapeDtypeStruct((batch,), np.bool_, sharding=rows)

    def compile_decode():
        with jax.sharding.set_mesh(mesh):
            return decode.lower(params, None, slots, active, **kwargs).compile()

    compiled, seconds, out_of_memory = plan_lib.compiled_or_out_of_memory(compile_decode)
    chips = mesh.devices.size
    traced = plan_lib.traced_flops(functools.partial(decode, **kwargs),
                                   (params, None, slots, active), mesh, rules)
    flops = plan_lib.flops_fields(*traced, compiled, 2.0 * config.num_matmul_params() * batch,
                                  chips)
    if compiled is None:
        return {"memory": {"fits": False, "hbm_bytes": chip.hbm_bytes,
                           "compiler_out_of_memory": out_of_memory},
                "flops": flops, "batch": batch, "max_len": max_len, "compile_s": seconds}
    return {"memory": plan_lib.memory_fields(compiled, chip.hbm_bytes), "flops": flops,
            "predicted": plan_lib.time_fields(flops, chips, chip, mfu, batch, roofline=True),
            "batch": batch, "max_len": max_len, "compile_s": seconds}


def _raise_unless_fits(result: dict, target: Topology) -> None:
    step = result["train_step"]
    if step["memory"]["fits"]:
        return
    found = result.get("search", {}).get("gin")
    hint = (f"plan.search found one that fits: {'; '.join(found)}" if found else
            "no configuration tried by plan.search fits either" if "search" in result else
            "set plan.search=True to look for remat, accumulation and FSDP/TP settings that fit")
    memory = step["memory"]
    used = memory.get("total_bytes", memory.get("state_bytes"))
    why = (f"{used / GiB:.1f} GiB per device over the {memory['hbm_bytes'] / GiB:.0f} GiB of HBM"
           if used is not None else f"the TPU compiler ran out of HBM "
           f"({memory['compiler_out_of_memory']})")
    raise ConfigError(f"the train step does not fit on {target.name}: {why}; {hint}")


def _bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.2f} MiB"


def _seconds(s: float) -> str:
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def _step_lines(name: str, step: dict) -> list[str]:
    m = step["memory"]
    if "not_compiled" in step:
        return [f"{name}: not compiled: {step['not_compiled']}"]
    if "compiler_out_of_memory" in m:
        return [f"{name}: DOES NOT FIT: {m['compiler_out_of_memory']}"]
    p, f = step["predicted"], step["flops"]
    roofline = f", roofline {_seconds(p['roofline_s'])}" if "roofline_s" in p else ""
    return [
        f"{name}: {'fits' if m['fits'] else 'DOES NOT FIT'}: {_bytes(m['total_bytes'])} per device "
        f"of {_bytes(m['hbm_bytes'])} HBM (arguments {_bytes(m['argument_bytes'])}, outputs "
        f"{_bytes(m['output_bytes'])}, aliased {_bytes(m['alias_bytes'])}, temporaries "
        f"{_bytes(m['temp_bytes'])})",
        f"  {f['per_step']:.3e} FLOPs per step ({f['per_device']:.3e} per device; model "
        f"{f['model_per_step']:.3e}); predicted {_seconds(p['step_time_s'])} at "
        f"{p['mfu_assumed']:.0%} of peak (model MFU {p['model_mfu']:.1%}){roofline}; compiled in "
        f"{step['compile_s']:.1f} s"]


def _tried(row: dict) -> str:
    """One line of the search's table."""
    where = f"tensor {row['tensor']}"
    if "skipped" in row:
        return f"{where}: skipped, {row['skipped']}"
    size = (_bytes(row["total_bytes"]) if row.get("total_bytes") is not None
            else "the compiler ran out of HBM")
    return (f"{where}, remat {row['remat_policy']}, accumulation {row['accum']}: "
            f"{'fits' if row['fits'] else 'does not fit'}, {size}, "
            f"{_seconds(row['step_time_s'])} predicted")


def summary(result: dict, rules: Rules, show_shardings: bool = True) -> str:
    """What the job prints: topology, memory, FLOPs, time, shardings, the search's choice."""
    t = result["topology"]
    lines = [f"plan: {result['model']['name']} on {t['name']} ({t['slices']} x {t['chip']} "
             f"{t['grid']}, {t['chips']} chips, {_bytes(t['hbm_bytes_per_chip'])} HBM each), mesh "
             f"{result['mesh']}, batch {result['train']['batch_size']} x "
             f"{result['train']['seq_len']}"]
    lines += _step_lines("train step", result["train_step"])
    if "decode_step" in result:
        lines += _step_lines(f"decode step ({result['decode_step']['batch']} slots of "
                             f"{result['decode_step']['max_len']})", result["decode_step"])
    if show_shardings:
        lines.append(format_table(result["train_step"]["shardings"], rules))
    if "search" in result:
        found = result["search"]
        lines.append(f"search: {found['compiles']} compiles")
        lines += [f"  {_tried(row)}" for row in found["tried"]]
        if found["gin"]:
            choice = found["choice"]
            lines.append(f"fastest that fits: {_seconds(choice['step_time_s'])} predicted, "
                         f"{_bytes(choice['total_bytes'])} per device; paste:")
            lines += [f"  {line}" for line in found["gin"]]
        else:
            lines.append("nothing tried fits")
    return "\n".join(lines)
