"""Batched generation: a list of prompts in, their completions out, on the decoding engine.

    out = generate(params, config, prompts, max_new_tokens=32, sampler=SamplerConfig(),
                   seed=0, stop_ids=(tokenizer.eos_id,))
    out.tokens[i]            # the ids generated for prompt i (up to and including its stop id)

The prompts (lists of token ids, different lengths) run on an `engine.EngineCore` with one
slot per prompt, driven in the caller's thread: each prompt is prefilled into its own slot,
then one decode step at a time advances them all until every row has produced a stop id or
`max_new_tokens`. It is the engine's own prefill and decode (llamahome/infer/engine.py), so a
prompt's tokens equal what the `serve` job returns for it, whatever else is in the batch.

Prompt i samples with seed `seed + i`: its draw j uses fold_in(key(seed + i), j), so a seed
reproduces a generation however it is chunked or batched. The cache holds the longest prompt
plus `max_new_tokens`, rounded up to `pad_multiple` (so requests of similar lengths share
compiled code). With a mesh, the slots' batch and kv_heads axes are sharded by the same logical
axis rules as training (llamahome/parallel/mesh.py); the slots are rounded up to a multiple
of the devices the batch is split over (the extra slots stay empty).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
from jax.sharding import Mesh

from llamahome.errors import UserError
from llamahome.infer.engine import EngineCore, Request, TokenEvent, batch_shards
from llamahome.infer.samplers import SamplerConfig
from llamahome.model.llama import LlamaConfig
from llamahome.model.lora import LoraConfig
from llamahome.parallel.mesh import Rules


@dataclasses.dataclass(frozen=True)
class Generation:
    """Generated ids per prompt (stop id included), and why each row ended."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (a stop id) or "length" (max_new_tokens)
    logits: np.ndarray | None = None  # [B, max_new_tokens, vocab] when keep_logits


class _Batch:
    """The prompts of one call on their own EngineCore, advanced step by step."""

    def __init__(self, params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, sampler: SamplerConfig, seed: int,
                 stop_ids: Sequence[int], pad_id: int, pad_multiple: int, keep_logits: bool,
                 mesh: Mesh | None, rules: Rules | None, lora: LoraConfig | None,
                 adapters: dict | None):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token (add a BOS token or text)")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens={max_new_tokens}; generate at least 1 token")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > config.max_seq_len:
            raise UserError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                            f"exceeds model {config.name!r}'s max_seq_len {config.max_seq_len}; "
                            "shorten the prompt or lower max_new_tokens")
        shards = batch_shards(mesh, rules)
        max_len = -(-(longest + max_new_tokens) // pad_multiple) * pad_multiple
        self.core = EngineCore(config, params, max_batch=-(-len(prompts) // shards) * shards,
                               max_seq_len=min(max_len, config.max_seq_len), mesh=mesh,
                               rules=rules, lora=lora, adapters=adapters,
                               keep_logits=keep_logits)
        self.pad_id = pad_id
        self.events: list[list[TokenEvent]] = [[] for _ in prompts]
        self.row_of: dict[int, int] = {}  # slot -> prompt
        requests = [Request(prompt=tuple(prompt), max_tokens=max_new_tokens, sampler=sampler,
                            seed=seed + row, stop_ids=frozenset(stop_ids))
                    for row, prompt in enumerate(prompts)]
        for row, (slot, event) in enumerate(self.core.admit_many(requests)):
            self.row_of[slot] = row
            self.events[row].append(event)

    @property
    def finished(self) -> bool:
        return all(events[-1].finish_reason for events in self.events)

    def first_tokens(self) -> np.ndarray:
        return np.array([[events[0].token_id] for events in self.events], np.int32)

    def advance(self, steps: int) -> np.ndarray:
        """Up to `steps` more decode steps; the new ids [rows, k], pad_id for finished rows."""
        columns = []
        while len(columns) < steps and not self.finished:
            column = np.full(len(self.events), self.pad_id, np.int32)
            for slot, event in self.core.step():
                row = self.row_of[slot]
                self.events[row].append(event)
                column[row] = event.token_id
            columns.append(column)
        return np.stack(columns, axis=1) if columns else np.zeros((len(self.events), 0), np.int32)

    def result(self) -> Generation:
        tokens = [[e.token_id for e in events] for events in self.events]
        logits = None
        if self.core.keep_logits:
            vocab = self.events[0][0].logits.shape[-1]
            logits = np.zeros((len(tokens), max(map(len, tokens)), vocab), np.float32)
            for row, events in enumerate(self.events):
                logits[row, :len(events)] = [e.logits for e in events]
        return Generation(tokens=tokens, finish_reasons=[e[-1].finish_reason for e in self.events],
                          logits=logits)


def generate(params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
             stop_ids: Sequence[int] = (), pad_id: int = 0, pad_multiple: int = 64,
             keep_logits: bool = False, mesh: Mesh | None = None, rules: Rules | None = None,
             lora: LoraConfig | None = None, adapters: dict | None = None) -> Generation:
    """Generates up to `max_new_tokens` ids after each prompt (lists of ids); see the module doc."""
    batch = _Batch(params, config, prompts, max_new_tokens=max_new_tokens, sampler=sampler,
                   seed=seed, stop_ids=stop_ids, pad_id=pad_id, pad_multiple=pad_multiple,
                   keep_logits=keep_logits, mesh=mesh, rules=rules, lora=lora, adapters=adapters)
    batch.advance(max_new_tokens)
    return batch.result()


def stream_generate(params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
                    stop_ids: Sequence[int] = (), pad_id: int = 0, pad_multiple: int = 64,
                    chunk: int = 4, mesh: Mesh | None = None, rules: Rules | None = None,
                    lora: LoraConfig | None = None, adapters: dict | None = None
                    ) -> Iterator[np.ndarray]:
    """Like `generate`, but yields the new ids [B, k] after the prefill and every `chunk` steps.

    Rows that are done carry `pad_id`; the ids equal `generate`'s for the same arguments.
    """
    batch = _Batch(params, config, prompts, max_new_tokens=max_new_tokens, sampler=sampler,
                   seed=seed, stop_ids=stop_ids, pad_id=pad_id, pad_multiple=pad_multiple,
                   keep_logits=False, mesh=mesh, rules=rules, lora=lora, adapters=adapters)
    yield batch.first_tokens()
    while not batch.finished:
        yield batch.advance(chunk)
