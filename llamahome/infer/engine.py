"""The decoding engine: continuous batching over a fixed set of slots, one KV-cache row each.

    engine = Engine(config, params, tokenizer, max_batch=8, max_seq_len=512)
    handle = engine.submit(prompt_ids, max_tokens=64, temperature=0.7, top_p=0.9, seed=1)
    for event in handle:          # TokenEvent(token_id, logprob, finish_reason), as decoded
        ...
    handle.cancel()               # or let it finish; the slot is free again within one step
    engine.close()

Every decoder in LlamaHome runs here: the `serve` job's requests through `Engine` (a
background thread), and `generate` / `stream_generate` (the `generate` job, the dashboard
playground, infer/generator.py) through `EngineCore`, the same slots driven synchronously.

How it works. The engine holds `max_batch` slots and one preallocated KV cache whose row s
(per layer keys [max_batch, kv_heads, head_dim, max_seq_len] and values [max_batch,
kv_heads, max_seq_len, head_dim], model/kv_cache.py) belongs to slot s, with its own
length (`KVCache.index` is one per row). A slot's row holds its sequence from slot 0, right-
padded, so a token's cache slot is its position. A sliding-window model (Mistral) keeps a ring
of `sliding_window` slots per row instead (position p in slot p % W, model/kv_cache.py): the
prefill runs on a plain cache and moves each prompt's latest W keys into its ring.
- prefill (jit, one per prompt bucket and row count): runs the waiting prompts of one bucket
  together, each right-padded to the bucket (a power of two >= 16, at most max_seq_len, so a
  new prompt length reuses a compiled prefill), their count padded to a power of two (at
  most max_batch, so a new count rarely compiles); writes each prompt's row into a free
  slot and samples its first token, the output head applied at its last position only.
  One call of k rows costs far less than k calls of one (on 2 CPU cores, 8 prompts of 60
  tokens: ~42 ms together against ~8 x 10 ms alone);
- decode (jit, one shape): ONE step of every slot at once, each at its own position; empty
  slots ride along masked (their length does not advance). It returns one token per slot,
  the only value read back to the host per step;
- between steps the host retires finished requests, frees cancelled ones, and prefills
  waiting ones into free slots (one batched call per bucket), so new requests join while
  the others keep decoding, which stall for no more than those calls.

Why per-slot rows and not paged blocks (vLLM's PagedAttention): under XLA every array has a
static shape, and a paged cache needs a block table and a gather of each slot's blocks at
every layer and token (or a custom kernel) to be fast; per-slot rows are plain dense arrays
that the compiled step updates in place (donated), with no allocator to get wrong. The price
is memory: every slot reserves max_seq_len tokens whether it uses them or not, so max_batch x
max_seq_len is sized to the workload. Paged blocks (sharing a prompt prefix, more short
requests in the same memory) are future work.

Batch independence. A request's tokens never depend on what else is in the batch: prefill
rows are right-padded with positions of their own (a row attends only to its own tokens),
the decode step always has the same shape, every computation is per row, each
sampling setting that a row leaves off is an exact no-op for it (samplers.py), and a sampling
request's draw i uses the key fold_in(key(seed), i). Greedy and seeded outputs are therefore
the same alone, among 15 others, or in `generate`.

With a mesh, params are laid out by the training rules (llamahome/parallel/mesh.py) and the
slots' batch and kv_heads axes are sharded like activations; max_batch must be a multiple of
the ways the rules split the batch. A LoRA adapter (`lora` config + `adapters`, the "lora"
collection of model/lora.py) is applied as the model applies it in training.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import queue
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec

from llamahome.errors import ConfigError, UserError
from llamahome.infer.samplers import SamplerConfig, row_settings, sample_rows, sampler_settings
from llamahome.model.kv_cache import K_AXIS, V_AXIS, KVCache, to_ring
from llamahome.model.llama import (Llama, LlamaConfig, decode_layout, in_decode_layout, init_cache,
                                   unstack_layers)
from llamahome.model.lora import LoraConfig
from llamahome.parallel.mesh import Rules

MIN_BUCKET = 16  # the shortest prefill; prompt buckets are powers of two from here
MAX_SEED = 2**32
_SAMPLING = ("min_p", "temperature", "top_k", "top_p")


class QueueFull(Exception):
    """The engine's waiting queue is full; the caller should retry later (HTTP 429)."""


