"""LlamaHome as an lm-evaluation-harness model: `LlamaHomeLM`, on any checkpoint kind.

    lm = LlamaHomeLM.from_checkpoint("runs/<run>", batch_size=16)   # or a step dir, an HF dir,
                                                                     # an import_hf dir, model:name@N
    lm.loglikelihood(requests); lm.loglikelihood_rolling(requests); lm.generate_until(requests)

Scoring (`loglikelihood`, `loglikelihood_rolling`) is training's `ParamsLM`
(llamahome/train/downstream.py: HFLM's tokenization and grouping, one jitted forward pass per
[batch_size, bucketed length]). `generate_until` adds greedy generation with the project's KV
cache decoder (infer/generate.py): requests sorted by length and grouped by their generation
kwargs as HFLM groups them, each batch decoded a few tokens at a time until every row has
produced a stop id or one of its `until` strings, or `max_gen_toks`; the text is the decoded
ids cut before the first stop string, as HFLM cuts it. Only greedy decoding is offered
(`do_sample=True` is refused): downstream scores must be reproducible.

With a mesh the params are laid out by the training rules and each batch is split along its
batch axis (batch_size is rounded up to whole shards).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
import numpy as np
from jax.sharding import Mesh

from llamahome.data.tokenizer import TokenizerSpec, tokenizer_from_spec
from llamahome.errors import ConfigError
from llamahome.hub.registry import resolve_model_path
from llamahome.infer.generate import stream_generate
from llamahome.model.checkpoints import describe, load_model
from llamahome.model.llama import LlamaConfig
from llamahome.parallel.mesh import Rules
from llamahome.train.downstream import ParamsLM

DECODE_CHUNK = 8  # tokens decoded between checks for the `until` strings


class LlamaHomeLM(ParamsLM):
    """ParamsLM plus `generate_until` and loading from a checkpoint (see the module doc)."""

    checkpoint_step: int | None = None  # the training step loaded, if the checkpoint has one

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, step: int | None = None,
                        tokenizer: str | None = None, mesh: Mesh | None = None,
                        rules: Rules | None = None, dtype: str | None = None,
                        batch_size: int = 8, max_length: int | None = None,
                        add_bos: bool | None = None, run_dir: str | Path | None = None
                        ) -> LlamaHomeLM:
        """Loads `checkpoint` (any kind load_model reads, or a registry ref) onto `mesh`."""
        overrides = {"dtype": dtype} if dtype else {}
        model = load_model(resolve_model_path(str(checkpoint), str(run_dir or "")), step=step,
                           config=LlamaConfig(), mesh=mesh, rules=rules, **overrides)
        if tokenizer:
            text_tokenizer = tokenizer_from_spec(TokenizerSpec(str(tokenizer)))
        elif model.tokenizer is not None:
            text_tokenizer = tokenizer_from_spec(model.tokenizer)
        else:
            raise ConfigError(f"no tokenizer found for {model.path}; set lm_eval.tokenizer='...' "
                              "to a tokenizer.json, a SentencePiece .model or a folder holding one")
        lm = cls(model.config, model.params, text_tokenizer, mesh=mesh, rules=rules,
                 batch_size=batch_size, max_length=max_length, add_bos=add_bos,
                 name=describe(model))
        lm.checkpoint_step = model.step
        return lm

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy completions of (context, gen_kwargs) requests, cut at their `until` strings."""
        from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs  # noqa: PLC0415

        order = Collator([r.args for r in requests], group_by="gen_kwargs",
                         sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_fn=lambda r: r[1])
        eos_text = getattr(self.tokenizer, "special_tokens", {}).get("eos_token")
        results = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ConfigError(f"generation kwargs {all_kwargs[0]} ask for sampling; "
                                  "LlamaHomeLM generates greedily (drop do_sample/temperature)")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
            new = kwargs["max_gen_toks"]
            if new >= self.max_length:
                raise ConfigError(f"max_gen_toks={new} leaves no room for a prompt in the "
                                  f"model's {self.max_length} positions; lower it")
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - new) for c in contexts]
            for context, text in zip(contexts, self._greedy(prompts, new, until)):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        return order.get_original(results)

    def _greedy(self, prompts: Sequence[list[int]], max_new: int, until: Sequence[str]
                ) -> list[str]:
        """Each prompt's greedy continuation text, cut before the first of `until`."""
        stops = set(self.tokenizer.stop_ids)
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        # A short last batch is filled with copies of its first prompt: one compiled shape.
        full = [*prompts, *[prompts[0]] * (self.batch_size - len(prompts))]
        for new in stream_generate(self.params, self.config, full, max_new_tokens=max_new,
                                   stop_ids=self.tokenizer.stop_ids, pad_id=self.tokenizer.pad_id,
                                   chunk=DECODE_CHUNK, mesh=self.mesh, rules=self.rules):
            for row, ids in enumerate(np.asarray(new)[:len(prompts)].tolist()):
                if done[row]:
                    continue
                for token in ids:
                    if token in stops:
                        done[row] = True
                        break
                    rows[row].append(token)
                done[row] = done[row] or _cut(self.tok_decode(rows[row]), until) is not None
            if all(done):
                break
        texts = [self.tok_decode(ids) for ids in rows]
        return [text if (cut := _cut(text, until)) is None else cut for text in texts]


def _cut(text: str, until: Sequence[str]) -> str | None:
    """`text` before the first of the `until` strings, or None when it holds none."""
    cuts = [at for s in until if s and (at := text.find(s)) >= 0]
    return text[:min(cuts)] if cuts else None
