"""Batched generation with a KV cache: one compiled prefill, then one compiled decode loop.

    out = generate(params, config, prompts, max_new_tokens=32, sampler=SamplerConfig(),
                   seed=0, stop_ids=(tokenizer.eos_id,))
    out.tokens[i]            # the ids generated for prompt i (up to and including its stop id)

Prompts (lists of token ids, different lengths) are padded on the LEFT to one width, a
multiple of `pad_multiple` (as is the room for new tokens, so that requests of similar
lengths share compiled code); padding has segment id 0 and is never attended, and positions
count real tokens only (see llamahome/model/kv_cache.py). Then:

- `prefill` (jit): runs the whole prompt batch through the model once, writing the cache,
  and samples the first new token of every row from the last position's logits.
- `decode` (jit): a `jax.lax.while_loop` that feeds each row's last token at its next
  position, samples, and stops when every row has produced a stop id or the step limit is
  reached. The limit is a traced argument, so the same compiled loop produces all tokens at
  once (`generate`) or a few per call (`stream_generate`): no recompilation per token.

A row that emits a stop id is done: later steps write `pad_id` for it. Step i samples with
`fold_in(key(seed), i)` (and row r with a further `fold_in(., r)`), so a seed reproduces a
generation however it is chunked. With a mesh, the
batch and the cache's batch and kv_heads axes are sharded by the same logical axis rules as
training (llamahome/parallel/mesh.py); the batch is padded with copies of its first row to
a multiple of the devices the batch is split over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llamahome.errors import UserError
from llamahome.infer.samplers import SamplerConfig, Settings, sample, sampler_settings
from llamahome.model.kv_cache import KVCache, left_padded_positions
from llamahome.model.llama import Llama, LlamaConfig, init_cache, unstack_layers
from llamahome.parallel.mesh import Rules


def _cache_axes(config: LlamaConfig) -> KVCache:
    """Logical axes of the cache: batch and kv_heads are sharded like the model's activations."""
    layer = PartitionSpec("batch", None, "kv_heads", None)
    return KVCache(k=(layer,) * config.num_layers, v=(layer,) * config.num_layers,
                   segment_ids=PartitionSpec("batch", None), index=PartitionSpec())


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries from one token to the next."""

    cache: KVCache
    tokens: jax.Array  # [B, capacity] int32 generated ids, pad_id after a row stops
    last: jax.Array  # [B] int32 the token to feed next
    positions: jax.Array  # [B] int32 its position
    done: jax.Array  # [B] bool the row has produced a stop id
    step: jax.Array  # [] int32 tokens generated so far
    key: jax.Array  # sampling key; step i draws with fold_in(key, i)
    seen: jax.Array | None  # [B, vocab] bool tokens in prompt or output (repetition penalty)
    logits: jax.Array | None  # [B, capacity, vocab] f32 logits of each step, if kept


@dataclasses.dataclass(frozen=True)
class Generation:
    """Generated ids per prompt (stop id included), and why each row ended."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (a stop id) or "length" (max_new_tokens)
    logits: np.ndarray | None = None  # [B, max_new_tokens, vocab] when keep_logits


@dataclasses.dataclass(frozen=True)
class _Static:
    """The compile-time choices of one generation (hashable: a static jit argument)."""

    config: LlamaConfig
    max_len: int  # cache slots: prompt width + capacity
    capacity: int  # room for new tokens: max_new_tokens rounded up to pad_multiple
    stop_ids: tuple[int, ...]
    pad_id: int
    keep_logits: bool
    rules: Rules | None


def _constrain(tree, axes, rules: Rules | None):
    if rules is None:
        return tree
    with nn.logical_axis_rules(rules):
        return jax.tree.map(nn.with_logical_constraint, tree, axes,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))


def _is_stop(tokens: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
    if not stop_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(stop_ids, jnp.int32))


def _apply(static: _Static, params, tokens, positions, segment_ids, cache):
    if static.rules is None:
        return Llama(static.config).apply({"params": params}, tokens, positions, segment_ids,
                                          cache=cache)
    with nn.logical_axis_rules(static.rules):
        logits, cache = Llama(static.config).apply({"params": params}, tokens, positions,
                                                   segment_ids, cache=cache)
    return logits, _constrain(cache, _cache_axes(static.config), static.rules)