class EngineClosed(RuntimeError):
    """The engine was closed, or its loop failed, before the request finished."""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token. The last event of a request has a finish_reason: "stop" (the token
    is one of its stop ids) or "length" (it is the max_tokens-th)."""

    token_id: int
    logprob: float | None = None  # log p(token) under the model (raw logits), if asked
    finish_reason: str | None = None
    logits: np.ndarray | None = None  # [vocab] f32 raw logits; only from EngineCore(keep_logits)


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion to run: prompt ids, length limit, sampling, stop ids."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampler: SamplerConfig = SamplerConfig()
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()
    logprobs: bool = False

    @property
    def filters(self) -> tuple[str, ...]:
        """The sampler settings the compiled step must apply for this request: all of the
        sampling ones once it samples (rows leave theirs OFF), so that a few compiled variants
        (greedy / sampling, each with or without the repetition penalty) serve every mix."""
        enabled = sampler_settings(self.sampler)
        penalty = ("repetition_penalty",) if "repetition_penalty" in enabled else ()
        return penalty + (_SAMPLING if "temperature" in enabled else ())


def prefill_bucket(length: int, max_len: int) -> int:
    """The padded prompt length a prefill compiles for: a power of two >= MIN_BUCKET, <= max_len."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_len)


def batch_shards(mesh: Mesh | None, rules: Rules | None) -> int:
    """How many ways the rules split the batch axis on `mesh` (1 without a mesh)."""
    if mesh is None:
        return 1
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(mesh.shape[a] for a in axes)


# --- The compiled steps ---

@flax.struct.dataclass
class Slots:
    """Everything on device that a slot carries from one step to the next."""

    cache: KVCache  # per-layer k [B, kv_heads, h, S], v [B, kv_heads, S, h]; index [B]: length
    last: jax.Array  # [B] int32 the token each slot feeds next (its last sampled one)
    count: jax.Array  # [B] int32 tokens generated so far: the next draw's key index
    seed: jax.Array  # [B] uint32 the request's seed
    seen: jax.Array  # [B, vocab] bool prompt and generated tokens (repetition penalty)
    sampling: dict[str, jax.Array]  # samplers.OFF's names -> [B] per-slot values


@dataclasses.dataclass(frozen=True)
class _Model:
    """The compile-time choices of the model call (hashable: a static jit argument)."""

    config: LlamaConfig
    lora: LoraConfig | None
    rules: Rules | None

    def alone(self) -> _Model:
        """The same model for a prefill, its batch unsplit: its row count (a power of two, as
        few as 1) need not be a multiple of the devices that split the slots."""
        if self.rules is None:
            return self
        return dataclasses.replace(self, rules=tuple(
            (name, None if name == "batch" else axes) for name, axes in self.rules))


@dataclasses.dataclass(frozen=True)
class _Outputs:
    """What a step samples with and returns besides the tokens and their logprobs (static)."""

    filters: tuple[str, ...]  # sampler settings on for at least one row
    logits: bool


def _slot_axes(config: LlamaConfig) -> Slots:
    """Logical axes of the slots: batch and kv_heads sharded like the model's activations."""
    layer = PartitionSpec("batch", "kv_heads", None, None)
    rows = PartitionSpec("batch")
    cache = KVCache(k=(layer,) * config.num_layers, v=(layer,) * config.num_layers,
                    segment_ids=PartitionSpec("batch", None), index=rows)
    return Slots(cache=cache, last=rows, count=rows, seed=rows,
                 seen=PartitionSpec("batch", None), sampling={name: rows for name in _OFF})


_OFF = row_settings(SamplerConfig())  # every setting off: temperature 0 (greedy) and so on


def _dtype(setting: str) -> np.dtype:
    return np.dtype(np.int32 if setting == "top_k" else np.float32)


def _constrain(tree, axes, rules: Rules | None):
    if rules is None:
        return tree
    with nn.logical_axis_rules(rules):
        return jax.tree.map(nn.with_logical_constraint, tree, axes,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))


