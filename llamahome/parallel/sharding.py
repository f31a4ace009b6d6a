"""Shardings from logical names, and arrays created directly sharded (never whole on one device).

- `logical_shardings(specs, mesh, rules)`: PartitionSpecs of logical names -> NamedShardings.
- `state_shardings(...)`: optimizer-state leaves follow the parameter they belong to.
- `init_sharded(fn, shardings, *args)`: `jax.jit(fn, out_shardings=...)`, so each device
  computes only its own shard of the parameters / optimizer state.
- `global_batch(local, sharding)`: each process hands over its rows of the global batch
  (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llamahome.parallel.rules import Rules

BATCH_AXES = ("batch", "length")  # every batch array is [batch, length]


def logical_shardings(specs: Any, mesh: Mesh, rules: Rules) -> Any:
    """A tree of PartitionSpecs over logical names -> a tree of NamedShardings on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(spec), rules)),
                        specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """How a [batch, length] array is laid out on `mesh`."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(BATCH_AXES, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _path_key(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def follow_params(tree_shapes: Any, params_shapes: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters.

    A leaf whose path ends with a parameter's path and has that parameter's shape gets the
    parameter's sharding (Adam's mu/nu, momentum); anything else (step counts, Adafactor's
    factored row/column statistics) is replicated.
    """
    by_path = {}
    for (path, shape), sharding in zip(jax.tree_util.tree_flatten_with_path(params_shapes)[0],
                                       jax.tree.leaves(param_shardings)):
        by_path[_path_key(path)] = (shape.shape, sharding)

    def choose(path, leaf):
        key = _path_key(path)
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
