"""The sharding table of a train state: every parameter and optimizer-state leaf, its logical
axes, the mesh axes the rules give them, and its bytes per device; summed up by logical axis.

    table = sharding_table(abstract_state, shardings, param_specs, mesh_shape)
    table["params"]["layers/attention/q_proj"]
        == {"shape": [2, 64, 4, 16], "dtype": "float32",
            "logical": ["layers", "embed", "heads", "head_dim"],
            "mesh": [None, "fsdp", None, None], "bytes_per_device": 8192}
    table["opt_state"]["1/0/mu/layers/attention/q_proj"]  # the same keys; logical axes are
                                                          # those of the parameter it follows
    table["by_logical_axis"]["embed"] == {"mesh": ["fsdp"], "leaves": 9}

The table depends on the mesh's shape and axis names only, so it is computed on an
`AbstractMesh` for golden files (tests/unit/plan/goldens/) and on the topology's devices for a
plan: the same function either way.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from llamahome.parallel.mesh import Rules, path_keys, path_name, shard_ways


def _mesh_axes(spec: PartitionSpec, ndim: int) -> list:
    """A PartitionSpec padded to `ndim` entries, each None, an axis name or a list of names."""
    entries = list(spec) + [None] * (ndim - len(spec))
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def _shard_bytes(leaf: Any, sharding: NamedSharding) -> int:
    """Bytes of one device's shard of `leaf` (rounded up where an axis does not divide)."""
    shard = [-(-d // shard_ways(sharding, i)) for i, d in enumerate(leaf.shape)]
    return math.prod(shard) * jax.numpy.dtype(leaf.dtype).itemsize


def _rows(tree: Any, shardings: Any, logical_of: Any) -> dict[str, dict]:
    rows = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings), strict=True):
        name = path_name(path)
        logical = logical_of(path, leaf)
        rows[name] = {"shape": list(leaf.shape), "dtype": str(leaf.dtype),
                      "logical": None if logical is None else list(logical),
                      "mesh": _mesh_axes(sharding.spec, len(leaf.shape)),
                      "bytes_per_device": _shard_bytes(leaf, sharding)}
    return rows


def sharding_table(abstract_state: Any, shardings: Any, param_specs: Any) -> dict:
    """The table of a TrainState's params and opt_state (see the module doc)."""
    specs = {}
    flat_specs = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(abstract_state.params)[0],
                                  flat_specs, strict=True):
        specs[path_keys(path)] = (tuple(leaf.shape), tuple(spec))

    def param_logical(path, leaf):
        return specs[path_keys(path)][1]

    def follows(path, leaf):
        # The parameter this leaf mirrors, matched as mesh.follow_params matches it.
        key = path_keys(path)
        for start in range(len(key)):
            match = specs.get(key[start:])
            if match and match[0] == tuple(leaf.shape):
                return match[1]
        return None

    params = _rows(abstract_state.params, shardings.params, param_logical)
    opt_state = _rows(abstract_state.opt_state, shardings.opt_state, follows)
    return {"params": params, "opt_state": opt_state, "by_logical_axis": by_logical_axis(params)}


def by_logical_axis(rows: dict[str, dict]) -> dict[str, dict]:
    """Each logical axis name -> the mesh axes it landed on (over all leaves) and its leaf count."""
    summary: dict[str, dict] = {}
    for row in rows.values():
        for name, mesh in zip(row["logical"] or (), row["mesh"], strict=False):
            if name is None:
                continue
            entry = summary.setdefault(name, {"mesh": [], "leaves": 0})
            entry["leaves"] += 1
            shown = mesh if mesh is not None else "replicated"
            if shown not in entry["mesh"]:
                entry["mesh"].append(shown)
    return dict(sorted(summary.items()))


def state_bytes_per_device(table: dict) -> int:
    """Bytes of params + optimizer state on one device, by the table."""
    return sum(row["bytes_per_device"] for part in ("params", "opt_state")
               for row in table[part].values())


def format_table(table: dict, rules: Rules) -> str:
    """The by-axis summary and the parameter rows as aligned text, for the console."""
    lines = ["logical axis -> mesh axes (leaves)"]
    for name, entry in table["by_logical_axis"].items():
        mesh = ", ".join("x".join(m) if isinstance(m, list) else str(m) for m in entry["mesh"])
        lines.append(f"  {name:<10} -> {mesh} ({entry['leaves']})")
    lines.append(f"rules: {list(rules)}")
    width = max(len(p) for p in table["params"])
    lines.append(f"{'parameter':<{width}}  {'shape':<22} {'logical':<40} mesh")
    for path, row in table["params"].items():
        lines.append(f"{path:<{width}}  {str(row['shape']):<22} {str(row['logical']):<40} "
                     f"{row['mesh']}")
    return "\n".join(lines)