def _apply(model: _Model, params, adapters, tokens, positions, segment_ids, cache,
           logits_at=None):
    variables = {"params": params, **({"lora": adapters} if adapters is not None else {})}
    module = Llama(model.config, lora=model.lora)
    with nn.logical_axis_rules(model.rules) if model.rules else contextlib.nullcontext():
        return module.apply(variables, tokens, positions, segment_ids, cache=cache,
                            logits_at=logits_at)


def _draw(logits, seeds, counts, sampling, seen, outputs: _Outputs):
    """(tokens [B], extras) from f32 logits [B, V]; row r draws with fold_in(key(seed_r), count_r)
    and its logprob is log_softmax(logits)[token] (the model's distribution, not the filtered)."""
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, counts)
    tokens = sample_rows(logits, keys, {name: sampling[name] for name in outputs.filters}, seen)
    # Always computed (one pass over [B, V], small beside the step): no variant to compile.
    extras = {"logprob": jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, None],
                                             axis=-1)[:, 0]}
    if outputs.logits:
        extras["logits"] = logits
    return tokens, extras


@functools.partial(jax.jit, static_argnames=("model", "batch", "max_len"))
def _init_slots(*, model: _Model, batch: int, max_len: int) -> Slots:
    c = model.config
    rows = jnp.zeros((batch,), jnp.int32)
    slots = Slots(cache=init_cache(c, batch, max_len, per_row=True, rolling=True),
                  last=rows, count=rows,
                  seed=rows.astype(jnp.uint32), seen=jnp.zeros((batch, c.vocab_size), bool),
                  sampling={name: jnp.full((batch,), value, _dtype(name))
                            for name, value in _OFF.items()})
    return _constrain(slots, _slot_axes(c), model.rules)


@functools.partial(jax.jit, static_argnames=("model", "outputs"), donate_argnums=2)
def _prefill(params, adapters, slots: Slots, slot, tokens, length, seed, sampling, *,
             model: _Model, outputs: _Outputs):
    """Runs k prompts (tokens [k, P], row i's first length[i] real) into rows slot [k] and
    samples each one's first token; a row's cache is written whole (P slots, segment ids to
    the end). Padding rows have slot = B (out of range): their writes are dropped."""
    c, (k, bucket) = model.config, tokens.shape
    segment_ids = (jnp.arange(bucket) < length[:, None]).astype(jnp.int32)  # [k, P]
    logits, rows = _apply(model.alone(), params, adapters, tokens,
                          jnp.broadcast_to(jnp.arange(bucket), (k, bucket)), segment_ids,
                          init_cache(c, k, bucket, per_row=True), logits_at=length - 1)
    seen = jnp.zeros((k, c.vocab_size), bool).at[jnp.arange(k)[:, None], tokens].max(
        segment_ids != 0)
    token, extras = _draw(logits[:, 0].astype(jnp.float32), seed, jnp.zeros((k,), jnp.int32),
                          sampling, seen, outputs)

    def put(whole, part, axis=1):  # part [k, ...] into rows `slot` of whole [B, ...], its
        # `axis` (slots) no longer than whole's
        index = (slot, *(slice(None),) * (axis - 1), slice(0, part.shape[axis]))
        return whole.at[index].set(part.astype(whole.dtype), mode="drop")
    max_len = slots.cache.max_len
    if c.sliding_window is not None:  # a rolling cache (kv_cache.py): the latest max_len slots
        rows = to_ring(rows, length, max_len)
        kv_segments = rows.segment_ids
    else:
        kv_segments = jnp.pad(segment_ids, ((0, 0), (0, max_len - bucket)))
    cache = KVCache(k=tuple(put(whole, part, K_AXIS) for whole, part in zip(slots.cache.k, rows.k)),
                    v=tuple(put(whole, part, V_AXIS) for whole, part in zip(slots.cache.v, rows.v)),
                    segment_ids=put(slots.cache.segment_ids, kv_segments),
                    index=slots.cache.index.at[slot].set(length, mode="drop"))
    slots = Slots(cache=cache, last=slots.last.at[slot].set(token, mode="drop"),
                  count=slots.count.at[slot].set(1, mode="drop"),
                  seed=slots.seed.at[slot].set(seed, mode="drop"),
                  seen=put(slots.seen, seen.at[jnp.arange(k), token].set(True)),
                  sampling={name: slots.sampling[name].at[slot].set(value, mode="drop")
                            for name, value in sampling.items()})
    return _constrain(slots, _slot_axes(c), model.rules), token, extras


