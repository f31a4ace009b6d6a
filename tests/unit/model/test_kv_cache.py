"""KV-cache decoding of left-padded prompts equals HF's full recomputation of each row alone."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from llamahome.model import hf
from llamahome.model.kv_cache import left_padded_positions
from llamahome.model.llama import Llama, init_cache
from tests.unit.model.hf_reference import LLAMA3_ROPE, hf_logits, random_hf_llama

PROMPT_LENGTHS = (4, 9)
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = random_hf_llama(num_kv_heads=2, rope_scaling=LLAMA3_ROPE, seed=3)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return model, hf.load_hf_checkpoint(path)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_prefill_then_decode_equals_full_recomputation(reference, scan_layers):
    hf_model, (config, params) = reference
    config = config.replace(scan_layers=scan_layers)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 128, n) for n in PROMPT_LENGTHS]
    continuations = rng.integers(1, 128, (len(prompts), NEW_TOKENS)).astype(np.int32)
    width = max(PROMPT_LENGTHS)
    tokens = np.zeros((len(prompts), width), np.int32)  # left-padded with token 0
    segment_ids = np.zeros_like(tokens)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        segment_ids[row, width - len(prompt):] = 1

    @functools.partial(jax.jit, donate_argnums=4)
    def step(params, tokens, positions, segment_ids, cache):
        return Llama(config).apply({"params": params}, tokens, positions, segment_ids, cache=cache)

    cache = init_cache(config, batch_size=len(prompts), max_len=width + NEW_TOKENS)
    logits, cache = step(params, tokens, left_padded_positions(segment_ids), segment_ids, cache)
    assert int(cache.index) == width
    for row, prompt in enumerate(prompts):
        expected = hf_logits(hf_model, prompt[None])[0]
        np.testing.assert_allclose(logits[row, width - len(prompt):], expected, atol=1e-4)

    lengths = np.array(PROMPT_LENGTHS, np.int32)
    for i in range(NEW_TOKENS):
        logits, cache = step(params, continuations[:, i:i + 1], (lengths + i)[:, None],
                             np.ones((len(prompts), 1), np.int32), cache)
        for row, prompt in enumerate(prompts):
            full = np.concatenate([prompt, continuations[row, :i + 1]])[None]
            np.testing.assert_allclose(logits[row, 0], hf_logits(hf_model, full)[0, -1],
                                       atol=1e-4)
    assert int(cache.index) == width + NEW_TOKENS
