"""Planning a training run for a TPU topology (the `plan` job, llamahome/plan/jobs.py): the train
step compiled for a mesh of compile-only devices, what XLA says about it (memory per device,
FLOPs, a predicted time), and the fit search.

    settings = TrainSettings.from_gin()                # train.batch_size, seq_len, ... as bound
    train = plan_train_step(config, settings, mesh, rules, optimizer, chip, mfu)
    found = search(config, settings, topology, devices, optimizer, mfu)   # the fit search

Nothing is allocated: the state and batch are ShapeDtypeStructs carrying their shardings, and
the step is llamahome/train/step.py's own `compile_train_step` (the same jit, shardings and
donation as a training run), so what compiles here is what `train` runs.

Memory, per device, from `compiled.memory_analysis()`: arguments (the state and the batch),
outputs, aliased bytes (the donated state written in place), temporaries; the total is
argument + output - alias + temp, as MaxText reports it, and the plan fits when that total is
at most the chip's HBM (generated code, a few MiB, is listed apart). libtpu itself refuses to
compile a step whose temporaries overflow the HBM: that plan does not fit, and records the
compiler's line ("Ran out of memory on HBM ...") instead of the byte counts.

Time: the FLOPs are the step's matmuls counted on its jaxpr (llamahome/plan/flops.py: loops
expanded, remat's recomputation included), per device = / chips; XLA's own
`cost_analysis()["flops"]` is listed too (`xla_flops_per_device`) but counts each loop body
once, so it undercounts a scanned or accumulating step. The predicted step time is the FLOPs
per device at `mfu` (the fraction of the chip's peak bf16 FLOP/s they are assumed to run at;
with no recomputation that is the MFU), and the model MFU it implies is the model's 6N +
attention FLOPs (LlamaConfig.flops_per_token) over all chips' peak. Communication is not
modelled: a plan compares configurations by compute and memory, not by their collectives.

The fit search (`search`, `plan.search=True`): the fastest-predicted configuration that fits.
For each way to split a slice's chips between FSDP and tensor parallelism (`tensor` in 1, 2,
4, ... dividing the KV heads; preset `fsdp` for 1, `fsdp_tensor` above), it compiles the train
step with the remat policies in `remat_policies` (least recomputation first) and, for each,
gradient accumulation 1, 2, 4, ... up to `max_accum`, and keeps the first that fits: more
remat or accumulation only adds FLOPs or steps. A split whose parameters and optimizer state
alone overflow the HBM is skipped without compiling. Among the fits, the one with the least
predicted step time wins (ties: the most headroom). Data parallelism across slices (the DCN
axis) is kept as the mesh gives it; within a slice `data` is 1.

The choice comes back as gin lines to paste after the training run's gin files.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
from absl import logging
from jax.sharding import Mesh

from llamahome.errors import ConfigError
from llamahome.model.llama import Llama, LlamaConfig, param_logical_axes, param_shapes
from llamahome.parallel.mesh import PRESETS, Rules, batch_sharding, build_mesh
from llamahome.plan.flops import matmul_flops
from llamahome.plan.shardings import sharding_table, state_bytes_per_device
from llamahome.plan.topology import Chip, Topology
from llamahome.train import step as step_lib
from llamahome.train.loop import train
from llamahome.train.optim import decay_mask, schedule_horizons

# train.* settings a plan reads; the rest (data, eval, checkpoints) do not change the step.
TRAIN_FIELDS = ("batch_size", "seq_len", "gradient_accumulation_steps", "z_loss",
                "loss_chunk_length", "learning_rate", "steps")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The train job's settings that shape the compiled step."""

    batch_size: int = 8
    seq_len: int = 256
    gradient_accumulation_steps: int = 1
    z_loss: float = 0.0
    loss_chunk_length: int = 0
    learning_rate: float = 3e-4
    steps: int = 1000

    @classmethod
    def from_gin(cls) -> TrainSettings:
        """`train.*` as bound in gin (the training run's own gin files), else train's defaults."""
        defaults = {name: p.default for name, p in inspect.signature(train).parameters.items()}
        bound = gin.get_bindings("train")
        if bound.get("lora") is not None:
            raise ConfigError("train.lora is bound: plan compiles full training only; plan the "
                              "run without LoRA, or unset train.lora")
        return cls(**{f: bound.get(f, defaults[f]) for f in TRAIN_FIELDS})

    def replace(self, **changes: Any) -> TrainSettings:
        return dataclasses.replace(self, **changes)


def memory_fields(compiled: jax.stages.Compiled, hbm_bytes: int) -> dict[str, Any]:
    """Per-device bytes of a compiled program against `hbm_bytes` (module doc)."""
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "generated_code_bytes": m.generated_code_size_in_bytes, "total_bytes": total,
            "hbm_bytes": hbm_bytes, "fits": total <= hbm_bytes,
            "headroom_bytes": hbm_bytes - total}