@functools.partial(jax.jit, static_argnames="static")
def prefill(params, tokens: jax.Array, segment_ids: jax.Array, active: jax.Array,
            key: jax.Array, settings: Settings, *, static: _Static) -> DecodeState:
    """Runs the left-padded prompts [B, T] through the model and samples the first new token.

    Rows with `active` [B] False (batch padding) start done, so they never hold up the loop.
    """
    batch, width = tokens.shape
    cache = _constrain(init_cache(static.config, batch, static.max_len),
                       _cache_axes(static.config), static.rules)
    positions = left_padded_positions(segment_ids)
    logits, cache = _apply(static, params, tokens, positions, segment_ids, cache)
    last_logits = logits[:, -1].astype(jnp.float32)  # [B, V]: every row's prompt ends at T-1
    seen = None
    if "repetition_penalty" in settings:
        seen = jnp.zeros((batch, static.config.vocab_size), bool)
        rows = jnp.broadcast_to(jnp.arange(batch)[:, None], tokens.shape)
        seen = seen.at[rows, tokens].max(segment_ids != 0)
    token = sample(last_logits, jax.random.fold_in(key, 0), settings, seen)
    out = jnp.full((batch, static.capacity), static.pad_id, jnp.int32).at[:, 0].set(token)
    kept = None
    if static.keep_logits:
        kept = jnp.zeros((batch, static.capacity, static.config.vocab_size), jnp.float32)
        kept = kept.at[:, 0].set(last_logits)
    return DecodeState(cache=cache, tokens=out, last=token,
                       positions=jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32),
                       done=~active | _is_stop(token, static.stop_ids),
                       step=jnp.ones((), jnp.int32),
                       key=key, seen=None if seen is None else _mark(seen, token),
                       logits=kept)


def _mark(seen: jax.Array, token: jax.Array) -> jax.Array:
    return seen.at[jnp.arange(token.shape[0]), token].set(True)


@functools.partial(jax.jit, static_argnames="static", donate_argnums=1)
def decode(params, state: DecodeState, limit: jax.Array, settings: Settings, *,
           static: _Static) -> DecodeState:
    """Generates tokens until step `limit` (<= capacity) or until every row is done.

    Give `params` in `unstack_layers`' layout (as `generate` does): stacked ones are split here,
    once per call, rather than every layer being sliced (copied) at every token.
    """
    if not isinstance(params["layers"], tuple):
        params = unstack_layers(params)
    batch = state.last.shape[0]
    ones = jnp.ones((batch, 1), jnp.int32)

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        logits, cache = _apply(static, params, s.last[:, None], s.positions[:, None], ones,
                               s.cache)
        logits = logits[:, 0].astype(jnp.float32)  # [B, V]
        token = sample(logits, jax.random.fold_in(s.key, s.step), settings, s.seen)
        token = jnp.where(s.done, static.pad_id, token)
        kept = s.logits
        if kept is not None:
            kept = jax.lax.dynamic_update_index_in_dim(kept, logits, s.step, axis=1)
        return s.replace(
            cache=cache, tokens=jax.lax.dynamic_update_index_in_dim(s.tokens, token, s.step, 1),
            last=token, positions=s.positions + 1,
            done=s.done | _is_stop(token, static.stop_ids), step=s.step + 1,
            seen=None if s.seen is None else _mark(s.seen, token), logits=kept)

    return jax.lax.while_loop(cond, body, state)


