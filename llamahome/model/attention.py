"""Attention implementations behind one signature, chosen by name (`LlamaConfig.attention_impl`).

Every implementation is `attend(q, k, v, mask) -> out` with
    q    [batch, q_len, heads, head_dim]     (already rotated; not yet scaled)
    k, v [batch, kv_len, kv_heads, head_dim] (heads % kv_heads == 0: grouped-query attention,
                                              query head n reads kv head n // (heads // kv_heads))
    mask [batch, 1, q_len, kv_len] bool      (True = may attend; see `attention_mask`)
    out  [batch, q_len, heads, head_dim]     in q's dtype.
Softmax runs in float32. Masked logits are set to the float32 minimum, not -inf, so even an
all-False row stays finite. Add an implementation with `@register("name")`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from llamahome.errors import ConfigError, did_you_mean

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
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
                   q_offset: jax.Array | int = 0) -> jax.Array:
    """[B, 1, T, S] bool: causal by slot, same segment, and the key is not padding (segment 0).

    Query t sits at slot q_offset + t of the key sequence (q_offset > 0 when decoding into a
    KV cache); it may attend key slot s <= q_offset + t whose segment id equals its own.
    A padding query (segment 0) attends only its own slot, so no row is empty: an all-masked
    row would make implementations disagree (cuDNN's gradient through such rows differs from
    XLA's), while this one is the same everywhere and padding still never reaches a real token.
    """
    q_len, kv_len = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    q_slots = q_offset + jnp.arange(q_len)[:, None]
    kv_slots = jnp.arange(kv_len)[None, :]
    causal = kv_slots <= q_slots  # [T, S]
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
    valid = (kv_segment_ids != 0)[:, None, :]
    own_slot = (q_segment_ids == 0)[:, :, None] & (kv_slots == q_slots)[None]
    return (causal[None] & same & valid | own_slot)[:, None]


@register("xla")
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Plain einsum attention; XLA fuses it well on CPU and TPU."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim) * head_dim ** -0.5
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)


@register("dot_product")
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU in bf16/f16, else XLA's."""
    # jax picks XLA when implementation is None; cuDNN must be asked for, and takes only
    # half-precision inputs.
    on_cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                        implementation="cudnn" if on_cudnn else None)
