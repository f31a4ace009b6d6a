"""The Llama decoder in Flax Linen: embedding, RMSNorm, RoPE, grouped-query attention, SwiGLU.

Why Linen: `init` and `apply` take and return plain pytrees of arrays, so the train step stays
a pure function that `jax.jit` compiles with `out_shardings`; `nn.with_logical_partitioning`
puts logical axis names on every parameter where it is created (read by `param_logical_axes`,
mapped to mesh axes by the rules in llamahome/parallel/); and `nn.scan` / `nn.remat` give
layer scanning and activation checkpointing as wrappers, without a second copy of the model.

    params = init_params(config, rng)                               # plain pytree of arrays
    logits = Llama(config).apply({"params": params}, tokens, positions, segment_ids)
    logits, cache = Llama(config).apply({"params": params}, tokens, positions, segment_ids,
                                        cache=cache)                # see kv_cache.py

tokens, positions, segment_ids: [batch, length] int32; positions default to 0..T-1 (or to
cache.index + 0..T-1); segment_ids default to all 1: a token attends earlier tokens of its own
segment only, 0 marks padding. logits: [batch, length, vocab] in the compute dtype.

The layers' parameters are always stacked on a leading `layers` axis (one `nn.scan`), so a
checkpoint loads whatever `scan_layers` says: True keeps the loop rolled (fast compile of deep
models), False unrolls it (XLA sees every layer, as with a Python loop).
Parameter tree: embedding [vocab, embed]; layers/{attention_norm,mlp_norm}/scale [L, embed];
layers/attention/{q_proj [L, embed, heads, head_dim], k_proj, v_proj [L, embed, kv_heads,
head_dim], o_proj [L, heads, head_dim, embed]}; layers/mlp/{gate_proj, up_proj [L, embed, mlp],
down_proj [L, mlp, embed]}; final_norm/scale [embed]; lm_head [embed, vocab] (untied only).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llamahome.errors import ConfigError, did_you_mean
from llamahome.model import attention as attention_lib
from llamahome.model.config import LlamaConfig
from llamahome.model.kv_cache import KVCache
from llamahome.model.rope import apply_rope, inverse_frequencies, rope_angles

_policies = jax.checkpoint_policies
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation: keep every activation
    "full": _policies.nothing_saveable,  # recompute the whole layer in the backward pass
    "save_dots": _policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "save_dots_no_batch": _policies.dots_with_no_batch_dims_saveable,  # ... but not attention's
    "save_qkv_proj": _policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_out_proj": _policies.save_only_these_names("attention_out", "mlp_out"),
}

_INIT = nn.initializers.normal(stddev=0.02)


def _constrain(x: jax.Array, *names: str | None) -> jax.Array:
    return nn.with_logical_constraint(x, names)


def _matmul(x: jax.Array, w: jax.Array, in_dims: int = 1) -> jax.Array:
    """x [B, T, *w.shape[:in_dims]] @ w -> [B, T, *w.shape[in_dims:]] as one 2-D matmul.

    Flattening batch and length into one token axis gives XLA a plain [tokens, in] @ [in, out]
    whose weight gradient is a plain 2-D matmul too; from the equivalent einsum, with its two
    batch-like axes, XLA:CPU builds that gradient from a transposed copy and a slow dot (the
    output head's backward pass took twice as long).
    """
    fan_in = math.prod(w.shape[:in_dims])
    out = x.reshape(-1, fan_in) @ w.reshape(fan_in, -1)
    return out.reshape(*x.shape[:x.ndim - in_dims], *w.shape[in_dims:])


class RMSNorm(nn.Module):
    """x / rms(x) * scale, normalised in float32 (Zhang & Sennrich 2019; as HF LlamaRMSNorm)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), c.params_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.rms_norm_eps)
        return scale.astype(c.compute_dtype) * y.astype(c.compute_dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optionally reading and writing a layer's KV cache."""

    config: LlamaConfig

    def _weight(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
        w = self.param(name, nn.with_logical_partitioning(_INIT, axes), shape,
                       self.config.params_dtype)
        return w.astype(self.config.compute_dtype)

    @nn.compact
    def __call__(self, x, sin, cos, mask, cache_index, layer_cache):
        c = self.config
        d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        wq = self._weight("q_proj", (d, n, h), ("embed", "heads", "head_dim"))
        wk = self._weight("k_proj", (d, k, h), ("embed", "kv_heads", "head_dim"))
        wv = self._weight("v_proj", (d, k, h), ("embed", "kv_heads", "head_dim"))
        wo = self._weight("o_proj", (n, h, d), ("heads", "head_dim", "embed"))

        q = checkpoint_name(_matmul(x, wq), "query_proj")  # [B, T, n, h]
        key = checkpoint_name(_matmul(x, wk), "key_proj")  # [B, T, k, h]
        value = checkpoint_name(_matmul(x, wv), "value_proj")
        q = _constrain(apply_rope(q, sin, cos), "batch", "length", "heads", None)
        key = _constrain(apply_rope(key, sin, cos), "batch", "length", "kv_heads", None)
        value = _constrain(value, "batch", "length", "kv_heads", None)

        if layer_cache is not None:  # [B, max_len, kv_heads, head_dim] each
            cached_k, cached_v = layer_cache
            start = (0, cache_index, 0, 0)
            key = jax.lax.dynamic_update_slice(cached_k, key.astype(cached_k.dtype), start)
            value = jax.lax.dynamic_update_slice(cached_v, value.astype(cached_v.dtype), start)
            layer_cache = (key, value)

        out = attention_lib.get_attention(c.attention_impl)(  # [B, T, n, h]
            q, key, value, mask, causal=layer_cache is None)
        out = checkpoint_name(_matmul(out, wo, in_dims=2), "attention_out")  # [B, T, d]
        return out, layer_cache


class Mlp(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        d, f = c.hidden_size, c.intermediate_size

        def weight(name, shape, axes):
            w = self.param(name, nn.with_logical_partitioning(_INIT, axes), shape, c.params_dtype)
            return w.astype(c.compute_dtype)

        gate = _matmul(x, weight("gate_proj", (d, f), ("embed", "mlp")))  # [B, T, f]
        up = _matmul(x, weight("up_proj", (d, f), ("embed", "mlp")))
        hidden = _constrain(jax.nn.silu(gate) * up, "batch", "length", "mlp")
        out = _matmul(hidden, weight("down_proj", (f, d), ("mlp", "embed")))  # [B, T, d]
        return checkpoint_name(out, "mlp_out")


class Block(nn.Module):
    """One pre-norm decoder layer: x + attention(norm(x)), then + mlp(norm(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, sin, cos, mask, cache_index, layer_cache):
        attn_out, layer_cache = Attention(self.config, name="attention")(
            RMSNorm(self.config, name="attention_norm")(x), sin, cos, mask, cache_index,
            layer_cache)
        x = x + attn_out
        x = x + Mlp(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x))
        return _constrain(x, "batch", "length", "embed"), layer_cache


def _layer_stack(config: LlamaConfig) -> nn.Module:
    """All layers as one `nn.scan` over stacked parameters, rematerialised as configured."""
    if config.remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"LlamaConfig.remat_policy {config.remat_policy!r} is not one of "
                          f"{sorted(REMAT_POLICIES)}."
                          f"{did_you_mean(config.remat_policy, REMAT_POLICIES)}")
    block = Block
    if config.remat_policy != "none":
        # Inside a rolled scan the loop already stops XLA from merging the recomputation
        # with the forward pass; unrolled, prevent_cse must do it.
        block = nn.remat(block, policy=REMAT_POLICIES[config.remat_policy],
                         prevent_cse=not config.scan_layers)
    scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                      length=config.num_layers,
                      unroll=1 if config.scan_layers else config.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(config, name="layers")


class Llama(nn.Module):
    """Llama decoder: tokens [B, T] -> logits [B, T, vocab]; see the module docstring."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                 return_hidden: bool = False):
        """logits [B, T, vocab], with the updated cache if one is given.

        `return_hidden=True` returns (the normalised last hidden states [B, T, embed], the output
        head [embed, vocab]) instead, both in the compute dtype, for a loss that applies the
        head itself (llamahome/train/loss.py).
        """
        c = self.config
        if return_hidden and cache is not None:
            raise ValueError("return_hidden is for training and evaluation; it takes no cache")
        batch, length = tokens.shape
        offset = 0 if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32),
                                         (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)

        embedding = self.param(
            "embedding", nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
            (c.vocab_size, c.hidden_size), c.params_dtype)
        x = jnp.take(embedding, tokens, axis=0).astype(c.compute_dtype)
        x = _constrain(x, "batch", "length", "embed")

        sin, cos = rope_angles(positions, inverse_frequencies(c.head_dim, c.rope_theta,
                                                              c.rope_scaling))
        if cache is None:
            mask = attention_lib.attention_mask(segment_ids, segment_ids)
            x, _ = _layer_stack(c)(x, sin, cos, mask, None, None)
        else:
            x, cache = self._cached_layers(x, sin, cos, segment_ids, cache)

        x = RMSNorm(c, name="final_norm")(x)
        if c.tie_embeddings:
            if not return_hidden:
                # x @ embedding^T read straight from the [vocab, embed] table: `.T` would make
                # XLA:CPU copy the whole table at every call (every decoded token).
                logits = jax.lax.dot_general(x, embedding.astype(c.compute_dtype),
                                             (((2,), (1,)), ((), ())))
                logits = _constrain(logits, "batch", "length", "vocab")
                return logits if cache is None else (logits, cache)
            head = embedding.astype(c.compute_dtype).T
        else:
            head = self.param("lm_head", nn.with_logical_partitioning(_INIT, ("embed", "vocab")),
                              (c.hidden_size, c.vocab_size), c.params_dtype).astype(c.compute_dtype)
        if return_hidden:
            return x, head
        logits = _constrain(_matmul(x, head), "batch", "length", "vocab")
        return logits if cache is None else (logits, cache)

    def _cached_layers(self, x, sin, cos, segment_ids, cache: KVCache):
        """The layers one after another, each reading and updating its own cache arrays.

        Always unrolled, whatever `scan_layers` says: in a loop over layers, or with the
        parameters still stacked, each layer's weights and cache would be sliced out of the
        stacked arrays, and XLA:CPU copies every slice, at every decoded token.
        """
        c = self.config
        kv_segments = jax.lax.dynamic_update_slice(
            cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index))
        mask = attention_lib.attention_mask(segment_ids, kv_segments, cache.index)
        if self.is_initializing():
            raise ValueError("initialise the parameters without a cache (init_params)")
        layers = self.variables["params"]["layers"]
        if not isinstance(layers, (tuple, list)):  # stacked: slice once per call
            layers = unstack_layers({"layers": layers})["layers"]
        keys, values = [], []
        for layer, k, v in zip(layers, cache.k, cache.v, strict=True):
            x, (k, v) = Block(c, parent=None).apply({"params": layer}, x, sin, cos, mask,
                                                    cache.index, (k, v))
            keys.append(k)
            values.append(v)
        length = x.shape[1]
        return x, KVCache(k=tuple(keys), v=tuple(values), segment_ids=kv_segments,
                          index=cache.index + length)


def unstack_layers(params: dict) -> dict:
    """`params` with `layers` as a tuple of per-layer trees: the layout decoding reads fastest.

    Llama reads either layout when given a cache; with this one each layer's weights are
    arrays of their own, which a decode loop reads in place instead of slicing (copying) them
    from the stacked [layers, ...] arrays at every token. Costs one copy of the layers' weights.
    """
    layers = params["layers"]
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], layers)
                                      for i in range(num_layers))}


def _boxed_init(config: LlamaConfig, rng: jax.Array) -> dict:
    return Llama(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(config: LlamaConfig, rng: jax.Array) -> dict:
    """Random parameters as a plain pytree of arrays (wrap in `jax.jit(..., out_shardings=...)`)."""
    return nn.meta.unbox(_boxed_init(config, rng))


def param_logical_axes(config: LlamaConfig) -> dict:
    """PartitionSpecs of logical axis names, with the structure of `init_params`' result."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def param_shapes(config: LlamaConfig) -> dict:
    """`jax.ShapeDtypeStruct`s of the parameters, computed without allocating them."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
