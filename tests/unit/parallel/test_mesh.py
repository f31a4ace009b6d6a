"""build_mesh axis sizes, the logical rules' mapping onto mesh axes, and arrays born sharded."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from llamahome.errors import ConfigError
from llamahome.parallel.mesh import (axis_rules, batch_sharding, build_mesh, check_divisible,
                                     follow_params, global_batch, init_sharded,
                                     logical_shardings, resolve_axis_sizes)


def test_resolve_axis_sizes():
    assert resolve_axis_sizes((1, -1, 1), 8) == (1, 8, 1)
    assert resolve_axis_sizes((2, -1, 2), 8) == (2, 2, 2)
    assert resolve_axis_sizes((-1, 1, 1), 8) == (8, 1, 1)
    with pytest.raises(ConfigError, match="does not divide"):
        resolve_axis_sizes((3, -1, 1), 8)
    with pytest.raises(ConfigError, match="at most one"):
        resolve_axis_sizes((-1, -1, 1), 8)
    with pytest.raises(ConfigError, match="use 4 devices"):
        resolve_axis_sizes((2, 2, 1), 8)


def test_build_mesh(eight_devices):
    mesh = build_mesh(data=2, fsdp=-1, tensor=2, devices=eight_devices)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in eight_devices)


@pytest.mark.parametrize("preset, param, activation", [
    ("data_parallel", P(None, None), P(("data", "fsdp", "tensor"), None, None)),
    ("fsdp", P("fsdp", None), P(("data", "fsdp"), None, None)),
    ("fsdp_tensor", P("fsdp", "tensor"), P(("data", "fsdp"), None, None)),
])
def test_presets_map_params_and_activations(preset, param, activation):
    rules = axis_rules(preset)
    assert nn.logical_to_mesh_axes(("embed", "mlp"), rules) == param
    # `batch` claims fsdp first, so the embed axis of an activation stays replicated.
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == activation


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="Did you mean 'fsdp_tensor'"):
        axis_rules("fsdp_tensr")


def test_custom_rules_from_gin_lists():
    rules = axis_rules(rules=[["batch", ["data", "fsdp"]], ["mlp", "tensor"]])
    assert nn.logical_to_mesh_axes(("batch", "mlp"), rules) == P(("data", "fsdp"), "tensor")

SPECS = {"embed": P("vocab", "embed"), "mlp": {"kernel": P("embed", "mlp")}, "norm": P("norm")}


def init(key):
    k1, k2 = jax.random.split(key)
    return {"embed": jax.random.normal(k1, (32, 16)), "mlp": {"kernel": jax.random.normal(k2, (16, 8))},
            "norm": jnp.ones((16,))}


def test_params_are_born_sharded(eight_devices):
    mesh = build_mesh(data=1, fsdp=4, tensor=2, devices=eight_devices)
    shardings = logical_shardings(SPECS, mesh, axis_rules("fsdp_tensor"))
    params = init_sharded(init, shardings, jax.random.key(0))
    assert params["embed"].sharding.spec == P("tensor", "fsdp")
    assert params["mlp"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # each device holds only its shard
    assert params["mlp"]["kernel"].addressable_shards[0].data.shape == (4, 4)
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(init(jax.random.key(0))["embed"]))


def test_optimizer_state_follows_params(eight_devices):
    mesh = build_mesh(data=1, fsdp=8, tensor=1, devices=eight_devices)
    shardings = logical_shardings(SPECS, mesh, axis_rules("fsdp"))
    params_shape = jax.eval_shape(init, jax.random.key(0))
    for tx, sharded_leaves in ((optax.adamw(1e-3), 2), (optax.adafactor(1e-3, min_dim_size_to_factor=8), 0)):
        state_shape = jax.eval_shape(tx.init, params_shape)
        state_shardings = follow_params(state_shape, params_shape, shardings, mesh)
        kernel_like = [s.spec for path, s in jax.tree_util.tree_flatten_with_path(state_shardings)[0]
                       if jax.tree_util.keystr(path).endswith("['mlp']['kernel']")]
        # Adam's mu and nu take the kernel's sharding; Adafactor's factored rows/cols are replicated.
        assert kernel_like.count(P("fsdp", None)) == sharded_leaves, kernel_like
        state = init_sharded(tx.init, state_shardings, init(jax.random.key(0)))
        assert jax.tree.structure(state) == jax.tree.structure(state_shape)


def test_a_dimension_the_mesh_does_not_divide_is_one_config_error(eight_devices):
    """4 experts over fsdp=8 (a MoE's `expert` axis, model/llama.py): one line naming the leaf,
    not JAX's traceback at the first jit; the same shapes on fsdp=4 pass."""
    shapes = {"mlp": {"experts": jax.ShapeDtypeStruct((4, 16, 8), jnp.float32)}}
    specs = {"mlp": {"experts": P("expert", "embed", "mlp")}}
    check_divisible(shapes, logical_shardings(specs, build_mesh(data=2, fsdp=4, devices=eight_devices),
                                              axis_rules("fsdp")))
    mesh = build_mesh(data=1, fsdp=8, devices=eight_devices)
    with pytest.raises(ConfigError, match=r"^parameter mlp/experts: dimension 0 of size 4 does "
                                          r"not split over mesh axes fsdp \(8 ways\)"):
        check_divisible(shapes, logical_shardings(specs, mesh, axis_rules("fsdp")))


def test_global_batch_assembles_process_rows(eight_devices):
    mesh = build_mesh(data=2, fsdp=4, tensor=1, devices=eight_devices)
    layout = batch_sharding(mesh, axis_rules("fsdp"))
    local = {"inputs": np.arange(16 * 4, dtype=np.int32).reshape(16, 4)}
    batch = global_batch(local, layout)
    assert batch["inputs"].sharding.spec == P(("data", "fsdp"), None)
    assert batch["inputs"].addressable_shards[0].data.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), local["inputs"])
