"""The Llama module on its own: parameter tree, causality, packing, padding, attention impls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llamahome.errors import ConfigError
from llamahome.model.attention import attention_mask
from llamahome.model.config import LlamaConfig
from llamahome.model.hf import load_hf_checkpoint
from llamahome.model.llama import Llama, init_params, param_logical_axes
from tests.unit.model.hf_reference import LLAMA3_ROPE, hf_logits, random_hf_llama

CONFIG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CONFIG, jax.random.key(0))


def _logits(config, params, tokens, positions=None, segment_ids=None):
    apply = jax.jit(Llama(config).apply)
    return np.asarray(apply({"params": params}, tokens, positions, segment_ids))


def test_params_count_dtype_and_axes_match(params):
    leaves = jax.tree.leaves(params)
    assert sum(x.size for x in leaves) == CONFIG.num_params()
    assert all(x.dtype == jnp.float32 for x in leaves)
    axes = param_logical_axes(CONFIG)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) \
        == jax.tree.structure(params)
    flat = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for spec, x in zip(flat, leaves, strict=True):
        assert len(spec) == x.ndim
    assert axes["layers"]["attention"]["k_proj"] == jax.sharding.PartitionSpec(
        "layers", "embed", "kv_heads", "head_dim")


def test_future_tokens_do_not_change_past_logits(params):
    tokens = np.random.default_rng(0).integers(0, 97, (2, 12)).astype(np.int32)
    changed = tokens.copy()
    changed[:, 7:] = (changed[:, 7:] + 1) % 97
    a, b = _logits(CONFIG, params, tokens), _logits(CONFIG, params, changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-3


def test_packed_documents_equal_each_alone(params):
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(0, 97, 9), rng.integers(0, 97, 6)
    packed = np.concatenate([doc_a, doc_b, [0]])[None].astype(np.int32)  # one padding slot
    segments = np.array([[1] * 9 + [2] * 6 + [0]], np.int32)
    positions = np.array([list(range(9)) + list(range(6)) + [0]], np.int32)
    got = _logits(CONFIG, params, packed, positions, segments)[0]
    alone_a = _logits(CONFIG, params, doc_a[None].astype(np.int32))[0]
    alone_b = _logits(CONFIG, params, doc_b[None].astype(np.int32))[0]
    np.testing.assert_allclose(got[:9], alone_a, atol=1e-5)
    np.testing.assert_allclose(got[9:15], alone_b, atol=1e-5)
    assert np.isfinite(got).all()


def test_dot_product_attention_matches_xla(params):
    tokens = np.random.default_rng(2).integers(0, 97, (2, 10)).astype(np.int32)
    segments = np.array([[1] * 6 + [2] * 4, [0] * 3 + [1] * 7], np.int32)
    xla = _logits(CONFIG, params, tokens, segment_ids=segments)
    dot = _logits(CONFIG.replace(attention_impl="dot_product"), params, tokens,
                  segment_ids=segments)
    np.testing.assert_allclose(dot, xla, atol=1e-5)


def _loss_grads_and_logits(config, params):
    tokens = np.random.default_rng(3).integers(0, 97, (2, 10)).astype(np.int32)

    def loss(params):
        logits = Llama(config).apply({"params": params}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

    return jax.jit(jax.grad(loss, has_aux=True))(params)


@pytest.fixture(scope="module")
def plain_grads_and_logits(params):
    return _loss_grads_and_logits(CONFIG, params)


@pytest.mark.parametrize("policy,scan", [("none", True), ("full", False), ("save_dots", True),
                                         ("save_qkv_proj", False)])
def test_remat_and_scan_give_the_plain_logits_and_grads(params, plain_grads_and_logits,
                                                        policy, scan):
    plain_grads, plain_logits = plain_grads_and_logits
    config = CONFIG.replace(remat_policy=policy, scan_layers=scan)
    grads, logits = _loss_grads_and_logits(config, params)
    np.testing.assert_allclose(logits, plain_logits, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, plain_grads)


def test_unknown_remat_policy_names_the_choices(params):
    with pytest.raises(ConfigError, match="remat_policy 'ful'.*Did you mean 'full'"):
        Llama(CONFIG.replace(remat_policy="ful")).apply({"params": params},
                                                         np.zeros((1, 2), np.int32))


def test_bf16_compute_stays_close_to_hf_float32(tmp_path):
    """bf16 compute (f32 or bf16 params) vs HF float32 logits; measured max |diff| ~0.004."""
    model = random_hf_llama(num_kv_heads=2, rope_scaling=LLAMA3_ROPE, seed=7)
    model.save_pretrained(tmp_path)
    tokens = np.random.default_rng(4).integers(0, 128, (2, 160))
    expected = hf_logits(model, tokens)
    for param_dtype in ("float32", "bfloat16"):
        config, params = load_hf_checkpoint(tmp_path, dtype="bfloat16", param_dtype=param_dtype)
        logits = Llama(config).apply({"params": params}, tokens)
        assert logits.dtype == jnp.bfloat16
        diff = np.abs(np.asarray(logits, np.float32) - expected).max()
        assert diff <= 0.02 * np.abs(expected).max(), (param_dtype, diff)


def test_attention_mask_against_a_loop():
    q_seg = np.array([[0, 1, 1, 2]])
    kv_seg = np.array([[0, 1, 1, 2, 2, 0]])
    got = np.asarray(attention_mask(q_seg, kv_seg, q_offset=1))[0, 0]
    expected = np.zeros((4, 6), bool)
    for t in range(4):
        for s in range(6):
            if q_seg[0, t] == 0:
                expected[t, s] = s == t + 1
            else:
                expected[t, s] = s <= t + 1 and kv_seg[0, s] == q_seg[0, t]
    np.testing.assert_array_equal(got, expected)
