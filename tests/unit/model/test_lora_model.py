"""LoRA in the Llama module: adapter layout and init, the update against an explicit merge, dropout,
quantized bases, decoding with a cache, and the adapters' shardings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llamahome.model import lora as lora_lib
from llamahome.model import quant
from llamahome.model.llama import (
    Llama, LlamaConfig, adapter_logical_axes, init_adapters, init_cache, init_params,
    param_logical_axes, unstack_layers,
)
from llamahome.model.lora import LoraConfig
from llamahome.parallel.mesh import FSDP_TENSOR, logical_shardings

CONFIG = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_seq_len=32, scan_layers=True)  # fast compile
EVERY = LoraConfig(rank=4, alpha=8.0, targets=lora_lib.ATTENTION_TARGETS + lora_lib.MLP_TARGETS
                   + ("lm_head",))
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)), jnp.int32)


@functools.cache
def base():
    return jax.jit(functools.partial(init_params, CONFIG))(jax.random.key(0))


@functools.cache
def _init(config, lora):
    return jax.jit(functools.partial(init_adapters, config, lora))


def new_adapters(lora=EVERY, seed=1, config=CONFIG):
    return _init(config, lora)(jax.random.key(seed))


def trained_adapters(lora=EVERY, seed=1):
    """Adapters with non-zero B, as after training."""
    adapters = new_adapters(lora, seed)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapters)


@functools.cache
def _forward(config, lora, return_hidden, dropout):
    def forward(variables, rng):
        return Llama(config, lora).apply(variables, TOKENS, return_hidden=return_hidden,
                                         rngs={"dropout": rng} if dropout else {})
    return jax.jit(forward)


def logits(params, adapters=None, lora=None, config=CONFIG, return_hidden=False, dropout=None):
    """The model's logits (jitted once per setting: eager Flax is slow)."""
    variables = {"params": params, **({"lora": adapters} if adapters is not None else {})}
    rng = jax.random.key(0 if dropout is None else dropout)
    return _forward(config, lora, return_hidden, dropout is not None)(variables, rng)


def reference_merge(params, adapters, lora):
    """W + scale * A @ B per projection, in numpy (independent of lora.merge)."""
    out = jax.tree.map(np.asarray, params)
    for group, names in (("attention", lora_lib.ATTENTION_TARGETS), ("mlp", lora_lib.MLP_TARGETS)):
        for name in names:
            a = np.asarray(adapters["layers"][group][f"{name}_a"])  # [L, *in, r]
            b = np.asarray(adapters["layers"][group][f"{name}_b"])  # [L, r, *out]
            w = out["layers"][group][name]
            update = np.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]),
                               b.reshape(b.shape[0], b.shape[1], -1))
            out["layers"][group][name] = w + lora.scale * update.reshape(w.shape)
    out["lm_head"] = out["lm_head"] + lora.scale * np.asarray(adapters["lm_head_a"]) @ np.asarray(
        adapters["lm_head_b"])
    return out


def test_layout_and_peft_init():
    adapters = new_adapters(seed=0)
    attention, mlp = adapters["layers"]["attention"], adapters["layers"]["mlp"]
    assert attention["q_proj_a"].shape == (2, 32, 4) and attention["q_proj_b"].shape == (2, 4, 4, 8)
    assert attention["o_proj_a"].shape == (2, 4, 8, 4) and attention["o_proj_b"].shape == (2, 4, 32)
    assert mlp["down_proj_a"].shape == (2, 64, 4) and adapters["lm_head_b"].shape == (4, 128)
    for path, x in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        name = jax.tree_util.keystr(path)
        if name.endswith("_b']"):
            assert not np.any(np.asarray(x)), name  # B = 0: a new adapter changes nothing
        else:  # PEFT: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            fan_in = 32 if "o_proj" in name else int(np.prod(x.shape[-2:-1]))
            bound = 1 / np.sqrt(fan_in)
            assert np.abs(x).max() <= bound and np.abs(x).max() > 0.8 * bound, name
            np.testing.assert_allclose(np.std(x), bound / np.sqrt(3), rtol=0.25, err_msg=name)