def xla_cost(compiled: jax.stages.Compiled) -> dict[str, float]:
    """XLA's cost analysis of one device's program (a loop's body counted once)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"xla_flops_per_device": float(cost.get("flops", float("nan"))),
            "bytes_accessed_per_device": float(cost.get("bytes accessed", float("nan"))),
            "xla_optimal_seconds": float(cost.get("optimal_seconds", float("nan")))}


def traced_flops(fn: Callable[..., Any], args: tuple, mesh: Mesh, rules: Rules) -> tuple[float, int]:
    """(matmul FLOPs of `fn(*args)` for all devices together, while loops counted once)."""
    with jax.sharding.set_mesh(mesh), nn.logical_axis_rules(rules):
        return matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def flops_fields(flops: float, whiles: int, compiled: jax.stages.Compiled | None,
                 model_flops: float, chips: int) -> dict[str, float]:
    """The traced FLOPs, all chips' and one's, beside the model's and XLA's (when compiled)."""
    return {"per_step": flops, "per_device": flops / chips, "model_per_step": model_flops,
            "while_loops_counted_once": whiles, **(xla_cost(compiled) if compiled else {})}


def time_fields(flops: dict, chips: int, chip: Chip, mfu: float, tokens: int,
                roofline: bool = False) -> dict[str, float]:
    """Predicted seconds per step at `mfu`, the model MFU it implies (and the roofline bound)."""
    step_time = flops["per_device"] / (chip.peak_flops * mfu)
    fields = {"mfu_assumed": mfu, "step_time_s": step_time,
              "model_mfu": flops["model_per_step"] / (chips * chip.peak_flops * step_time),
              "tokens_per_step": tokens, "tokens_per_s_per_chip": tokens / step_time / chips}
    if roofline:
        fields["roofline_s"] = max(flops["per_device"] / chip.peak_flops,
                                   flops["bytes_accessed_per_device"] / chip.hbm_bandwidth)
    return fields


def timed(fn: Callable[[], jax.stages.Compiled]) -> tuple[jax.stages.Compiled, float]:
    """(fn(), its wall time in seconds)."""
    start = time.perf_counter()
    compiled = fn()
    return compiled, time.perf_counter() - start


def compiled_or_out_of_memory(fn: Callable[[], jax.stages.Compiled]
                              ) -> tuple[jax.stages.Compiled | None, float, str | None]:
    """(compiled or None, seconds, None or the TPU compiler's out-of-memory line).

    libtpu refuses to compile a program whose temporaries overflow the chip's HBM
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM ..."): for a plan that is an answer (does
    not fit), not a failure.
    """
    start = time.perf_counter()
    try:
        compiled = fn()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        line = next((x for x in str(e).splitlines() if "memory" in x.lower()), str(e).splitlines()[0])
        return None, time.perf_counter() - start, line.strip()
    return compiled, time.perf_counter() - start, None


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The abstract TrainState of a run on a mesh, its shardings, and what built them."""

    abstract: step_lib.TrainState
    shardings: step_lib.TrainState
    specs: Any  # the parameters' logical axes
    tx: Any
    schedule: Any

    def table(self) -> dict:
        return sharding_table(self.abstract, self.shardings, self.specs)


def state_layout(config: LlamaConfig, settings: TrainSettings, mesh: Mesh, rules: Rules,
                 optimizer: Callable[..., tuple]) -> StateLayout:
    """The train job's state construction (optimizer, then step.state_shardings), abstract."""
    specs, shapes = param_logical_axes(config), param_shapes(config)
    tx, schedule = optimizer(settings.learning_rate, settings.steps, decay_mask=decay_mask(specs),
                             horizons=schedule_horizons(settings.steps, None, None))
    abstract, shardings = step_lib.state_shardings(shapes, specs, tx, mesh, rules)
    return StateLayout(abstract, shardings, specs, tx, schedule)


def plan_train_step(config: LlamaConfig, settings: TrainSettings, mesh: Mesh, rules: Rules,
                    optimizer: Callable[..., tuple], chip: Chip, mfu: float) -> dict[str, Any]:
    """The train step compiled for `mesh` (compile-only devices): memory, FLOPs, time, shardings."""
    layout = state_layout(config, settings, mesh, rules, optimizer)
    abstract, shardings, tx, schedule = layout.abstract, layout.shardings, layout.tx, layout.schedule
    batches = batch_sharding(mesh, rules)
    step_lib.check_batch_divisible(settings.batch_size, settings.gradient_accumulation_steps, batches)
    batch = step_lib.abstract_batch(settings.batch_size, settings.seq_len, batches)
    step_kwargs = dict(apply_fn=step_lib.hidden_apply_fn(Llama(config)), optimizer=tx,
                       schedule=schedule, z_loss=settings.z_loss,
                       accum_steps=settings.gradient_accumulation_steps,
                       loss_chunk_length=settings.loss_chunk_length)
    compiled, seconds, out_of_memory = compiled_or_out_of_memory(
        lambda: step_lib.compile_train_step(abstract, shardings, batch, mesh, rules, **step_kwargs))
    chips, tokens = mesh.devices.size, settings.batch_size * settings.seq_len
    flops = flops_fields(*traced_flops(functools.partial(step_lib.train_step, **step_kwargs),
                                       (abstract, batch), mesh, rules),
                         compiled, config.flops_per_token(settings.seq_len) * tokens, chips)
    memory = (memory_fields(compiled, chip.hbm_bytes) if compiled is not None else
              {"fits": False, "hbm_bytes": chip.hbm_bytes, "compiler_out_of_memory": out_of_memory})
    return {"memory": memory, "flops": flops,
            "predicted": time_fields(flops, chips, chip, mfu, tokens),
            "compile_s": seconds, "shardings": layout.table()}


