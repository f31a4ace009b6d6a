"""Text in, text out: a loaded model + tokenizer that generates or streams completions.

    gen = load_generator("runs/20250101-120000")            # or a step dir, params dir, HF dir
    for piece in gen.stream("To be, or not", max_new_tokens=64, temperature=0.8, seed=0):
        print(piece, end="", flush=True)
    completions = gen.generate(["Hello", [{"role": "user", "content": "Hi"}]], max_new_tokens=32)

A prompt is a string (encoded by the tokenizer's own BOS/EOS rule, as `transformers` encodes
it, unless `add_bos` forces BOS on or off) or a list of chat messages [{"role", "content"}]
(rendered with the model's chat template and its assistant header, as `apply_chat_template(...,
add_generation_prompt=True)`). Generation stops at any of the tokenizer's stop ids (the
generation_config.json `eos_token_id` list, see data/tokenizer.py), at a user stop string (the
text is cut before it), or after max_new_tokens.

Decoding runs on the engine (infer/engine.py, through generate.stream_generate): the same
prefill and decode step as the `serve` job, so a prompt's completion is the same here, in the
`generate` job, in the dashboard playground and from the server. Prompt i of a batch samples
with seed `seed + i`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

from jax.sharding import Mesh

from absl import logging

from llamahome.data.tokenizer import Tokenizer, TokenizerSpec, tokenizer_from_spec
from llamahome.errors import UserError
from llamahome.infer.engine import engine_params
from llamahome.infer.generate import stream_generate
from llamahome.infer.samplers import SamplerConfig
from llamahome.model.checkpoints import LoadedModel, load_model
from llamahome.model.llama import LlamaConfig
from llamahome.model.lora import LoraConfig
from llamahome.parallel.mesh import Rules

Prompt = str | Sequence[dict]


@dataclasses.dataclass(frozen=True)
class Completion:
    """One prompt's generated text and ids (stop id included in ids, not in text)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int