def test_new_adapters_leave_the_logits_unchanged():
    np.testing.assert_array_equal(logits(base(), new_adapters(seed=3), EVERY), logits(base()))


def test_adapted_logits_equal_the_merged_model():
    adapters = trained_adapters()
    ours = logits(base(), adapters, EVERY)
    merged = logits(reference_merge(base(), adapters, EVERY))
    assert np.abs(np.asarray(ours - logits(base()))).max() > 0.1  # the adapters do something
    np.testing.assert_allclose(ours, merged, atol=2e-5)
    hidden, head = logits(base(), adapters, EVERY, return_hidden=True)  # the training path
    np.testing.assert_allclose(hidden @ head, merged, atol=2e-5)


def test_dropout_only_with_a_dropout_rng():
    lora = LoraConfig(rank=EVERY.rank, alpha=EVERY.alpha, dropout=0.5, targets=EVERY.targets)
    adapters = trained_adapters()
    plain = logits(base(), adapters, lora)  # no rng: evaluation, no dropout
    np.testing.assert_array_equal(plain, logits(base(), adapters, EVERY))
    a = logits(base(), adapters, lora, dropout=0)
    b = logits(base(), adapters, lora, dropout=0)
    c = logits(base(), adapters, lora, dropout=1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a - plain)).max() > 1e-3 and np.abs(np.asarray(a - c)).max() > 1e-3


def test_quantized_base_reads_as_its_dequantized_weights():
    config = CONFIG.replace(remat_policy="full")  # each layer a scanned, rematerialised slice
    targets = lora_lib.ATTENTION_TARGETS + lora_lib.MLP_TARGETS
    held = quant.quantize_params(base(), targets, "int8", lora_lib.TARGET_IN_DIMS)
    dequantized = jax.tree.map(lambda x: quant.materialize(x, jnp.float32), held,
                               is_leaf=quant.is_quantized)
    adapters = trained_adapters()
    ours = logits(held, adapters, EVERY, config)
    np.testing.assert_allclose(ours, logits(dequantized, adapters, EVERY, config), atol=1e-5)


def test_decoding_with_a_cache_reads_the_adapters():
    """Quantized weights unstacked per layer, adapters still stacked: both layouts at once."""
    adapters = trained_adapters()
    params = quant.quantize_params(base(), ("q_proj", "up_proj"), "int8", lora_lib.TARGET_IN_DIMS)
    full = logits(params, adapters, EVERY)
    decode = jax.jit(lambda variables, tokens, cache: Llama(CONFIG, EVERY).apply(
        variables, tokens, cache=cache))
    variables = {"params": unstack_layers(params), "lora": adapters}
    first, cache = decode(variables, TOKENS[:, :8], init_cache(CONFIG, 2, 16))
    rest, _ = decode(variables, TOKENS[:, 8:], cache)
    np.testing.assert_allclose(np.concatenate([first, rest], 1), full, atol=2e-5)


def test_adapters_shard_like_their_bases(eight_devices):
    mesh = jax.sharding.Mesh(np.asarray(eight_devices).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    ours = logical_shardings(adapter_logical_axes(CONFIG, EVERY), mesh, FSDP_TENSOR)
    bases = logical_shardings(param_logical_axes(CONFIG), mesh, FSDP_TENSOR)
    for group, name in [("attention", "q_proj"), ("attention", "o_proj"), ("mlp", "down_proj")]:
        base_spec = tuple(bases["layers"][group][name].spec)
        in_dims = lora_lib.TARGET_IN_DIMS[name]
        assert tuple(ours["layers"][group][f"{name}_a"].spec) == (
            *base_spec[:1 + in_dims], None)
        assert tuple(ours["layers"][group][f"{name}_b"].spec) == (
            base_spec[0], None, *base_spec[1 + in_dims:])
