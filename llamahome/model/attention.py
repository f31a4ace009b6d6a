"""Attention: rotary position embeddings, the attention mask, and the implementations.

RoPE (Su et al. 2021) with Llama 3's frequency scaling. Layout: a head vector's first half
holds the real parts and its second half the imaginary parts ("rotate half"), the layout of
Hugging Face's Llama. HF checkpoints are already permuted into it from Meta's interleaved
layout, so import and export copy q/k weights unchanged.

The implementations sit behind one signature, chosen by name (`LlamaConfig.attention_impl`).
Every implementation is `attend(q, k, v, mask, causal=False) -> out` with
    q    [batch, q_len, heads, head_dim]     (already rotated; not yet scaled)
    k, v [batch, kv_len, kv_heads, head_dim] (heads % kv_heads == 0: grouped-query attention,
                                              query head n reads kv head n // (heads // kv_heads))
    mask [batch, 1, q_len, kv_len] bool      (True = may attend; see `attention_mask`)
    out  [batch, q_len, heads, head_dim]     in q's dtype.
    causal: bool, a hint: the mask is causal from slot 0 (q_len == kv_len, no KV cache), so
            an implementation may skip the blocks above the diagonal.
Softmax runs in float32. Masked logits are set to the float32 minimum, not -inf, so even an
all-False row stays finite. Add an implementation with `@register("name")`.

With a KV cache the model calls `attend_cached`, whose keys and values are the cache's
layers (kv_cache.py: keys [batch, kv_heads, head_dim, kv_len], values [batch, kv_heads,
kv_len, head_dim]); "xla" reads them as stored, another implementation gets them in the
layout above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llamahome.errors import ConfigError, did_you_mean

# --- Rotary position embeddings ---

ROPE_TYPES = ("default", "llama3")


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: dict[str, Any] | None = None) -> np.ndarray:
    """The [head_dim // 2] angular frequencies theta^(-2i/head_dim), scaled as `scaling` says."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq.astype(np.float32)
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, scaling).astype(np.float32)
    raise ConfigError(f"rope_scaling.rope_type {rope_type!r} is not supported; use one of "
                      f"{ROPE_TYPES} (LlamaConfig.rope_scaling)")


def _llama3_scaling(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's scaling (Meta's llama-models `apply_scaling`, HF `_compute_llama3_parameters`).

    Wavelengths longer than original_max / low_freq_factor are divided by `factor`, shorter
    than original_max / high_freq_factor are kept, and the band between is interpolated.
    """
    try:
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
    except KeyError as e:
        raise ConfigError(f"rope_scaling of type llama3 needs key {e.args[0]!r} "
                          f"(LlamaConfig.rope_scaling = {scaling})") from None
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_angles(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sin, cos) of positions [B, T] times frequencies: each [B, T, head_dim // 2], float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jnp.ndarray, sin: jnp.ndarray, cos: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [B, T, heads, head_dim] by the angles (sin, cos) [B, T, head_dim // 2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


# --- Attention ---

AttentionFn = Callable[..., jax.Array]  # (q, k, v, mask, causal=False) -> out
ATTENTION_IMPLS: dict[str, AttentionFn] = {}


def register(name: str) -> Callable[[AttentionFn], AttentionFn]:
    """Adds an attention implementation to the registry under `name`."""
    def add(fn: AttentionFn) -> AttentionFn:
        ATTENTION_IMPLS[name] = fn
        return fn
    return add


def get_attention(name: str) -> AttentionFn:
    """The implementation registered as `name`; a ConfigError naming the choices otherwise."""
    if name not in ATTENTION_IMPLS:
        raise ConfigError(f"LlamaConfig.attention_impl {name!r} is not one of "
                          f"{sorted(ATTENTION_IMPLS)}.{did_you_mean(name, ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[name]


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                   q_offset: jax.Array | int = 0, window: int | None = None,
                   kv_slots: jax.Array | None = None) -> jax.Array:
    """[B, 1, T, S] bool: causal by slot, same segment, and the key is not padding (segment 0).

    Query t sits at slot q_offset + t of the key sequence (q_offset > 0 when decoding into a
    KV cache; [] for the whole batch or [B], one per row); it may attend key slot
    s <= q_offset + t whose segment id equals its own.
    `window` W (sliding-window attention, Mistral): only keys with s > q_offset + t - W, as
    HF's `sliding_window_overlay`. `kv_slots` [S] or [B, S]: the slot each key holds when
    that is not its index (a ring cache, kv_cache.py); default 0 .. S - 1.
    A padding query (segment 0) attends only its own slot, so no row is empty: an all-masked
    row would make implementations disagree (cuDNN's gradient through such rows differs from
    XLA's), while this one is the same everywhere and padding still never reaches a real token.
    """
    q_len, kv_len = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    q_slots = jnp.reshape(q_offset, (-1, 1, 1)) + jnp.arange(q_len)[:, None]  # [1 | B, T, 1]
    kv_slots = jnp.arange(kv_len) if kv_slots is None else jnp.expand_dims(kv_slots, -2)
    causal = kv_slots <= q_slots  # [1 | B, T, S]
    if window is not None:
        causal &= kv_slots > q_slots - window
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
    valid = (kv_segment_ids != 0)[:, None, :]
    own_slot = (q_segment_ids == 0)[:, :, None] & (kv_slots == q_slots)
    return (causal & same & valid | own_slot)[:, None]


CAUSAL_BLOCK = 128  # query rows per block when blocks above the causal diagonal are skipped
_MASKED = float(jnp.finfo(jnp.float32).min)


@register("xla")
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  causal: bool = False, block: int = CAUSAL_BLOCK) -> jax.Array:
    """Einsum attention with a flash-style backward; `causal` skips keys above the diagonal.

    With `causal` the queries go in blocks of `block` rows and block i reads keys
    [0, (i + 1) * block) only: on CPU that skips ~half the work and keeps each block's
    [rows, keys] probabilities small enough to stay in cache.
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    q = _grouped(q, k.shape[2])
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, k, S, h]
    step = block if causal else q_len
    outs = []
    for start in range(0, q_len, step):
        end = min(start + step, q_len)
        keys = end if causal else kv_len
        outs.append(_attend(q[:, :, :, start:end], k[:, :, :keys], v[:, :, :keys],
                            mask[:, :, start:end, :keys]))
    return _ungrouped(jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0])