def stop_ids_of(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids generation stops at: the model's generation_config eos ids, else EOS and end-of-turn."""
    return tokenizer.stop_ids


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, add_bos: bool | None = None) -> list[int]:
    """Token ids of a text prompt (BOS by the tokenizer's rule unless `add_bos` says), or of
    chat messages rendered with the model's template plus the assistant header."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_bos=add_bos, add_eos=False)
    return tokenizer.chat_prompt(prompt)


class TextStream:
    """Turns a growing list of generated ids into text pieces, never splitting a character.

    The ids are decoded after a few prompt tokens and the prompt's text is cut off, so a
    SentencePiece word-start space is kept; a trailing U+FFFD (half a UTF-8 character) is
    held back until the next ids complete it. Ids after the first stop id are ignored.
    """

    CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop_ids: Sequence[int],
                 stop_strings: Sequence[str] = ()):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.stop_string: str | None = None
        self.context = list(prompt_ids[-self.CONTEXT:])
        self.context_text = tokenizer.decode(self.context)
        self.ids: list[int] = []  # generated ids, without the stop id
        self.stop_id: int | None = None
        self.emitted = ""

    @property
    def stopped(self) -> bool:
        return self.stop_id is not None or self.stop_string is not None

    def _decoded(self) -> str:
        full = self.tokenizer.decode(self.context + self.ids)
        if full.startswith(self.context_text):
            return full[len(self.context_text):]
        return self.tokenizer.decode(self.ids)

    def text(self) -> str:
        """The completion so far, cut before the first stop string."""
        text = self._decoded()
        cuts = [i for s in self.stop_strings if (i := text.find(s)) >= 0]
        return text[:min(cuts)] if cuts else text

    def _held(self, text: str) -> int:
        """How many trailing characters could begin a stop string (not shown yet)."""
        return max((n for s in self.stop_strings for n in range(len(s) - 1, 0, -1)
                    if text.endswith(s[:n])), default=0)

    def push(self, ids: Sequence[int]) -> str:
        """Adds new ids; returns the text they complete ("" if none yet)."""
        for token in ids:
            if self.stopped:
                break
            if token in self.stop_ids:
                self.stop_id = int(token)
            else:
                self.ids.append(int(token))
                if self.stop_strings and len(self.text()) < len(self._decoded()):
                    self.stop_string = next(s for s in self.stop_strings if s in self._decoded())
        text = self.text()
        if not self.stopped:
            text = text[:len(text) - self._held(text)]
        if (text.endswith("\ufffd") and not self.stopped) or not text.startswith(self.emitted):
            return ""  # half a character, or decoding changed earlier text: wait
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def completion(self, prompt_tokens: int) -> Completion:
        stopped = self.stop_id is not None
        return Completion(text=self.text(),
                          token_ids=self.ids + ([self.stop_id] if stopped else []),
                          finish_reason="stop" if self.stopped else "length",
                          prompt_tokens=prompt_tokens)


class BatchStream:
    """Iterates over the new text of each prompt ([str] per step); then `.completions` holds all."""

    def __init__(self, generator: Generator, prompts: Sequence[Prompt], max_new_tokens: int,
                 sampler: SamplerConfig, seed: int, chunk: int):
        tokenizer = generator.tokenizer
        self._encoded = [encode_prompt(tokenizer, p, generator.add_bos) for p in prompts]
        self._texts = [TextStream(tokenizer, ids, generator.stop_ids, generator.stop_strings)
                       for ids in self._encoded]
        self._ids = stream_generate(
            generator.params, generator.config, self._encoded, max_new_tokens=max_new_tokens,
            sampler=sampler, seed=seed, chunk=chunk, stop_ids=generator.stop_ids,
            pad_id=tokenizer.pad_id, mesh=generator.mesh, rules=generator.rules,
            lora=generator.lora, adapters=generator.adapters)

    def __iter__(self) -> Iterator[list[str]]:
        for new in self._ids:  # [B, k]
            yield [text.push(row) for text, row in zip(self._texts, new.tolist())]
            if all(text.stopped for text in self._texts):
                break  # every row hit a stop id or stop string: decode no further

    @property
    def completions(self) -> list[Completion]:
        return [text.completion(len(ids)) for text, ids in zip(self._texts, self._encoded)]


class Generator:
    """A model, its params and tokenizer, ready to generate (see the module docstring)."""

    def __init__(self, config: LlamaConfig, params: dict, tokenizer: Tokenizer, *,
                 mesh: Mesh | None = None, rules: Rules | None = None,
                 add_bos: bool | None = None, stop_strings: Sequence[str] = (),
                 lora: LoraConfig | None = None, adapters: dict | None = None):
        if tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but model "
                            f"{config.name!r} only {config.vocab_size}; use the model's tokenizer")
        # Laid out for the engine once, not at every generate call.
        self.config, self.params, self.tokenizer = config, engine_params(params, mesh), tokenizer
        self.mesh, self.rules = mesh, rules
        self.lora, self.adapters = lora, adapters  # a LoRA adapter on the base (model/lora.py)
        self.add_bos, self.stop_strings = add_bos, tuple(stop_strings)
        self.stop_ids = stop_ids_of(tokenizer)
        bos = tokenizer.adds()[0] if add_bos is None else add_bos
        logging.info("text prompts are encoded %s BOS (%s); chat prompts with the model's chat "
                     "template; generation stops at ids %s%s", "with" if bos else "without",
                     "the tokenizer's rule" if add_bos is None else "generate.add_bos",
                     list(self.stop_ids),
                     f" and strings {list(self.stop_strings)}" if self.stop_strings else "")

    def stream_batch(self, prompts: Sequence[Prompt], max_new_tokens: int = 128,
                     sampler: SamplerConfig = SamplerConfig(), seed: int = 0, chunk: int = 4
                     ) -> BatchStream:
        """Completes prompts together, yielding each one's new text every `chunk` tokens."""
        return BatchStream(self, prompts, max_new_tokens, sampler, seed, chunk)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 128,
                 sampler: SamplerConfig = SamplerConfig(), seed: int = 0) -> list[Completion]:
        """Completes a batch of prompts together, in one decode call."""
        stream = self.stream_batch(prompts, max_new_tokens, sampler, seed, chunk=max_new_tokens)
        for _ in stream:
            pass
        return stream.completions

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, *, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, seed: int = 0, chunk: int = 4
               ) -> Iterator[str]:
        """Yields the completion of one prompt as text pieces, as they are decoded."""
        sampler = SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty)
        for pieces in self.stream_batch([prompt], max_new_tokens, sampler, seed, chunk):
            if pieces[0]:
                yield pieces[0]


def load_generator(checkpoint_path: str | Path, tokenizer_path: str | Path | None = None, *,
                   step: int | None = None, config: LlamaConfig | None = None,
                   mesh: Mesh | None = None, rules: Rules | None = None,
                   **overrides) -> Generator:
    """A Generator for a run dir / step dir / params checkpoint / HF directory.

    The tokenizer is `tokenizer_path`, else the one the checkpoint names (a training run's
    load_tokenizer.path) or holds (tokenizer.json / tokenizer.model beside the weights).
    """
    model = load_model(checkpoint_path, step=step, config=config, mesh=mesh, rules=rules,
                       **overrides)
    return generator_for(model, tokenizer_path, mesh=mesh, rules=rules)


def generator_for(model: LoadedModel, tokenizer_path: str | Path | None = None, *,
                  mesh: Mesh | None = None, rules: Rules | None = None,
                  add_bos: bool | None = None, stop_strings: Sequence[str] = ()) -> Generator:
    """A Generator for an already loaded model."""
    spec = TokenizerSpec(str(tokenizer_path)) if tokenizer_path else model.tokenizer
    if spec is None:
        raise UserError(f"no tokenizer found for {model.path}; pass tokenizer_path "
                        "(generate.tokenizer = '...') pointing at a tokenizer.json or .model")
    tokenizer = tokenizer_from_spec(spec)
    return Generator(model.config, model.params, tokenizer, mesh=mesh, rules=rules,
                     add_bos=add_bos, stop_strings=stop_strings,
                     lora=model.lora, adapters=model.adapters)  # a LoRA checkpoint: unmerged
