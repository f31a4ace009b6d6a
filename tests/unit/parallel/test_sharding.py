"""Arrays created directly sharded from logical names; optimizer state follows its parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from llamahome.parallel import sharding
from llamahome.parallel.mesh import build_mesh
from llamahome.parallel.rules import axis_rules

SPECS = {"embed": P("vocab", "embed"), "mlp": {"kernel": P("embed", "mlp")}, "norm": P("norm")}


def init(key):
    k1, k2 = jax.random.split(key)
    return {"embed": jax.random.normal(k1, (32, 16)), "mlp": {"kernel": jax.random.normal(k2, (16, 8))},
            "norm": jnp.ones((16,))}


def test_params_are_born_sharded(eight_devices):
    mesh = build_mesh(data=1, fsdp=4, tensor=2, devices=eight_devices)
    shardings = sharding.logical_shardings(SPECS, mesh, axis_rules("fsdp_tensor"))
    params = sharding.init_sharded(init, shardings, jax.random.key(0))
    assert params["embed"].sharding.spec == P("tensor", "fsdp")
    assert params["mlp"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # each device holds only its shard
    assert params["mlp"]["kernel"].addressable_shards[0].data.shape == (4, 4)
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(init(jax.random.key(0))["embed"]))


def test_optimizer_state_follows_params(eight_devices):
    mesh = build_mesh(data=1, fsdp=8, tensor=1, devices=eight_devices)
    shardings = sharding.logical_shardings(SPECS, mesh, axis_rules("fsdp"))
    params_shape = jax.eval_shape(init, jax.random.key(0))
    for tx, sharded_leaves in ((optax.adamw(1e-3), 2), (optax.adafactor(1e-3, min_dim_size_to_factor=8), 0)):
        state_shape = jax.eval_shape(tx.init, params_shape)
        state_shardings = sharding.follow_params(state_shape, params_shape, shardings, mesh)
        kernel_like = [s.spec for path, s in jax.tree_util.tree_flatten_with_path(state_shardings)[0]
                       if jax.tree_util.keystr(path).endswith("['mlp']['kernel']")]
        # Adam's mu and nu take the kernel's sharding; Adafactor's factored rows/cols are replicated.
        assert kernel_like.count(P("fsdp", None)) == sharded_leaves, kernel_like
        state = sharding.init_sharded(tx.init, state_shardings, init(jax.random.key(0)))
        assert jax.tree.structure(state) == jax.tree.structure(state_shape)


def test_global_batch_assembles_process_rows(eight_devices):
    mesh = build_mesh(data=2, fsdp=4, tensor=1, devices=eight_devices)
    batch_sharding = sharding.batch_sharding(mesh, axis_rules("fsdp"))
    local = {"inputs": np.arange(16 * 4, dtype=np.int32).reshape(16, 4)}
    batch = sharding.global_batch(local, batch_sharding)
    assert batch["inputs"].sharding.spec == P(("data", "fsdp"), None)
    assert batch["inputs"].addressable_shards[0].data.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), local["inputs"])
