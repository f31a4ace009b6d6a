"""Quantized frozen bases: int8 and NF4 against NumPy references and their error bounds."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llamahome.errors import ConfigError
from llamahome.model import quant
from llamahome.model.llama import LlamaConfig, init_params, param_logical_axes, unstack_layers
from llamahome.model.lora import TARGET_IN_DIMS

# bitsandbytes' NF4 codebook (bitsandbytes/functional.py get_4bit_type("nf4"), csrc nf4 table),
# written out here so the module's copy is checked against it, not against itself.
BNB_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

CONFIG = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)


def bnb_quantize_nf4(weight_t: np.ndarray, blocksize: int = 64):
    """bitsandbytes' quantize_4bit(nf4) re-derived in NumPy: the torch [out, in] tensor flattened,
    blocks of `blocksize` consecutive elements scaled by 1/absmax, each to the nearest level,
    packed two a byte (first in the high nibble). Returns (packed [n/2] uint8, absmax [n/bs])."""
    flat = weight_t.astype(np.float32).reshape(-1, blocksize)
    absmax = np.abs(flat).max(axis=1)
    scaled = flat * (np.float32(1.0) / absmax)[:, None]
    codes = np.abs(scaled.reshape(-1, 1).astype(np.float64) - BNB_NF4[None, :]).argmin(axis=1)
    codes = codes.astype(np.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def bnb_dequantize_nf4(packed: np.ndarray, absmax: np.ndarray, shape, blocksize: int = 64):
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)
    return (BNB_NF4[codes].reshape(-1, blocksize) * absmax[:, None]).reshape(shape)


def nf4_bound(w: np.ndarray, in_dims: int, lead: int, block: int = 64) -> np.ndarray:
    """Per element: half the widest NF4 gap times the absmax of the element's block (NumPy)."""
    lead_shape, in_shape = w.shape[:lead], w.shape[lead:lead + in_dims]
    out_shape = w.shape[lead + in_dims:]
    fan_in = int(np.prod(in_shape))
    flat = np.abs(w).reshape(*lead_shape, fan_in, *out_shape)
    absmax = np.zeros_like(flat)
    for start in range(0, fan_in, block):
        index = (slice(None),) * lead + (slice(start, start + block),)
        absmax[index] = flat[index].max(axis=lead, keepdims=True)
    return (absmax * np.max(np.diff(BNB_NF4)) / 2).reshape(w.shape)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def test_nf4_levels_are_bitsandbytes():
    np.testing.assert_array_equal(quant.NF4_LEVELS, BNB_NF4)
    assert quant.NF4_LEVELS[quant.NF4_ZERO_CODE] == 0.0


def test_nf4_matches_bitsandbytes_reference():
    # ours [fan_in, fan_out] is torch's [out, in] transposed; fan_in % 64 == 0 aligns the blocks.
    w = np.asarray(jax.random.normal(jax.random.key(1), (256, 48)), np.float32) * 0.02
    q = quant.quantize(jnp.asarray(w), "nf4")
    packed, absmax = bnb_quantize_nf4(w.T)
    np.testing.assert_array_equal(np.asarray(q.values), packed.reshape(48, 128).T)
    np.testing.assert_array_equal(np.asarray(q.scales), absmax.reshape(48, 4).T)
    expected = bnb_dequantize_nf4(packed, absmax, (48, 256)).T
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), expected)


@pytest.mark.parametrize("shape,in_dims,lead", [
    ((3, 128, 4, 8), 1, 1),      # stacked q_proj [L, embed, heads, head_dim]
    ((2, 4, 10, 24), 2, 1),      # o_proj [L, heads, head_dim, embed], fan-in 40: one padded block
    ((200, 16), 1, 0),           # fan-in 200: three blocks and a padded one
])
def test_nf4_error_within_bound(shape, in_dims, lead):
    w = np.asarray(jax.random.normal(jax.random.key(2), shape), np.float32)
    q = quant.quantize(jnp.asarray(w), "nf4", in_dims, lead)
    dq = np.asarray(quant.dequantize(q))
    assert dq.shape == shape == q.weight_shape
    assert np.all(np.abs(w - dq) <= nf4_bound(w, in_dims, lead) * (1 + 1e-6))