# --- The fit search ---

REMAT_ORDER = ("none", "save_dots", "full")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of the search: a remat policy, an accumulation split and an FSDP/TP split."""

    remat_policy: str
    accum: int
    tensor: int

    @property
    def preset(self) -> str:
        return "fsdp" if self.tensor == 1 else "fsdp_tensor"

    def gin_lines(self) -> list[str]:
        return [f"LlamaConfig.remat_policy = '{self.remat_policy}'",
                f"train.gradient_accumulation_steps = {self.accum}",
                "build_mesh.data = 1", "build_mesh.fsdp = -1", f"build_mesh.tensor = {self.tensor}",
                f"axis_rules.preset = '{self.preset}'"]


def tensor_splits(config: LlamaConfig, chips_per_slice: int) -> list[int]:
    """Tensor-parallel sizes worth trying: powers of two dividing the KV heads and the slice."""
    sizes, t = [], 1
    while t <= chips_per_slice and config.num_kv_heads % t == 0 and chips_per_slice % t == 0:
        sizes.append(t)
        t *= 2
    return sizes


def accum_splits(batch_size: int, shards: int, max_accum: int) -> list[int]:
    """Accumulation steps a, doubling from 1, whose microbatches (batch / a) split over `shards`."""
    splits, a = [], 1
    while a <= max_accum and batch_size % a == 0 and (batch_size // a) % shards == 0:
        splits.append(a)
        a *= 2
    return splits


def state_fits(config: LlamaConfig, settings: TrainSettings, mesh: Mesh, rules: Rules,
               optimizer: Callable[..., tuple], hbm_bytes: int) -> tuple[bool, int]:
    """(whether params + optimizer state alone fit on one device, their bytes), without compiling."""
    needed = state_bytes_per_device(state_layout(config, settings, mesh, rules, optimizer).table())
    return needed <= hbm_bytes, needed


def search(config: LlamaConfig, settings: TrainSettings, topology: Topology, devices: Sequence,
           optimizer: Callable[..., tuple], mfu: float,
           remat_policies: Sequence[str] = REMAT_ORDER, max_accum: int = 8,
           max_compiles: int = 24, tensor_sizes: Sequence[int] | None = None) -> dict[str, Any]:
    """Tries candidates (module doc); returns the tried ones, the choice (or None) and its gin.

    `tensor_sizes` limits the FSDP/TP splits tried (default: all of `tensor_splits`).
    """
    tried: list[dict] = []
    compiles = 0
    splits = tensor_splits(config, topology.chips_per_slice)
    for tensor in [t for t in splits if tensor_sizes is None or t in tensor_sizes]:
        mesh = build_mesh(data=1, fsdp=-1, tensor=tensor, devices=devices)
        rules = PRESETS["fsdp" if tensor == 1 else "fsdp_tensor"]
        fits, needed = state_fits(config, settings, mesh, rules, optimizer, topology.chip.hbm_bytes)
        if not fits:
            tried.append({"tensor": tensor, "skipped": f"params + optimizer state need {needed} "
                                                      "bytes per device"})
            continue
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        found = False
        for remat in remat_policies:
            for accum in accum_splits(settings.batch_size, shards, max_accum):
                if compiles >= max_compiles:
                    break
                candidate = Candidate(remat, accum, tensor)
                compiles += 1
                plan = plan_train_step(config.replace(remat_policy=remat),
                                       settings.replace(gradient_accumulation_steps=accum),
                                       mesh, rules, optimizer, topology.chip, mfu)
                memory = plan["memory"]
                row = {**dataclasses.asdict(candidate), "fits": memory["fits"],
                       "total_bytes": memory.get("total_bytes"),
                       "headroom_bytes": memory.get("headroom_bytes"),
                       **({"compiler_out_of_memory": memory["compiler_out_of_memory"]}
                          if "compiler_out_of_memory" in memory else {}),
                       "step_time_s": plan["predicted"]["step_time_s"],
                       "model_mfu": plan["predicted"]["model_mfu"], "compile_s": plan["compile_s"]}
                logging.info("search: %s", row)
                tried.append(row)
                if row["fits"]:
                    found = True
                    break
            if found:
                break
    fitting = [r for r in tried if r.get("fits")]
    best = min(fitting, key=lambda r: (r["step_time_s"], -r["headroom_bytes"]), default=None)
    choice = best and Candidate(best["remat_policy"], best["accum"], best["tensor"])
    return {"tried": tried, "compiles": compiles, "choice": best,
            "gin": choice.gin_lines() if choice else None}
