"""The LoRA train step: gradients and optimizer state for the adapters only, the frozen base
untouched, equal losses across meshes, quantized bases close to the float one, adapter.json
sealed into each step, and bad settings refused in one line."""

import functools
import json

import jax
import numpy as np
import pytest

from llamahome.errors import CheckpointError, ConfigError
from llamahome.model import lora as lora_lib
from llamahome.model import quant
from llamahome.model.llama import (
    Llama, LlamaConfig, adapter_logical_axes, adapter_shapes, init_adapters, init_params,
    param_logical_axes,
)
from llamahome.model.lora import LoraConfig
from llamahome.parallel.mesh import axis_rules, batch_sharding, build_mesh, global_batch, logical_shardings
from llamahome.train import frozen, loop, optim, step as step_lib
from llamahome.train.checkpoint import MANIFEST, CheckpointConfig, Checkpointer, abstract_like
from llamahome.train.step import init_train_state

CONFIG = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_seq_len=32, scan_layers=True)
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.1,
                  targets=lora_lib.ATTENTION_TARGETS + lora_lib.MLP_TARGETS + ("lm_head",))
B, T = 8, 16


@functools.cache
def host_base():
    return jax.device_get(jax.jit(functools.partial(init_params, CONFIG))(jax.random.key(0)))


@functools.cache
def host_adapters():
    return jax.device_get(jax.jit(functools.partial(init_adapters, CONFIG, LORA))(jax.random.key(1)))


def fixed_batch():
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (B, T + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}


def lora_run(mesh_shape, preset, devices, steps, fmt=None):
    """(losses, final state, frozen base, eval step) of `steps` LoRA steps on one fixed batch."""
    mesh, rules = build_mesh(*mesh_shape, devices=devices or jax.devices()[:1]), axis_rules(preset)
    specs, base_specs = adapter_logical_axes(CONFIG, LORA), param_logical_axes(CONFIG)
    tx, schedule = optim.build_optimizer(1e-2, steps, decay_mask=optim.decay_mask(specs),
                                         schedule=functools.partial(optim.warmup_cosine, warmup_steps=1))
    abstract, shardings = step_lib.state_shardings(adapter_shapes(CONFIG, LORA), specs, tx, mesh, rules)
    state = jax.device_put(init_train_state(host_adapters(), tx, 0), shardings)
    base = frozen.hold(jax.device_put(host_base(), logical_shardings(base_specs, mesh, rules)),
                       base_specs, mesh, rules, fmt, None)
    layout = batch_sharding(mesh, rules)
    apply_fn, batch = step_lib.lora_apply_fn(Llama(CONFIG, LORA)), step_lib.abstract_batch(B, T, layout)
    abstract_base = abstract_like(base, jax.tree.map(lambda x: x.sharding, base))
    train = step_lib.compile_train_step(abstract, shardings, batch, mesh, rules, abstract_base,
                                        apply_fn=apply_fn, optimizer=tx, schedule=schedule)
    evaluate = lambda: step_lib.compile_eval_step(  # noqa: E731  (compiled only when asked)
        abstract.params, shardings.params, batch, mesh, rules, apply_fn, abstract_base)
    batch = global_batch(fixed_batch(), layout)
    losses = []
    for _ in range(steps):
        state, metrics = train(state, batch, base)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, base, lambda: evaluate()(state.params, batch, base)


STEPS = 6


@functools.cache
def data_parallel_run():
    """The reference: STEPS steps with the batch split over 8 devices, float base."""
    return lora_run((-1, 1, 1), "data_parallel", jax.devices()[:8], STEPS)


