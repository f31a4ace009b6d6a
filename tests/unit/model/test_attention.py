"""The xla attention (causal blocks, hand-written backward) against torch sdpa + autograd."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llamahome.model.attention import attention_mask, xla_attention

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 2, 11, 4, 2, 8


def _inputs():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(BATCH, LENGTH, HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.normal(size=(BATCH, LENGTH, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.normal(size=(BATCH, LENGTH, KV_HEADS, HEAD_DIM)).astype(np.float32)
    d_out = rng.normal(size=(BATCH, LENGTH, HEADS, HEAD_DIM)).astype(np.float32)
    # Row 0: two packed documents; row 1: left padding (segment 0) then one document.
    segments = np.array([[1] * 6 + [2] * 5, [0] * 3 + [1] * 8], np.int32)
    return q, k, v, d_out, segments


def _torch_reference(q, k, v, d_out, mask):
    """(out, dq, dk, dv) from torch sdpa with kv heads repeated, as HF Llama's sdpa path does."""
    tq, tk, tv = (torch.tensor(x.transpose(0, 2, 1, 3), requires_grad=True) for x in (q, k, v))
    group = HEADS // KV_HEADS
    out = torch.nn.functional.scaled_dot_product_attention(
        tq, tk.repeat_interleave(group, 1), tv.repeat_interleave(group, 1),
        attn_mask=torch.tensor(mask))
    out.backward(torch.tensor(d_out.transpose(0, 2, 1, 3)))
    return [x.detach().numpy().transpose(0, 2, 1, 3) for x in (out, tq.grad, tk.grad, tv.grad)]


@pytest.mark.parametrize("causal,block", [(False, 128), (True, 4), (True, 128)])
def test_outputs_and_grads_match_torch_sdpa(causal, block):
    q, k, v, d_out, segments = _inputs()
    mask = np.asarray(attention_mask(segments, segments))  # [B, 1, T, T]
    expected = _torch_reference(q, k, v, d_out, mask)

    def attend(q, k, v):
        return xla_attention(q, k, v, jnp.asarray(mask), causal=causal, block=block)

    out, vjp = jax.vjp(jax.jit(attend), q, k, v)
    got = [out, *vjp(jnp.asarray(d_out))]
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), e, atol=2e-5, err_msg=name)
