"""The device mesh, the logical axis rules, and the shardings they give an array.

Mesh: axes `data`, `fsdp`, `tensor`, sized in gin (`-1` = all remaining devices).

    build_mesh.data = 1
    build_mesh.fsdp = -1     # every device not used by the other axes
    build_mesh.tensor = 1

`data` replicates parameters and splits the batch; `fsdp` splits the batch and shards
parameters and optimizer state; `tensor` shards heads and the MLP inside each layer.

Multi-slice (several TPU slices joined by the data-center network, DCN, as MaxText's
`dcn_data_parallelism`): when the devices come from more than one slice (`device.slice_index`),
the sizes above describe one slice (its ICI mesh) and `data` is also split across slices:
the mesh is `create_hybrid_device_mesh(ici=(data, fsdp, tensor), dcn=(slices, 1, 1))`, shaped
(slices * data, fsdp, tensor), so only the data-parallel gradient reduction crosses the DCN.
`build_mesh.dcn_data` (default: the number of slices) must equal the slice count.

Rules: the one table that maps the model's axis names onto mesh axes. The model names every
parameter axis (vocab, embed, heads, kv_heads, head_dim, mlp, layers, norm) and every
activation axis (batch, length, embed, heads, kv_heads, mlp, vocab). A rule
`(name, mesh_axes)` shards that axis over those mesh axes; names without a rule are
replicated. Rules are tried in order and a mesh axis is used at most once per array, so
`batch` (listed first) takes `fsdp` on activations while `embed` takes it on parameters.
Presets, chosen in gin (`axis_rules.preset = "fsdp_tensor"`, see gin/train/parallel/):
- `data_parallel`: batch split over every axis, parameters replicated.
- `fsdp`: batch split over data x fsdp; parameters and optimizer state sharded on `embed`
  over fsdp (ZeRO-3 style: gathered per layer in the forward and backward passes).
- `fsdp_tensor`: fsdp plus Megatron-style tensor parallelism: heads, kv_heads, mlp and vocab
  over `tensor`.

Shardings: arrays are created directly sharded, never whole on one device.
- `logical_shardings(specs, mesh, rules)`: PartitionSpecs of logical names -> NamedShardings.
- `follow_params(...)`: optimizer-state leaves follow the parameter they belong to.
- `init_sharded(fn, shardings, *args)`: `jax.jit(fn, out_shardings=...)`, so each device
  computes only its own shard of the parameters / optimizer state.
- `global_batch(local, sharding)`: each process hands over its rows of the global batch
  (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llamahome.errors import ConfigError, did_you_mean

# --- Mesh ---

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_axis_sizes(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces the one `-1` in `sizes` by what is left of `num_devices`; checks the product."""
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError(f"mesh axis sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh axis sizes {dict(zip(MESH_AXES, sizes))} must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"{num_devices} devices cannot be split into mesh axes "
                              f"{dict(zip(MESH_AXES, sizes))}: {known} does not divide {num_devices}; "
                              "change build_mesh.data / fsdp / tensor")
        sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh axes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices "
                          f"but there are {num_devices}; set one of build_mesh.data / fsdp / tensor to -1")
    return tuple(sizes)