def test_only_the_adapters_train_and_the_base_stays_bit_identical(eight_devices):
    losses, state, base, evaluate = data_parallel_run()
    out = evaluate()  # validation loss works on the adapters + frozen base
    assert losses[-1] < losses[0] and out["loss_sum"] / out["tokens"] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(base), host_base())
    # Gradients: exactly the adapters' tree, nothing for the base.
    grads = jax.eval_shape(functools.partial(
        step_lib.loss_and_grads, apply_fn=step_lib.lora_apply_fn(Llama(CONFIG, LORA))),
        state.params, fixed_batch(), frozen=base, rng=jax.random.key(0))[2]
    assert jax.tree.structure(grads) == jax.tree.structure(host_adapters())
    assert any(np.any(np.asarray(b)) for b in jax.tree.leaves(state.params))  # B moved off 0
    # AdamW: mu and nu of each adapter, and two step counters; nothing of the base.
    adapter_bytes = lora_lib.adapter_bytes(state.params)
    assert 2 * adapter_bytes <= lora_lib.adapter_bytes(state.opt_state) <= 2 * adapter_bytes + 16


@pytest.mark.slow
def test_meshes_give_the_losses_of_data_parallel(eight_devices):
    reference = data_parallel_run()[0]
    for shape, preset in [((1, -1, 1), "fsdp"), ((2, 2, 2), "fsdp_tensor")]:
        losses = lora_run(shape, preset, eight_devices, STEPS)[0]
        np.testing.assert_allclose(losses, reference, atol=1e-5, err_msg=f"{shape} {preset}")


# Stated tolerances: each of the first 6 losses on a quantized base within this fraction of
# the float base's (int8: per-channel absmax / 127 steps; NF4: 16 levels per block of 64).
QUANT_TOLERANCE = {"int8": 0.002, "nf4": 0.02}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantized_bases_train_like_the_float_base(fmt, eight_devices):
    """On an fsdp x tensor mesh: the quantized weights are sharded and dequantized per shard."""
    reference = data_parallel_run()[0]
    losses = lora_run((2, 2, 2), "fsdp_tensor", eight_devices, STEPS, fmt)[0]
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, reference, rtol=QUANT_TOLERANCE[fmt])
    assert not np.array_equal(losses, reference)  # the base really was quantized


def test_bad_lora_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="matches no projection.*Did you mean 'q_proj'"):
        LoraConfig(targets=("q_prj",))
    with pytest.raises(ConfigError, match=r"LoraConfig.rank=0: expected an integer >= 1"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match=r"rank=17 is larger than k_proj \(32 x 16\)"):
        loop._trained(CONFIG, LoraConfig(rank=17))
    with pytest.raises(ConfigError, match="ties its output head"):
        loop._trained(CONFIG.replace(tie_embeddings=True), LORA)
    with pytest.raises(ConfigError, match="set train.init_from"):
        loop._check_settings(32, 0, "stop", LORA, None, None)
    with pytest.raises(ConfigError, match="set train.lora"):
        loop._check_settings(32, 0, "stop", None, "runs/base", "int8")


def fake_base(digest: str) -> frozen.FrozenBase:
    return frozen.FrozenBase(params=None, ref="model:base@1", path="/models/base/params",
                             step=None, digest=digest, fmt="int8")


def test_each_step_seals_adapter_json_and_a_resume_checks_the_base(tmp_path):
    digest = "sha256:" + "a" * 64
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False),
                        on_commit=fake_base(digest).meta_writer(LORA, CONFIG))
    ckpt.save(1, {"params": np.zeros(3, np.float32)})
    ckpt.close()
    step_dir = tmp_path / "1"
    assert lora_lib.META_FILE in json.loads((step_dir / MANIFEST).read_text())["files"]
    meta = lora_lib.read_meta(step_dir)
    assert (meta.base_digest, meta.base_quant, meta.lora) == (digest, "int8", LORA)
    assert fake_base(digest).check_step(step_dir) is None
    with pytest.raises(CheckpointError) as refused:
        fake_base("sha256:" + "b" * 64).check_step(step_dir)
    message = str(refused.value)
    assert "\n" not in message and "sha256:aaaaaaaaaaaa" in message and "sha256:bbbbbbbbbbbb" in message
    (step_dir / lora_lib.META_FILE).unlink()  # committed, killed before sealing: resumed
    assert fake_base("sha256:" + "b" * 64).check_step(step_dir) is None
