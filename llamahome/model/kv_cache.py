"""A fixed-size key/value cache for decoding: prefill a prompt batch, then one token per step.

    cache = init_cache(config, batch_size, max_len)     # llama.py: empty, compute dtype
    logits, cache = model.apply({"params": p}, tokens, positions, segment_ids, cache=cache)

Shapes (a pytree, so it passes through `jax.jit` and can be donated):
    k            one [batch, kv_heads, head_dim, max_len] array per layer (a tuple), in the
                 compute dtype, keys already rotated and stored transposed
    v            one [batch, kv_heads, max_len, head_dim] array per layer
    segment_ids  [batch, max_len] int32  segment id of each written slot; 0 = padding or empty
    index        [] int32                the next slot to write, shared by the whole batch, or
                 [batch] int32           one per row (`init_cache(..., per_row=True)`)

Each call writes its T new keys/values to slots [index, index + T) of every row (of each row at
its own index, when per row) and advances index by T. Query t of the call sits at slot index + t
and attends slot s only if s <= index + t, segment_ids[s] equals its own segment id, and
segment_ids[s] != 0 (attention.attention_mask).

Left-padded prompts of different lengths (shared index): pad each row on the left to the same
length T and pass segment_ids 1 on real tokens and 0 on padding, with positions counting real
tokens only (`left_padded_positions`); decode steps then pass segment_ids 1 and each row's next
position. Padding slots carry segment 0, so no query ever attends them, and every row's real
tokens line up on the same slots, so one shared index suffices.

Per-row index (the serving engine, llamahome/infer/engine.py): each row is its own sequence,
right-padded, with slot = position; a row can be refilled with a new prompt while the others
keep decoding, and a decode step writes each row at its own length.

The layouts are the ones attention reads (q . k over head_dim, then probs . v over the
slots, per kv head): a decode step streams each layer's cache as stored. In the plain
[batch, max_len, kv_heads, head_dim] layout XLA:CPU first copied both into these at every
layer and token (30 layers x 8 rows x 256 slots: 14 ms of a 45 ms step, against 4 ms now;
benchmarks/README.md "Generation"). The functions below take the slot axis (`axis`:
K_AXIS, V_AXIS, or 1 for segment ids).

index + T must stay <= max_len: writes past the end are clamped by `lax.dynamic_update_slice`,
so the caller sizes max_len for prompt plus new tokens.

Sliding-window models (LlamaConfig.sliding_window = W, Mistral) treat the cache as a ring of
S = max_len slots: the token at slot a (its position, counting from the row's first) is
written to ring slot a % S (`write_ring`), and after a call ends at slot `index` ring slot r
holds slot `ring_slots(index, S)[r]` = the latest a < index with a % S == r (negative: none
yet). A query at slot q attends the ring slots holding a with q - W < a <= q. A cache that
never wraps (index + T <= S) is exactly the linear cache above; one that wraps stays correct
while S >= W + T - 1 (the T keys written in one call must not overwrite a key an earlier query
of the same call still sees): a ring of S = W slots (`init_cache(..., rolling=True)`) takes one
token per call, i.e. decoding, and is filled from a prefill into a plain cache by `to_ring`.
Memory: W slots per row instead of prompt + new tokens (Mistral 7B: 4096 instead of 32768).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

K_AXIS, V_AXIS = 3, 2  # the slot axis of a layer's keys [B, k, h, S] and values [B, k, S, h]


@flax.struct.dataclass
class KVCache:
    """Keys, values and segment ids of every slot written so far, and the next slot to write."""

    # One array per layer rather than one stacked [layers, ...] array: a donated decode loop
    # then updates each in place, where slicing a layer out of a stacked cache and writing it
    # back copies the whole cache at every token.
    k: tuple[jax.Array, ...]  # per layer [batch, kv_heads, head_dim, max_len]
    v: tuple[jax.Array, ...]  # per layer [batch, kv_heads, max_len, head_dim]
    segment_ids: jax.Array  # [batch, max_len] int32, 0 = padding or not yet written
    index: jax.Array  # [] int32, or [batch] int32 when each row has its own

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def left_padded_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions [B, T] of left-padded rows: 0, 1, ... over real tokens, 0 on padding."""
    return jnp.maximum(jnp.cumsum(segment_ids != 0, axis=1) - 1, 0).astype(jnp.int32)


def write_slots(cached: jax.Array, new: jax.Array, index: jax.Array,
                axis: int = 1) -> jax.Array:
    """`cached` [B, ...] with `new` (T slots on `axis`, the rest as cached) written at slots
    [index, index + T) of `axis` in each row.

    A shared index [] is one dynamic_update_slice; a per-row index [B] one per row (a scatter,
    updated in place when the cache is donated).
    """
    new = new.astype(cached.dtype)

    def start(i, first: int) -> tuple:  # the update's corner in dims first.. of cached
        return tuple(i if d == axis else 0 for d in range(first, cached.ndim))
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cached, new, start(index, 0))
    return jax.vmap(lambda row, update, i: jax.lax.dynamic_update_slice(row, update, start(i, 1))
                    )(cached, new, index)


def _ring_write_slots(index: jax.Array, length: int, size: int) -> jax.Array:
    """Ring slots [T] (shared index) or [B, T] (per row) of slots index .. index + T - 1."""
    return (jnp.expand_dims(index, -1) + jnp.arange(length)) % size


def write_ring(cached: jax.Array, new: jax.Array, index: jax.Array,
               axis: int = 1) -> jax.Array:
    """`cached` [B, ...] with `new` (T <= S slots on `axis`) written at ring slots
    (index + t) % S of `axis` in each row; `index` [] or [B]. In place when donated."""
    length, size = new.shape[axis], cached.shape[axis]
    if length > size:
        raise ValueError(f"{length} tokens in one call overflow a ring cache of {size} slots; "
                         "prefill into a plain cache and convert it with to_ring")
    new = new.astype(cached.dtype)
    slots = _ring_write_slots(index, length, size)
    if jnp.ndim(index) == 0:
        return cached.at[(slice(None),) * axis + (slots,)].set(new, unique_indices=True)
    return jax.vmap(lambda row, update, s: row.at[(slice(None),) * (axis - 1) + (s,)].set(
        update, unique_indices=True))(cached, new, slots)


def ring_slots(index: jax.Array, size: int) -> jax.Array:
    """The slot (position) each of `size` ring slots holds once slots < `index` are written:
    [S] for a shared index [], [B, S] for [B]; negative where nothing is written yet."""
    last = jnp.expand_dims(index, -1) - 1
    return last - (last - jnp.arange(size)) % size


def to_ring(cache: KVCache, length: jax.Array, size: int) -> KVCache:
    """A ring of `size` slots holding each row's latest slots < length[b] of a linear cache
    (a prefill's, rows [B] with `length` [B] tokens written): ring slot r gets the slot
    `ring_slots(length, size)[r]`, empty (zeros, segment 0) where that is negative."""
    source = ring_slots(length, size)  # [B, size]

    def gather(x, axis):  # S_in slots on `axis` -> size slots
        shape = [1] * x.ndim
        shape[0], shape[axis] = source.shape
        where = source.reshape(shape)
        rows = jnp.take_along_axis(x, jnp.maximum(where, 0), axis=axis)
        return jnp.where(where >= 0, rows, 0)

    return KVCache(k=tuple(gather(k, K_AXIS) for k in cache.k),
                   v=tuple(gather(v, V_AXIS) for v in cache.v),
                   segment_ids=gather(cache.segment_ids, 1), index=length)
