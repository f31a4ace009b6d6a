"""Samplers on hand-made distributions, checked against the formulas written out in numpy."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from llamahome.errors import ConfigError
from llamahome.infer.generate import generate
from llamahome.infer.samplers import (SamplerConfig, apply_repetition_penalty, filtered_logits,
                                      min_p_filter, sample, sampler_settings, top_k_filter,
                                      top_p_filter)
from llamahome.model.llama import LlamaConfig, init_params

PROBS = np.array([0.05, 0.4, 0.1, 0.25, 0.02, 0.18])  # sorted: .4 .25 .18 .1 .05 .02
LOGITS = np.log(PROBS)[None].astype(np.float32)  # [1, 6]


def kept(filtered) -> set[int]:
    return set(np.flatnonzero(np.isfinite(np.asarray(filtered)[0])).tolist())


@pytest.mark.parametrize("p, expected", [
    (0.3, {1}),  # 0.4 alone reaches 0.3
    (0.41, {1, 3}),  # 0.4 just short of 0.41
    (0.5, {1, 3}),  # 0.4 < 0.5 -> add 0.25
    (0.7, {1, 3, 5}),  # 0.65 < 0.7 -> add 0.18
    (0.82, {1, 3, 5}),  # 0.83 passes 0.82
    (0.9, {1, 3, 5, 2}),
    (0.99, {1, 3, 5, 2, 0, 4}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    order = np.argsort(-PROBS)
    mass_before = np.cumsum(PROBS[order]) - PROBS[order]
    formula = set(order[mass_before < p].tolist())  # nucleus: mass before a token < p
    assert formula == expected
    assert kept(top_p_filter(LOGITS, np.float32(p))) == expected


@pytest.mark.parametrize("min_p", [0.0, 0.3, 0.46, 0.5, 0.7, 1.0])
def test_min_p_keeps_tokens_at_least_min_p_times_the_max(min_p):
    expected = set(np.flatnonzero(PROBS >= min_p * PROBS.max()).tolist())
    assert kept(min_p_filter(LOGITS, np.float32(min_p))) == expected


@pytest.mark.parametrize("k", [1, 2, 4, 6, 10])
def test_top_k_keeps_the_k_most_likely(k):
    assert kept(top_k_filter(LOGITS, np.int32(k))) == set(np.argsort(-PROBS)[:k].tolist())


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([[2.0, -1.0, 3.0, -0.5]], np.float32)
    seen = np.array([[True, True, False, False]])
    out = np.asarray(apply_repetition_penalty(logits, seen, np.float32(2.0)))
    np.testing.assert_allclose(out, [[1.0, -2.0, 3.0, -0.5]])


def test_filters_compose_in_hf_order():
    # Temperature 2 flattens to probs ~ sqrt(PROBS); top-k 4 then top-p 0.5 on the renormalised 4.
    settings = sampler_settings(SamplerConfig(temperature=2.0, top_k=4, top_p=0.5))
    flat = np.sqrt(PROBS)
    top4 = np.argsort(-flat)[:4]
    renorm = flat[top4] / flat[top4].sum()
    expected = set(top4[(np.cumsum(renorm) - renorm) < 0.5].tolist())
    assert kept(filtered_logits(LOGITS, settings)) == expected


def test_sampling_frequencies_follow_the_filtered_distribution():
    settings = sampler_settings(SamplerConfig(temperature=1.0, top_p=0.7))
    logits = np.repeat(LOGITS, 4000, axis=0)  # 4000 rows: each row draws with its own key
    tokens = np.asarray(jax.jit(sample)(logits, jax.random.key(0), settings))
    counts = np.bincount(tokens, minlength=6) / tokens.size
    nucleus = np.array([0, 0.4, 0, 0.25, 0, 0.18]) / 0.83
    np.testing.assert_allclose(counts, nucleus, atol=0.03)


def test_greedy_ignores_the_key_and_takes_the_argmax():
    tokens = sample(LOGITS, jax.random.key(123), sampler_settings(SamplerConfig()))
    assert int(tokens[0]) == 1


def test_invalid_settings_name_the_field():
    with pytest.raises(ConfigError, match="top_p"):
        SamplerConfig(temperature=1.0, top_p=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        SamplerConfig(temperature=-1.0)


@pytest.fixture(scope="module")
def tiny():
    config = LlamaConfig(vocab_size=64, max_seq_len=64)
    return config, init_params(config, jax.random.key(0))


PROMPTS = [[1, 5, 9], [3, 4, 7, 8, 2, 6]]


def test_fixed_seed_reproduces_and_another_seed_differs(tiny):
    config, params = tiny
    sampler = SamplerConfig(temperature=1.5, min_p=0.01, repetition_penalty=1.3)
    run = lambda seed: generate(params, config, PROMPTS, max_new_tokens=16,  # noqa: E731
                                sampler=sampler, seed=seed).tokens
    first = run(0)
    assert run(0) == first
    assert run(1) != first


def test_top_k_1_equals_greedy(tiny):
    config, params = tiny
    greedy = generate(params, config, PROMPTS, max_new_tokens=16).tokens
    top1 = generate(params, config, PROMPTS, max_new_tokens=16,
                    sampler=SamplerConfig(temperature=0.7, top_k=1), seed=4).tokens
    assert top1 == greedy
