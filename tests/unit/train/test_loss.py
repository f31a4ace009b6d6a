"""The fused head + cross-entropy against autodiff through materialised logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llamahome.model.llama import Llama, LlamaConfig, init_params
from llamahome.train import step as loss_lib

B, T, D, V = 3, 8, 5, 13


def inputs(dtype=jnp.float32, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k1, (B, T, D), dtype)
    head = jax.random.normal(k2, (D, V), dtype)
    targets = jax.random.randint(k3, (B, T), 0, V)
    mask = (jax.random.uniform(k4, (B, T)) > 0.3).astype(jnp.float32)
    return hidden, head, targets, mask


def reference(hidden, head, targets, mask, z_loss):
    """Autodiff through logits = hidden @ head, the way the step computed the loss before."""
    def objective(h, w):
        ce, z, _ = loss_lib.cross_entropy_sums(h @ w, targets, mask)
        return ce + z_loss * z, ce
    (obj, ce), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(hidden, head)
    return obj, ce, grads


@pytest.mark.parametrize("chunk_length", [0, 1, 2, 4, 8])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_values_and_gradients_equal_autodiff_through_logits(chunk_length, z_loss):
    hidden, head, targets, mask = inputs()
    obj_ref, ce_ref, (dh_ref, dw_ref) = reference(hidden, head, targets, mask, z_loss)

    def objective(h, w):
        return loss_lib.head_cross_entropy(h, w, targets, mask, z_loss, chunk_length)
    obj, ce = jax.jit(objective)(hidden, head)
    dh, dw = jax.jit(jax.grad(lambda h, w: 3.0 * objective(h, w)[0], argnums=(0, 1)))(hidden, head)
    np.testing.assert_allclose(obj, obj_ref, rtol=1e-6)
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-6)
    # The backward scales by the incoming cotangent (3 here), as a loss normaliser does.
    np.testing.assert_allclose(dh, 3.0 * dh_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, 3.0 * dw_ref, rtol=1e-5, atol=1e-6)
    masked = np.asarray(mask) == 0
    assert np.all(np.asarray(dh)[masked] == 0)  # padding positions get no gradient


def test_bfloat16_stays_close_to_float32():
    hidden, head, targets, mask = inputs()
    obj32, _, (dh32, dw32) = reference(hidden, head, targets, mask, 0.0)
    h16, w16 = hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
    obj16, _ = loss_lib.head_cross_entropy(h16, w16, targets, mask, 0.0, 4)
    dh16, dw16 = jax.grad(lambda h, w: loss_lib.head_cross_entropy(h, w, targets, mask, 0.0, 4)[0],
                          argnums=(0, 1))(h16, w16)
    assert obj16.dtype == jnp.float32 and dh16.dtype == jnp.bfloat16 and dw16.dtype == jnp.bfloat16
    np.testing.assert_allclose(obj16, obj32, rtol=2e-2)
    scale = float(jnp.max(jnp.abs(dw32)))
    assert float(jnp.max(jnp.abs(dw16.astype(jnp.float32) - dw32))) < 3e-2 * scale
    assert float(jnp.max(jnp.abs(dh16.astype(jnp.float32) - dh32))) < 3e-2 * float(jnp.max(jnp.abs(dh32)))


def test_a_chunk_length_that_does_not_divide_the_sequence_names_the_fix():
    hidden, head, targets, mask = inputs()
    with pytest.raises(ValueError, match="sequence length 8 is not divisible by loss_chunk_length 3"):
        loss_lib.head_cross_entropy(hidden, head, targets, mask, 0.0, 3)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_hidden_states_and_head_give_its_logits(tie):
    config = LlamaConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=32, max_seq_len=T, tie_embeddings=tie)
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    model = Llama(config)
    logits = model.apply({"params": params}, tokens)
    hidden, head = model.apply({"params": params}, tokens, return_hidden=True)
    assert hidden.shape == (B, T, 16) and head.shape == (16, V)
    np.testing.assert_allclose(hidden @ head, logits, rtol=1e-5, atol=1e-6)