def _grouped(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [B, T, n, h] scaled by 1/sqrt(h), as [B, k, g, T, h]: the query heads of one kv head
    next to each other."""
    batch, q_len, heads, head_dim = q.shape
    q = (q * head_dim ** -0.5).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    return q.transpose(0, 2, 3, 1, 4)


def _ungrouped(out: jax.Array) -> jax.Array:
    """[B, k, g, T, h] -> [B, T, n, h]."""
    batch, kv_heads, groups, q_len, head_dim = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, kv_heads * groups, head_dim)


def attend_cached(name: str, q: jax.Array, k: jax.Array, v: jax.Array,
                  mask: jax.Array) -> jax.Array:
    """Implementation `name` of q [B, T, n, h] over a KV cache layer: keys k [B, kv, h, S],
    values v [B, kv, S, h] (kv_cache.py), mask [B, 1, T, S] -> [B, T, n, h].

    "xla" multiplies the cache as stored: q . k as [g, h] @ [h, S] and probs . v as
    [g, S] @ [S, h] per row and kv head, the layouts XLA's dots want, so a decode step reads
    each layer's cache once and copies none of it.
    """
    if name != "xla":
        return get_attention(name)(q, k.transpose(0, 3, 1, 2), v.transpose(0, 2, 1, 3), mask)
    logits = jnp.einsum("bkgth,bkhs->bkgts", _grouped(q, k.shape[1]), k,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask[:, :, None], logits, _MASKED), axis=-1)
    return _ungrouped(jnp.einsum("bkgts,bksh->bkgth", probs.astype(v.dtype), v))


def _probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T) [B, k, g, T, S] in float32, masked; q [B, k, g, T, h] is already scaled."""
    logits = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(jnp.where(mask[:, :, None], logits, _MASKED), axis=-1)


@jax.custom_vjp
def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """probs @ v [B, k, g, T, h] for q [B, k, g, T, h], k, v [B, k, S, h], mask [B, 1, T, S]."""
    return jnp.einsum("bkgts,bksh->bkgth", _probs(q, k, mask).astype(v.dtype), v)


def _attend_fwd(q, k, v, mask):
    probs = _probs(q, k, mask)
    out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(v.dtype), v)
    return out, (q, k, v, probs, out)


def _attend_bwd(residuals, d_out):
    # Softmax backward as in FlashAttention (Dao et al. 2022): d_logits = P * (dP - rowsum(dO * O)),
    # rowsum(dO * O) being rowsum(dP * P) without another pass over [T, S].
    q, k, v, probs, out = residuals
    d_v = jnp.einsum("bkgts,bkgth->bksh", probs.astype(v.dtype), d_out)
    d_probs = jnp.einsum("bkgth,bksh->bkgts", d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    d_logits = (probs * (d_probs - delta)).astype(q.dtype)
    d_q = jnp.einsum("bkgts,bksh->bkgth", d_logits, k)
    d_k = jnp.einsum("bkgts,bkgth->bksh", d_logits, q)
    return d_q, d_k, d_v, None


_attend.defvjp(_attend_fwd, _attend_bwd)


@register("dot_product")
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          causal: bool = False) -> jax.Array:
    """`jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU in bf16/f16, else XLA's."""
    del causal  # the mask already holds the causal part
    # jax picks XLA when implementation is None; cuDNN must be asked for, and takes only
    # half-precision inputs.
    on_cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                        implementation="cudnn" if on_cudnn else None)