@functools.partial(jax.jit, static_argnames=("model", "outputs"), donate_argnums=2)
def _decode(params, adapters, slots: Slots, active, *, model: _Model, outputs: _Outputs):
    """One token for every slot: feeds each its last token at its own position; slots with
    `active` [B] False run masked (their length stays, their token is 0)."""
    batch = active.shape[0]
    index = slots.cache.index
    logits, cache = _apply(model, params, adapters, slots.last[:, None], index[:, None],
                           jnp.ones((batch, 1), jnp.int32), slots.cache)
    cache = cache.replace(index=jnp.where(active, cache.index, index))
    token, extras = _draw(logits[:, 0].astype(jnp.float32), slots.seed, slots.count,
                          slots.sampling, slots.seen, outputs)
    token = jnp.where(active, token, 0)
    seen = slots.seen.at[jnp.arange(batch), token].max(active)
    slots = slots.replace(cache=cache, last=token, count=slots.count + active, seen=seen)
    return _constrain(slots, _slot_axes(model.config), model.rules), token, extras


def abstract_decode(config: LlamaConfig, rules: Rules | None, batch: int, max_len: int):
    """The decode step as `plan` compiles it ahead of time, without weights: (the jitted step,
    its static arguments for a greedy batch without adapters, the slots' abstract shapes, their
    logical axes). Call it under the mesh the step is planned for (`jax.sharding.set_mesh`)."""
    model = _Model(config, None, None if rules is None else tuple(rules))
    slots = jax.eval_shape(functools.partial(_init_slots, model=model, batch=batch,
                                             max_len=max_len))
    return _decode, {"model": model, "outputs": _Outputs((), False)}, slots, _slot_axes(config)


def _unstacked(tree: dict | None) -> dict | None:
    """Params or adapters with their layers split (llama.unstack_layers), once per engine."""
    if tree is None or "layers" not in tree or isinstance(tree["layers"], (tuple, list)):
        return tree
    return _unstack_layers(tree)


_unstack_layers = jax.jit(unstack_layers)
_decode_layout = jax.jit(decode_layout)


def engine_params(params: dict, mesh: Mesh | None = None) -> dict:
    """`params` as the engine reads them (llama.decode_layout: a copy of the weights with each
    projection [out, in]), or `params` themselves when already so. An engine makes the copy
    itself; hold on to this one to start many (`generate` calls) without one copy each."""
    if in_decode_layout(params):
        return params
    with contextlib.nullcontext() if mesh is None else jax.sharding.set_mesh(mesh):
        return _decode_layout(params)


# --- Driving the slots ---

@dataclasses.dataclass(frozen=True)
class _Step:
    """A dispatched decode step: its outputs (device arrays) and the requests it ran."""

    tokens: jax.Array
    extras: dict
    running: list[tuple[int, Request]]


