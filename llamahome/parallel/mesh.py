"""The device mesh: axes `data`, `fsdp`, `tensor`, sized in gin (`-1` = all remaining devices).

    build_mesh.data = 1
    build_mesh.fsdp = -1     # every device not used by the other axes
    build_mesh.tensor = 1

`data` replicates parameters and splits the batch; `fsdp` splits the batch and shards
parameters and optimizer state; `tensor` shards heads and the MLP inside each layer. Which
logical names go on which axis is decided by the rules in `llamahome/parallel/rules.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from llamahome.errors import ConfigError

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


@gin.configurable
def build_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
               devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh('data', 'fsdp', 'tensor') over `devices` (default: all), laid out for the interconnect."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_axis_sizes((data, fsdp, tensor), len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)
