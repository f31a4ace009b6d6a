"""The xla attention (causal blocks, hand-written backward) against torch sdpa + autograd."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llamahome.model.attention import attention_mask, inverse_frequencies, xla_attention

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


def llama3_inverse_frequencies(head_dim, theta, factor, low_freq_factor, high_freq_factor, original):
    """Meta's llama-models `apply_scaling` (Llama 3.1), one frequency at a time, in float64."""
    low_freq_wavelen, high_freq_wavelen = original / low_freq_factor, original / high_freq_factor
    scaled = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:  # high frequencies: kept
            scaled.append(freq)
        elif wavelen > low_freq_wavelen:  # low frequencies: slowed down by `factor`
            scaled.append(freq / factor)
        else:  # the band between: interpolated by where the wavelength falls in it
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            scaled.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(scaled)


@pytest.mark.parametrize("head_dim,theta,factor,low,high,original", [
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1 8B's config.json
    (16, 10000.0, 8.0, 1.0, 4.0, 64),  # tiny: wavelengths 20 and 63 fall in the band (16, 64)
    (32, 10000.0, 4.0, 2.0, 8.0, 256),
])
def test_llama3_rope_scaling_matches_meta_including_the_smoothing_band(head_dim, theta, factor,
                                                                       low, high, original):
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
               "high_freq_factor": high, "original_max_position_embeddings": original}
    expected = llama3_inverse_frequencies(head_dim, theta, factor, low, high, original)
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    in_band = (wavelen < original / low) & (wavelen > original / high)
    assert in_band.sum() >= 2  # the interpolation branch is exercised, not only the two ends
    assert (wavelen < original / high).any() and (wavelen > original / low).any()
    got = inverse_frequencies(head_dim, theta, scaling)
    assert got.shape == (head_dim // 2,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)
