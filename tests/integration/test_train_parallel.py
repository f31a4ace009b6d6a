"""The real Llama train step: overfitting, and equal losses across meshes and accumulation."""

import functools

import jax
import numpy as np
import pytest

from llamahome.model.llama import Llama, LlamaConfig, init_params, param_logical_axes, param_shapes
from llamahome.parallel.mesh import axis_rules, batch_sharding, build_mesh, global_batch
from llamahome.train import optim, step as step_lib
from llamahome.train.step import init_train_state

pytestmark = pytest.mark.integration

CONFIG = LlamaConfig(name="tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_seq_len=64)
B, T = 8, 32


def fixed_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (B, T + 1), dtype=np.int32)
    segment_ids = np.ones((B, T), np.int32)
    segment_ids[:, T // 2:] = 2  # two packed documents per row
    positions = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)]).astype(np.int32)
    loss_mask = np.ones((B, T), np.float32)
    loss_mask[:, T // 2 - 1] = 0  # the target that would cross the document boundary
    loss_mask[-1, -5:] = 0  # padding
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
            "positions": np.tile(positions, (B, 1)), "loss_mask": loss_mask}


@functools.cache
def initial_params():
    return jax.device_get(jax.jit(functools.partial(init_params, CONFIG))(jax.random.key(0)))


def initial_state(optimizer):
    """The same host copy of the initial state for every mesh (one init compile, not one per mesh)."""
    return init_train_state(initial_params(), optimizer, 0)


def train_losses(mesh_shape, preset, steps, accum=1, learning_rate=1e-3, devices=None,
                 loss_chunk_length=0):
    mesh = build_mesh(*mesh_shape, devices=devices)
    rules = axis_rules(preset)
    specs = param_logical_axes(CONFIG)
    optimizer, schedule = optim.build_optimizer(learning_rate, steps, decay_mask=optim.decay_mask(specs),
                                                schedule=functools.partial(optim.warmup_cosine, warmup_steps=2))
    abstract, shardings = step_lib.state_shardings(param_shapes(CONFIG), specs, optimizer, mesh, rules)
    state = jax.device_put(initial_state(optimizer), shardings)
    batch_layout = batch_sharding(mesh, rules)
    model = Llama(CONFIG)
    apply_fn = lambda p, x, pos, seg: model.apply(  # noqa: E731
        {"params": p}, x, pos, seg, return_hidden=True)
    step = step_lib.compile_train_step(abstract, shardings, step_lib.abstract_batch(B, T, batch_layout), mesh,
                                   rules, apply_fn=apply_fn, optimizer=optimizer, schedule=schedule,
                                   accum_steps=accum, loss_chunk_length=loss_chunk_length)
    batch = global_batch(fixed_batch(), batch_layout)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses)


def test_tiny_model_overfits_a_fixed_batch(eight_devices):
    losses = train_losses((1, -1, 1), "fsdp", steps=60, learning_rate=1e-2, devices=eight_devices)
    assert losses[0] > 5.0  # ~log(256) at init
    assert losses[-1] < 0.5, losses[-10:]


def test_meshes_and_accumulation_give_the_same_losses(eight_devices):
    reference = train_losses((-1, 1, 1), "data_parallel", steps=4, devices=eight_devices)
    for shape, preset, accum, chunk in [((1, -1, 1), "fsdp", 1, 0), ((2, 2, 2), "fsdp_tensor", 1, 0),
                                        ((-1, 1, 1), "data_parallel", 4, 0),
                                        ((2, 2, 2), "fsdp_tensor", 1, T // 4)]:
        devices = eight_devices[:2] if accum == 4 else eight_devices  # microbatches of 2 rows
        losses = train_losses(shape, preset, steps=4, accum=accum, devices=devices,
                              loss_chunk_length=chunk)
        np.testing.assert_allclose(losses, reference, atol=1e-5,
                                   err_msg=f"{shape} {preset} x{accum} loss blocks of {chunk}")
    assert reference[-1] < reference[0]