class EngineCore:
    """The slots and the compiled steps, driven by one thread: `admit`, `step`, `release`.

    Not thread-safe; `Engine` runs one in a background thread, `generate` in the caller's.
    `keep_logits` returns each token's raw logits in its event (generate's keep_logits).
    """

    def __init__(self, config: LlamaConfig, params: dict, *, max_batch: int, max_seq_len: int,
                 mesh: Mesh | None = None, rules: Rules | None = None,
                 lora: LoraConfig | None = None, adapters: dict | None = None,
                 keep_logits: bool = False):
        if max_batch < 1 or max_seq_len < 2:
            raise ConfigError(f"max_batch={max_batch}, max_seq_len={max_seq_len}: the engine "
                              "needs at least 1 slot of at least 2 tokens")
        if max_seq_len > config.max_seq_len:
            raise ConfigError(f"max_seq_len={max_seq_len} exceeds model {config.name!r}'s "
                              f"max_seq_len {config.max_seq_len}; lower it")
        shards = batch_shards(mesh, rules)
        if max_batch % shards:
            raise ConfigError(f"max_batch={max_batch} is not a multiple of the {shards} ways the "
                              f"mesh splits the batch; use {-(-max_batch // shards) * shards}")
        if (lora is None) != (adapters is None):
            raise ConfigError("a LoRA adapter needs both its config (lora) and its weights "
                              "(adapters)")
        self.config, self.max_batch, self.max_seq_len = config, max_batch, max_seq_len
        self.mesh, self.keep_logits = mesh, keep_logits
        self.model = _Model(config, lora, None if mesh is None else tuple(rules))
        self.params = engine_params(params, mesh)
        with self._on_mesh():
            self.adapters = _unstacked(adapters)
            self.slots = _init_slots(model=self.model, batch=max_batch, max_len=max_seq_len)
        self.requests: list[Request | None] = [None] * max_batch
        self.generated = [0] * max_batch  # tokens handed out per slot
        self.dispatched = [0] * max_batch  # tokens computed or being computed per slot
        self.steps = 0
        self._in_flight: _Step | None = None

    def _on_mesh(self):
        return contextlib.nullcontext() if self.mesh is None else jax.sharding.set_mesh(self.mesh)

    def free_slots(self) -> list[int]:
        return [slot for slot, r in enumerate(self.requests) if r is None]

    def active_slots(self) -> list[int]:
        return [slot for slot, r in enumerate(self.requests) if r is not None]

    def check(self, request: Request) -> None:
        """UserError if the request cannot run on this engine (ids, lengths)."""
        if not request.prompt:
            raise UserError("the prompt is empty; it needs at least one token")
        if any(not 0 <= t < self.config.vocab_size for t in request.prompt):
            raise UserError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        if request.max_tokens < 1:
            raise UserError(f"max_tokens={request.max_tokens}; generate at least 1 token")
        if len(request.prompt) + request.max_tokens > self.max_seq_len:
            raise UserError(f"a prompt of {len(request.prompt)} tokens plus max_tokens="
                            f"{request.max_tokens} exceeds the engine's max_seq_len "
                            f"{self.max_seq_len}; shorten the prompt or lower max_tokens")
        if not 0 <= request.seed < MAX_SEED:
            raise UserError(f"seed={request.seed} must be in [0, 2**32)")

    def admit(self, request: Request) -> tuple[int, TokenEvent]:
        """Prefills `request` into a free slot; returns the slot and the first token's event."""
        return self.admit_many([request])[0]

    def admit_many(self, requests: Sequence[Request]) -> list[tuple[int, TokenEvent]]:
        """Prefills `requests` into free slots: (slot, first token's event) of each, in order.

        The prompts of one bucket run in one call (a batch of k rows costs far less than k
        calls of one), every call dispatched before the first read back.
        """
        for request in requests:
            self.check(request)
        free = self.free_slots()
        if len(requests) > len(free):
            raise IndexError(f"{len(requests)} requests for {len(free)} free slots")
        groups: dict[int, list[tuple[int, Request]]] = collections.defaultdict(list)
        for slot, request in zip(free, requests):
            groups[prefill_bucket(len(request.prompt), self.max_seq_len)].append((slot, request))
            self.requests[slot], self.generated[slot], self.dispatched[slot] = request, 0, 1
        calls = [(group, self._prefill(bucket, group)) for bucket, group in groups.items()]
        events = {}
        for group, outputs in calls:
            tokens, extras = jax.device_get(outputs)
            for row, (slot, _) in enumerate(group):
                events[slot] = self._event(slot, int(tokens[row]), extras, row)
        return [(slot, events[slot]) for slot in free[:len(requests)]]

    def _prefill(self, bucket: int, group: list[tuple[int, Request]]) -> tuple:
        """Dispatches the prefill of `group`'s prompts (one bucket) into their slots; its rows
        are padded to a power of two (at most max_batch) so that a new count rarely compiles."""
        rows = min(1 << (len(group) - 1).bit_length(), self.max_batch)
        slots = np.full(rows, self.max_batch, np.int32)  # padding rows: out of range, dropped
        tokens = np.zeros((rows, bucket), np.int32)
        lengths, seeds = np.ones(rows, np.int32), np.zeros(rows, np.uint32)
        sampling = {name: np.full(rows, value, _dtype(name)) for name, value in _OFF.items()}
        for row, (slot, request) in enumerate(group):
            slots[row], lengths[row], seeds[row] = slot, len(request.prompt), request.seed
            tokens[row, :len(request.prompt)] = request.prompt
            for name, value in row_settings(request.sampler).items():
                sampling[name][row] = value
        outputs = _Outputs(tuple(sorted({f for _, r in group for f in r.filters})),
                           self.keep_logits)
        with self._on_mesh():
            self.slots, tokens, extras = _prefill(
                self.params, self.adapters, self.slots, slots, tokens, lengths, seeds, sampling,
                model=self.model, outputs=outputs)
        return tokens, extras

    def step(self) -> list[tuple[int, TokenEvent]]:
        """Completes one decode step of every running slot: (slot, event) of each, slot order.

        The next step is dispatched before this one's tokens are read back, so the device
        computes while the host hands tokens out. A request that stops in this step (a stop id,
        a cancel) rides one step too many, masked out of nothing: its row's result is dropped.
        """
        while True:
            current, self._in_flight = self._in_flight or self._dispatch(), None
            if current is None:
                return []
            self._in_flight = self._dispatch()
            tokens, extras = jax.device_get((current.tokens, current.extras))  # the one sync
            events = [(slot, self._event(slot, int(tokens[slot]), extras, slot))
                      for slot, request in current.running if self.requests[slot] is request]
            self.steps += bool(events)  # steps that produced tokens (not one all dropped)
            if events or self._in_flight is None:
                return events

    def _dispatch(self) -> _Step | None:
        """Starts a decode step of every slot that still needs tokens (None if none does)."""
        running = [(slot, r) for slot, r in enumerate(self.requests)
                   if r is not None and self.dispatched[slot] < r.max_tokens]
        if not running:
            return None
        mask = np.zeros(self.max_batch, bool)
        for slot, _ in running:
            mask[slot] = True
            self.dispatched[slot] += 1
        outputs = _Outputs(tuple(sorted({f for _, r in running for f in r.filters})),
                           self.keep_logits)
        with self._on_mesh():
            self.slots, tokens, extras = _decode(self.params, self.adapters, self.slots, mask,
                                                 model=self.model, outputs=outputs)
        return _Step(tokens, extras, running)

    def release(self, slot: int) -> None:
        """Frees a slot (a cancelled request); its row is overwritten by the next prefill."""
        self.requests[slot] = None

    def _event(self, slot: int, token: int, extras: dict, row: int) -> TokenEvent:
        request = self.requests[slot]
        self.generated[slot] += 1
        reason = ("stop" if token in request.stop_ids else
                  "length" if self.generated[slot] >= request.max_tokens else None)
        if reason:
            self.release(slot)
        logprob = float(extras["logprob"][row]) if request.logprobs else None
        logits = extras["logits"][row] if "logits" in extras else None
        return TokenEvent(token, logprob, reason, logits)