def test_int8_error_within_bound_per_layer_and_channel():
    w = np.array(jax.random.normal(jax.random.key(3), (2, 16, 4, 8)), np.float32)
    w[1] *= 100.0  # a layer on another scale must get its own scales
    q = quant.quantize(jnp.asarray(w), "int8", 1, 1)
    scales = np.abs(w).max(axis=1, keepdims=True) / 127
    assert q.scales.shape == (2, 1, 4, 8)
    np.testing.assert_allclose(np.asarray(q.scales), scales, rtol=1e-6)
    dq = np.asarray(quant.dequantize(q))
    assert np.all(np.abs(w - dq) <= scales / 2 * (1 + 1e-5))


def test_pack_unpack_are_inverse():
    codes = jax.random.randint(jax.random.key(4), (3, 10, 5), 0, 16).astype(jnp.uint8)
    packed = quant.pack_nf4(codes, 1)
    assert packed.shape == (3, 5, 5) and packed.dtype == jnp.uint8
    first = np.asarray(codes[:, 0] * 16 + codes[:, 1])
    np.testing.assert_array_equal(np.asarray(packed[:, 0]), first)
    np.testing.assert_array_equal(np.asarray(quant.unpack_nf4(packed, 1)), np.asarray(codes))


def test_zero_blocks_are_exact_zeros():
    w = np.array(jax.random.normal(jax.random.key(5), (128, 4)), np.float32)
    w[:64, 1] = 0.0
    q = quant.quantize(jnp.asarray(w), "nf4")
    dq = np.asarray(quant.dequantize(q))
    assert np.all(np.isfinite(dq)) and np.all(dq[:64, 1] == 0.0)
    assert np.all(quant.unpack_nf4(q.values, 0)[:64, 1] == quant.NF4_ZERO_CODE)
    zero = quant.quantize(jnp.zeros((64, 4)), "int8")
    assert np.all(np.asarray(quant.dequantize(zero)) == 0.0)


def test_quantize_params_touches_only_targets(params):
    targets = ("q_proj", "o_proj", "down_proj")
    q = quant.quantize_params(params, targets, "nf4", TARGET_IN_DIMS)
    flat = jax.tree_util.tree_flatten_with_path(q, is_leaf=quant.is_quantized)[0]
    quantized = {jax.tree_util.keystr(k) for k, v in flat if quant.is_quantized(v)}
    assert quantized == {"['layers']['attention']['q_proj']", "['layers']['attention']['o_proj']",
                         "['layers']['mlp']['down_proj']"}
    assert q["layers"]["mlp"]["gate_proj"] is params["layers"]["mlp"]["gate_proj"]
    assert q["embedding"] is params["embedding"]
    for name, node in (("q_proj", "attention"), ("o_proj", "attention"), ("down_proj", "mlp")):
        w = np.asarray(params["layers"][node][name])
        leaf = q["layers"][node][name]
        assert leaf.lead == 1 and leaf.shape == w.shape
        dq = np.asarray(quant.dequantize(leaf))
        assert np.all(np.abs(w - dq) <= nf4_bound(w, TARGET_IN_DIMS[name], 1) * (1 + 1e-6))


def test_layer_slices_of_stacked_quantized(params):
    """A per-layer slice (nn.scan, unstack_layers) dequantizes to that layer of the stack, and
    quantizing the unstacked layout gives the same bytes as slicing the stacked one."""
    for fmt in quant.FORMATS:
        stacked = quant.quantize_params(params, ("o_proj",), fmt, TARGET_IN_DIMS)
        whole = quant.dequantize(stacked["layers"]["attention"]["o_proj"])
        per_layer = quant.quantize_params(unstack_layers(params), ("o_proj",), fmt, TARGET_IN_DIMS)
        for i, layer in enumerate(unstack_layers(stacked)["layers"]):
            sliced = layer["attention"]["o_proj"]
            np.testing.assert_array_equal(quant.dequantize(sliced), whole[i])
            own = per_layer["layers"][i]["attention"]["o_proj"]
            assert own.lead == 0
            np.testing.assert_array_equal(own.values, sliced.values)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_jitted_matmul_with_materialized_weight(fmt):
    w = np.asarray(jax.random.normal(jax.random.key(6), (128, 96)), np.float32) * 0.05
    x = np.asarray(jax.random.normal(jax.random.key(7), (16, 128)), np.float32)
    q = quant.quantize(jnp.asarray(w), fmt)
    matmul = jax.jit(lambda x, q: x @ quant.materialize(q, jnp.float32))
    out = np.asarray(matmul(x, q))
    if fmt == "nf4":
        bound = nf4_bound(w, 1, 0)
    else:
        bound = np.abs(w).max(axis=0, keepdims=True) / 127 / 2 + np.zeros_like(w)
    assert np.all(np.abs(out - x @ w) <= np.abs(x) @ bound + 1e-4)
    bf16 = jax.jit(lambda x, q: x @ quant.materialize(q, jnp.bfloat16))(x.astype(jnp.bfloat16), q)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), out, atol=0.05, rtol=0.05)


