"""Text in, text out: a loaded model + tokenizer that generates or streams completions.

    gen = load_generator("runs/20250101-120000")            # or a step dir, params dir, HF dir
    for piece in gen.stream("To be, or not", max_new_tokens=64, temperature=0.8, seed=0):
        print(piece, end="", flush=True)
    completions = gen.generate(["Hello", [{"role": "user", "content": "Hi"}]], max_new_tokens=32)

A prompt is a string (encoded with BOS) or a list of chat messages [{"role", "content"}]
(encoded with the tokenizer's chat template, followed by an empty assistant turn's header so
the model writes the reply). Generation stops at the tokenizer's EOS (and Llama 3's
<|eot_id|> / <|end_of_text|> when the vocabulary has them) or after max_new_tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

from jax.sharding import Mesh

from llamahome.data.tokenizer import Tokenizer, TokenizerSpec, tokenizer_from_spec
from llamahome.errors import UserError
from llamahome.infer.checkpoints import LoadedModel, load_model
from llamahome.infer.generate import stream_generate
from llamahome.infer.samplers import SamplerConfig
from llamahome.model.config import LlamaConfig
from llamahome.parallel.rules import Rules

Prompt = str | Sequence[dict]
EXTRA_STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One prompt's generated text and ids (stop id included in ids, not in text)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int


def stop_ids_of(tokenizer: Tokenizer) -> tuple[int, ...]:
    """EOS plus the end-of-turn tokens the vocabulary has."""
    extra = (tokenizer.token_id(t) for t in EXTRA_STOP_TOKENS)
    return tuple(dict.fromkeys([tokenizer.eos_id, *(i for i in extra if i is not None)]))


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a text prompt (with BOS), or of chat messages plus the assistant header."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_bos=True)
    # The template closes every turn; an empty assistant turn minus its closing token is
    # exactly the header the reply follows, in whichever layout the tokenizer uses.
    ids, _ = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": ""}])
    return ids[:-1]


class TextStream:
    """Turns a growing list of generated ids into text pieces, never splitting a character.

    The ids are decoded after a few prompt tokens and the prompt's text is cut off, so a
    SentencePiece word-start space is kept; a trailing U+FFFD (half a UTF-8 character) is
    held back until the next ids complete it. Ids after the first stop id are ignored.
    """

    CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop_ids: Sequence[int]):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.context = list(prompt_ids[-self.CONTEXT:])
        self.context_text = tokenizer.decode(self.context)
        self.ids: list[int] = []  # generated ids, without the stop id
        self.stop_id: int | None = None
        self.emitted = ""

    def text(self) -> str:
        full = self.tokenizer.decode(self.context + self.ids)
        if full.startswith(self.context_text):
            return full[len(self.context_text):]
        return self.tokenizer.decode(self.ids)

    def push(self, ids: Sequence[int]) -> str:
        """Adds new ids; returns the text they complete ("" if none yet)."""
        for token in ids:
            if self.stop_id is not None:
                break
            if token in self.stop_ids:
                self.stop_id = int(token)
            else:
                self.ids.append(int(token))
        text = self.text()
        if (text.endswith("\ufffd") and self.stop_id is None) or not text.startswith(self.emitted):
            return ""  # half a character, or decoding changed earlier text: wait
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def completion(self, prompt_tokens: int) -> Completion:
        stopped = self.stop_id is not None
        return Completion(text=self.text(),
                          token_ids=self.ids + ([self.stop_id] if stopped else []),
                          finish_reason="stop" if stopped else "length",
                          prompt_tokens=prompt_tokens)


class BatchStream:
    """Iterates over the new text of each prompt ([str] per step); then `.completions` holds all."""

    def __init__(self, generator: Generator, prompts: Sequence[Prompt], max_new_tokens: int,
                 sampler: SamplerConfig, seed: int, chunk: int):
        tokenizer = generator.tokenizer
        self._encoded = [encode_prompt(tokenizer, p) for p in prompts]
        self._texts = [TextStream(tokenizer, ids, generator.stop_ids) for ids in self._encoded]
        self._ids = stream_generate(
            generator.params, generator.config, self._encoded, max_new_tokens=max_new_tokens,
            sampler=sampler, seed=seed, chunk=chunk, stop_ids=generator.stop_ids,
            pad_id=tokenizer.pad_id, mesh=generator.mesh, rules=generator.rules)

    def __iter__(self) -> Iterator[list[str]]:
        for new in self._ids:  # [B, k]
            yield [text.push(row) for text, row in zip(self._texts, new.tolist())]

    @property
    def completions(self) -> list[Completion]:
        return [text.completion(len(ids)) for text, ids in zip(self._texts, self._encoded)]


class Generator:
    """A model, its params and tokenizer, ready to generate (see the module docstring)."""

    def __init__(self, config: LlamaConfig, params: dict, tokenizer: Tokenizer, *,
                 mesh: Mesh | None = None, rules: Rules | None = None):
        if tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but model "
                            f"{config.name!r} only {config.vocab_size}; use the model's tokenizer")
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.mesh, self.rules = mesh, rules
        self.stop_ids = stop_ids_of(tokenizer)

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
                  mesh: Mesh | None = None, rules: Rules | None = None) -> Generator:
    """A Generator for an already loaded model."""
    spec = TokenizerSpec(str(tokenizer_path)) if tokenizer_path else model.tokenizer
    if spec is None:
        raise UserError(f"no tokenizer found for {model.path}; pass tokenizer_path "
                        "(generate.tokenizer = '...') pointing at a tokenizer.json or .model")
    tokenizer = tokenizer_from_spec(spec)
    return Generator(model.config, model.params, tokenizer, mesh=mesh, rules=rules)