# --- The engine: a background thread over the slots ---

_END = object()  # a handle's queue: no more events (cancelled)


class Handle:
    """A submitted request: iterate for its TokenEvents (blocking); `cancel()` to stop it.

    With a `listener` the engine thread calls it instead, with each TokenEvent, then None if
    the request ends without a finish reason (cancelled) or the exception that ended it: an
    event loop (the server) gets its events without a thread per request to wake and read.
    """

    def __init__(self, engine: Engine, request: Request,
                 listener: Callable[[TokenEvent | BaseException | None], None] | None = None):
        self.request, self._engine, self._listener = request, engine, listener
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False

    def _put(self, item) -> None:
        if self._listener is None:
            self._events.put(item)
        else:
            self._listener(None if item is _END else item)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            item = self._events.get()
            if item is _END or self.cancelled:  # events queued before a cancel are dropped
                return
            if isinstance(item, BaseException):
                raise EngineClosed(f"the engine stopped before the request finished: {item}")
            yield item
            if item.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Stops the request: its slot is free before the next decode step; iteration ends."""
        self._engine._cancel(self)

    def tokens(self) -> list[int]:
        """Waits for the request to finish; its generated ids (stop id included)."""
        return [event.token_id for event in self]


class Engine:
    """Continuous batching for many clients; see the module docstring.

    `tokenizer` (optional) gives the default stop ids (its `stop_ids`). submit() raises
    QueueFull when `max_queue` requests already wait, UserError for a request that cannot run.
    """

    def __init__(self, config: LlamaConfig, params: dict, tokenizer=None, *,
                 max_batch: int = 8, max_seq_len: int = 512, mesh: Mesh | None = None,
                 rules: Rules | None = None, lora: LoraConfig | None = None,
                 adapters: dict | None = None, max_queue: int = 64):
        self._core = EngineCore(config, params, max_batch=max_batch, max_seq_len=max_seq_len,
                                mesh=mesh, rules=rules, lora=lora, adapters=adapters)
        self.max_batch, self.max_seq_len, self.max_queue = max_batch, max_seq_len, max_queue
        self.stop_ids = tuple(getattr(tokenizer, "stop_ids", ()) or ())
        self._lock = threading.Condition()
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cancelled: list[Handle] = []
        self._running: dict[int, Handle] = {}  # slot -> handle
        self._stats = self._snapshot()
        self._closed = False
        self._seeds = random.SystemRandom()
        self._thread = threading.Thread(target=self._loop, name="llamahome-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: Sequence[int], max_tokens: int, *, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None,
               stop_ids: Sequence[int] | None = None, logprobs: bool = False,
               top_k: int | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None,
               listener: Callable[[TokenEvent | BaseException | None], None] | None = None
               ) -> Handle:
        """Queues a completion of `prompt_ids`; `stop_ids` None: the tokenizer's stop ids;
        `seed` None: a random one; `listener`: see Handle. Raises QueueFull, or UserError for
        a bad request."""
        sampler = SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty)
        request = Request(prompt=tuple(int(t) for t in prompt_ids), max_tokens=int(max_tokens),
                          sampler=sampler,
                          seed=self._seeds.randrange(MAX_SEED) if seed is None else int(seed),
                          stop_ids=frozenset(self.stop_ids if stop_ids is None else stop_ids),
                          logprobs=bool(logprobs))
        self._core.check(request)
        handle = Handle(self, request, listener)
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting "
                                f"(max_queue={self.max_queue}); retry later")
            self._waiting.append(handle)
            self._stats = self._snapshot()
            self._lock.notify()
        return handle

    def stats(self) -> dict[str, Any]:
        """{"slots", "active", "waiting", "steps", "free_slots"}: slots as of the last step
        boundary, "steps" the decode steps completed so far."""
        with self._lock:
            return {**self._stats, "steps": self._core.steps}

    def close(self) -> None:
        """Stops the loop; requests not finished end with EngineClosed."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            handle.cancelled = True
            if handle in self._waiting:
                self._waiting.remove(handle)
                handle._put(_END)
            else:
                self._cancelled.append(handle)
            self._stats = self._snapshot()
            self._lock.notify()

    def _snapshot(self) -> dict[str, Any]:  # under the lock
        core = self._core
        return {"slots": self.max_batch, "active": len(core.active_slots()),
                "waiting": len(self._waiting), "steps": core.steps,
                "free_slots": core.free_slots()}

    def _loop(self) -> None:
        try:
            while self._next_round():
                if self._running:
                    self._deliver(self._core.step())
            error: BaseException = EngineClosed("the engine was closed")
        except BaseException as e:  # a failed step must not leave clients waiting forever
            logging.exception("the engine's decode loop failed")
            error = e
        with self._lock:
            self._closed = True
            handles = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
        for handle in handles:
            handle._put(error)

    def _next_round(self) -> bool:
        """Frees cancelled slots and prefills waiting requests into free ones; False: closed."""
        with self._lock:
            while not (self._closed or self._waiting or self._cancelled or self._running):
                self._lock.wait()
            if self._closed:
                return False
            cancelled, self._cancelled = self._cancelled, []
            for handle in cancelled:
                slot = next((s for s, h in self._running.items() if h is handle), None)
                if slot is not None:
                    self._core.release(slot)
                    del self._running[slot]
                handle._put(_END)
            admitted = [self._waiting.popleft()
                        for _ in range(min(len(self._waiting), len(self._core.free_slots())))]
            self._stats = self._snapshot()
        if admitted:  # prefill outside the lock: submit() and cancel() stay quick
            events = self._core.admit_many([handle.request for handle in admitted])
            with self._lock:
                self._running.update((slot, h) for (slot, _), h in zip(events, admitted))
            self._deliver(events)
        return True

    def _deliver(self, events: list[tuple[int, TokenEvent]]) -> None:
        with self._lock:
            for slot, event in events:
                handle = self._running[slot]
                if event.finish_reason is not None:
                    del self._running[slot]
                if not handle.cancelled:
                    handle._put(event)
            self._stats = self._snapshot()