def test_nbytes_bits_per_weight():
    w = jnp.zeros((4, 512, 1376), jnp.float32)
    n = w.size
    assert quant.nbytes(quant.quantize(w, "nf4", 1, 1)) * 8 / n == 4.5
    assert quant.nbytes(quant.quantize(w, "nf4", 1, 1, block_size=128)) * 8 / n == 4.25
    assert quant.nbytes(quant.quantize(w, "int8", 1, 1)) * 8 / n == 8 + 32 / 512


def test_quantized_axes_zip_with_params(params):
    q = quant.quantize_params(params, tuple(TARGET_IN_DIMS), "nf4", TARGET_IN_DIMS)
    axes = quant.quantized_param_axes(q, param_logical_axes(CONFIG))
    wq, wo = axes["layers"]["attention"]["q_proj"], axes["layers"]["attention"]["o_proj"]
    assert wq.values == P("layers", None, "heads", "head_dim")  # fan-in 32 is padded to 64
    assert wo.scales == P("layers", None, "embed")
    shapes = jax.eval_shape(lambda: quant.quantize(jnp.zeros((2, 128, 4, 8)), "nf4", 1, 1))
    spec = quant.quantized_axes(shapes, P("layers", "embed", "heads", "head_dim"))
    assert spec.values == P("layers", "embed", "heads", "head_dim")
    assert spec.scales == P("layers", None, "heads", "head_dim")
    # one spec per array, in the same tree structure (what jit's shardings need)
    ranks = jax.tree.map(lambda a, s: (a.ndim, len(s)), q, axes)
    assert all(n == m for n, m in jax.tree.leaves(ranks, is_leaf=lambda x: isinstance(x, tuple)))
    int8 = quant.quantized_axes(quant.quantize(jnp.zeros((2, 4, 8, 32)), "int8", 2, 1),
                                P("layers", "heads", "head_dim", "embed"))
    assert int8.values == P("layers", "heads", "head_dim", "embed")
    assert int8.scales == P("layers", None, None, "embed")


SHARDED_CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from llamahome.model import quant
    from llamahome.model.llama import LlamaConfig, init_params, param_logical_axes
    from llamahome.model.lora import TARGET_IN_DIMS
    from llamahome.parallel import mesh as pm
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2,
                         num_heads=4, num_kv_heads=2)
    params, base_axes = init_params(config, jax.random.key(0)), param_logical_axes(config)
    mesh = pm.build_mesh(1, 2, 2)
    dense = lambda t: jax.tree.map(lambda w: quant.materialize(w, jnp.float32), t,
                                   is_leaf=quant.is_quantized)
    for fmt in quant.FORMATS:
        q = quant.quantize_params(params, ("q_proj", "o_proj", "down_proj"), fmt, TARGET_IN_DIMS)
        shardings = pm.logical_shardings(quant.quantized_param_axes(q, base_axes), mesh,
                                         pm.FSDP_TENSOR)
        placed = jax.device_put(q, shardings)
        out = jax.jit(dense, out_shardings=pm.logical_shardings(base_axes, mesh,
                                                                 pm.FSDP_TENSOR))(placed)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out),
                                                        jax.tree.leaves(dense(q))))
        o_proj = placed["layers"]["attention"]["o_proj"]
        print(fmt, tuple(o_proj.values.sharding.spec), tuple(o_proj.scales.sharding.spec))
""")


def test_quantized_leaves_shard_under_fsdp_tensor():
    """On 4 CPU devices (fsdp 2 x tensor 2): quantized leaves placed by quantized_param_axes
    dequantize under jit to the unsharded result, laid out as the base weights."""
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(repo), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run([sys.executable, "-c", SHARDED_CHECK], env=env, cwd=repo,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # o_proj [L, heads, head_dim, embed]: the packed fan-in shards like "heads" (tensor)
    assert "nf4 (None, 'tensor', 'fsdp') (None, None, 'fsdp')" in result.stdout, result.stdout


def test_bad_format_and_block_size_are_config_errors(params):
    with pytest.raises(ConfigError, match="nf4"):
        quant.quantize_params(params, ("q_proj",), "nf5", TARGET_IN_DIMS)
    with pytest.raises(ConfigError, match="block size 3"):
        quant.quantize_params(params, ("q_proj",), "nf4", TARGET_IN_DIMS, block_size=3)