_unstack_layers = jax.jit(unstack_layers)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 1
                ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment_ids) [B, T] int32: each prompt right-aligned, T a multiple of `multiple`."""
    width = max(len(p) for p in prompts)
    width = -(-width // multiple) * multiple
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segment_ids = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, width - len(prompt):] = prompt
            segment_ids[row, width - len(prompt):] = 1
    return tokens, segment_ids


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """How many ways the rules split the batch axis on `mesh`."""
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(mesh.shape[a] for a in axes)


class _Run:
    """One batch being generated: prefill done, decode advanced chunk by chunk."""

    def __init__(self, params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, sampler: SamplerConfig, seed: int,
                 stop_ids: Sequence[int], pad_id: int, pad_multiple: int, keep_logits: bool,
                 mesh: Mesh | None, rules: Rules | None):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token (add a BOS token or text)")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens={max_new_tokens}; generate at least 1 token")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > config.max_seq_len:
            raise UserError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                            f"exceeds model {config.name!r}'s max_seq_len {config.max_seq_len}; "
                            "shorten the prompt or lower max_new_tokens")
        self.num_rows = len(prompts)
        rows = list(prompts)
        if mesh is not None:  # pad the batch to whole shards with copies of row 0
            rows += [rows[0]] * (-len(rows) % batch_shards(mesh, rules))
        tokens, segment_ids = pad_prompts(rows, pad_id, pad_multiple)
        active = np.arange(len(rows)) < self.num_rows
        capacity = -(-max_new_tokens // pad_multiple) * pad_multiple  # shared by nearby values
        self.static = _Static(config=config, max_len=tokens.shape[1] + capacity,
                              capacity=capacity, stop_ids=tuple(stop_ids),
                              pad_id=pad_id, keep_logits=keep_logits,
                              rules=None if mesh is None else tuple(rules))
        self.mesh = mesh
        self.settings = sampler_settings(sampler)
        self.max_new_tokens = max_new_tokens
        if mesh is not None:
            row_sharding = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", None), rules))
            tokens, segment_ids = (jax.device_put(x, row_sharding) for x in (tokens, segment_ids))
        with self._mesh():
            # One copy of the layers' weights per generation, read in place at every token.
            self.params = _unstack_layers(params)
            self.state = prefill(self.params, tokens, segment_ids, active, jax.random.key(seed),
                                 self.settings, static=self.static)
        self.produced = 1
        self.finished = bool(jax.device_get(self.state.done).all()) or \
            max_new_tokens == 1

    def _mesh(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return jax.sharding.set_mesh(self.mesh)

    def advance(self, steps: int) -> np.ndarray:
        """Decodes up to `steps` more tokens; returns the new ones [rows, k] (k may be 0)."""
        start = self.produced
        limit = min(self.max_new_tokens, start + steps)
        if start < limit and not self.finished:
            with self._mesh():
                self.state = decode(self.params, self.state, jnp.int32(limit), self.settings,
                                    static=self.static)
        step, done = jax.device_get((self.state.step, self.state.done))
        self.produced = int(step)
        self.finished = bool(done.all()) or self.produced >= self.max_new_tokens
        return np.asarray(self.state.tokens[:self.num_rows, start:self.produced])

    def first_tokens(self) -> np.ndarray:
        return np.asarray(self.state.tokens[:self.num_rows, :1])

    def result(self) -> Generation:
        tokens = np.asarray(self.state.tokens[:self.num_rows, :self.produced])
        stops = set(self.static.stop_ids)
        out, reasons = [], []
        for row in tokens.tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stops), None)
            out.append(row[:end] if end else row)
            reasons.append("stop" if end else "length")
        logits = None
        if self.static.keep_logits:
            logits = np.asarray(self.state.logits[:self.num_rows, :self.produced])
        return Generation(tokens=out, finish_reasons=reasons, logits=logits)


def generate(params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
             stop_ids: Sequence[int] = (), pad_id: int = 0, pad_multiple: int = 64,
             keep_logits: bool = False, mesh: Mesh | None = None, rules: Rules | None = None
             ) -> Generation:
    """Generates up to `max_new_tokens` ids after each prompt (lists of ids); see the module doc."""
    run = _Run(params, config, prompts, max_new_tokens=max_new_tokens, sampler=sampler,
               seed=seed, stop_ids=stop_ids, pad_id=pad_id, pad_multiple=pad_multiple,
               keep_logits=keep_logits, mesh=mesh, rules=rules)
    run.advance(max_new_tokens)
    return run.result()


def stream_generate(params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
                    stop_ids: Sequence[int] = (), pad_id: int = 0, pad_multiple: int = 64,
                    chunk: int = 4, mesh: Mesh | None = None, rules: Rules | None = None
                    ) -> Iterator[np.ndarray]:
    """Like `generate`, but yields the new ids [B, k] after the prefill and every `chunk` steps.

    Each yield costs one host round trip, so `chunk` trades latency for speed. Rows that are
    done carry `pad_id`; the ids equal `generate`'s for the same arguments.
    """
    run = _Run(params, config, prompts, max_new_tokens=max_new_tokens, sampler=sampler,
               seed=seed, stop_ids=stop_ids, pad_id=pad_id, pad_multiple=pad_multiple,
               keep_logits=False, mesh=mesh, rules=rules)
    yield run.first_tokens()
    while not run.finished:
        yield run.advance(chunk)