def num_slices(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices `devices` span (1 for devices without a `slice_index`, e.g. CPU, GPU)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


@gin.configurable
def build_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, dcn_data: int | None = None,
               devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh('data', 'fsdp', 'tensor') over `devices` (default: all), laid out for the interconnect.

    Across several slices `data`, `fsdp`, `tensor` size one slice and `data` also spans the
    `dcn_data` slices (module doc).
    """
    devices = list(jax.devices() if devices is None else devices)
    slices = num_slices(devices)
    if dcn_data is not None and dcn_data != slices:
        raise ConfigError(f"build_mesh.dcn_data={dcn_data} but the devices span {slices} slice(s); "
                          "leave it unset (it follows the slices) or run on that many slices")
    if slices > 1:
        ici = resolve_axis_sizes((data, fsdp, tensor), len(devices) // slices)
        grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices,
                                                    allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES)
    shape = resolve_axis_sizes((data, fsdp, tensor), len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


# --- Logical axis rules ---

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# LoRA adapters (model/lora.py) name their rank axis "lora_rank": never sharded (r is small),
# so an adapter is sharded on its other axes exactly like its base weight.
DATA_PARALLEL: Rules = (
    ("batch", ("data", "fsdp", "tensor")),
    ("lora_rank", None),
)
FSDP: Rules = (
    ("batch", ("data", "fsdp")),
    ("expert", "fsdp"),  # a mixture of experts' experts (model/llama.py MoeMlp), before embed
    ("embed", "fsdp"),
    ("lora_rank", None),
)
FSDP_TENSOR: Rules = (
    ("batch", ("data", "fsdp")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "fsdp"),
    ("embed", "fsdp"),
    ("lora_rank", None),
)
PRESETS: dict[str, Rules] = {"data_parallel": DATA_PARALLEL, "fsdp": FSDP, "fsdp_tensor": FSDP_TENSOR}


@gin.configurable
def axis_rules(preset: str = "fsdp", rules: Sequence[Sequence[object]] | None = None) -> Rules:
    """The rules of a named preset, or `rules` as given (a list of (name, mesh axes) pairs)."""
    if rules is not None:
        return tuple((str(name), tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    if preset not in PRESETS:
        raise ConfigError(f"axis_rules.preset={preset!r} is not a preset.{did_you_mean(preset, PRESETS)} "
                          f"Presets: {', '.join(PRESETS)}; or bind axis_rules.rules")
    return PRESETS[preset]


# --- Shardings ---

BATCH_AXES = ("batch", "length")  # every batch array is [batch, length]


def logical_shardings(specs: Any, mesh: Mesh, rules: Rules) -> Any:
    """A tree of PartitionSpecs over logical names -> a tree of NamedShardings on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(spec), rules)),
                        specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def check_divisible(shapes: Any, shardings: Any, what: str = "parameter") -> None:
    """ConfigError naming the first leaf of `shapes` (arrays or ShapeDtypeStructs) that a mesh
    axis of its sharding does not divide evenly (e.g. 4 experts over fsdp=8), instead of JAX's
    traceback at the first jit."""
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(shapes)[0],
                                      jax.tree.leaves(shardings)):
        for dim, size in enumerate(leaf.shape):
            if size % (ways := shard_ways(sharding, dim)):
                axes = sharding.spec[dim]
                raise ConfigError(
                    f"{what} {path_name(path)}: dimension {dim} of size {size} does not split "
                    f"over mesh axes {axes if isinstance(axes, str) else 'x'.join(axes)} "
                    f"({ways} ways); choose build_mesh sizes that divide it, or another "
                    "parallel preset")


def shard_ways(sharding: NamedSharding, dim: int) -> int:
    """Into how many shards `sharding` splits dimension `dim` (1: not split)."""
    axes = sharding.spec[dim] if dim < len(sharding.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """How a [batch, length] array is laid out on `mesh`."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(BATCH_AXES, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def path_keys(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def path_name(path: tuple) -> str:
    """'layers/attention/q_proj' for a pytree key path."""
    return "/".join(path_keys(path))


def follow_params(tree_shapes: Any, params_shapes: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters.

    A leaf whose path ends with a parameter's path and has that parameter's shape gets the
    parameter's sharding (Adam's mu/nu, momentum); anything else (step counts, Adafactor's
    factored row/column statistics) is replicated.
    """
    by_path = {}
    for (path, shape), sharding in zip(jax.tree_util.tree_flatten_with_path(params_shapes)[0],
                                       jax.tree.leaves(param_shardings)):
        by_path[path_keys(path)] = (shape.shape, sharding)

    def choose(path, leaf):
        key = path_keys(path)
        for start in range(len(key)):
            match = by_path.get(key[start:])
            if match and match[0] == leaf.shape:
                return match[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(choose, tree_shapes)


def init_sharded(fn: Callable[..., Any], shardings: Any, *args: Any) -> Any:
    """Runs `fn(*args)` compiled so that its outputs are born with `shardings`."""
    return jax.jit(fn, out_shardings=shardings)(*args)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows [global_batch / process_count, length] -> global jax.Arrays."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
